"""The shipped deployment files, checked by the real tools: promtool and the Kubernetes schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _run(*cmd, cwd=None):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    assert path, "promtool missing: apt-get install prometheus (.ci/run does)"
    return path


def test_prometheus_config_and_rules_are_valid(promtool):
    r = _run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 rules found" in r.stdout


def test_alert_rules_fire_as_documented(promtool):
    """promtool's rule unit tests: accuracy below the offline interval, p99, 5xx ratio, no model."""
    r = _run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_manifests_validate_strictly():
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service.yaml", "hpa.yaml", "deployment-gpu.yaml"}
    kv = Path(shutil.which("kubernetes-validate") or Path(__file__).parents[1] / ".venv/bin/kubernetes-validate")
    r = _run(str(kv), "--strict", *map(str, MANIFESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(MANIFESTS)


def test_kubernetes_validation_catches_a_broken_manifest(tmp_path):
    """The check above can fail: a misspelt field is refused."""
    broken = tmp_path / "broken.yaml"
    manifest = (DEPLOY / "kubernetes" / "deployment.yaml").read_text()
    broken.write_text(manifest.replace("readinessProbe", "readynessProbe"))
    kv = Path(shutil.which("kubernetes-validate") or Path(__file__).parents[1] / ".venv/bin/kubernetes-validate")
    r = _run(str(kv), "--strict", str(broken))
    assert r.returncode != 0


def test_deployment_probes_user_and_resources():
    text = (DEPLOY / "kubernetes" / "deployment.yaml").read_text()
    for needle in ("path: /readyz", "path: /livez", "runAsNonRoot: true", "requests:", "limits:"):
        assert needle in text


def metric_names_used() -> set[str]:
    """Every metric the dashboard and the alert rules name, histogram suffixes stripped."""
    exprs = [t["expr"] for p in json.loads((DEPLOY / "grafana" / "imgclf-dashboard.json").read_text())["panels"]
             for t in p["targets"]]
    exprs.append((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = set(re.findall(r"\b((?:imgclf|bentoml_service)_[a-z_]+)", "\n".join(exprs)))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboard_is_grafana_json():
    d = json.loads((DEPLOY / "grafana" / "imgclf-dashboard.json").read_text())
    assert d["panels"] and all(p["targets"] for p in d["panels"])
    assert {"imgclf_evaluation_accuracy", "imgclf_inference_latency_seconds"} <= metric_names_used()
