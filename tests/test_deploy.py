"""The shipped deployment files, checked by the real tools: promtool and the Kubernetes schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _run(*cmd, cwd=None):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    assert path, "promtool missing: make tools (apt-get install prometheus)"
    return path


def test_prometheus_config_and_rules_are_valid(promtool):
    r = _run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12 rules found" in r.stdout


def test_alert_rules_fire_as_documented(promtool):
    """promtool's rule unit tests: windowed accuracy below offline and the predicted-class mix's drift (healthy
    streams never fire, real trouble does), p99, 5xx ratio, no model."""
    r = _run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_manifests_validate_strictly():
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service.yaml", "hpa.yaml", "deployment-gpu.yaml",
                                           "hpa-gpu.yaml", "proxy-configmap.yaml"}
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


def _objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, for every object of deploy/kubernetes/*.yaml."""
    return {(o["kind"], o["metadata"]["name"]): o for p in MANIFESTS for o in yaml.safe_load_all(p.read_text()) if o}


def test_each_autoscaler_scales_a_deployment_of_the_folder():
    objects = _objects()
    hpas = {name: o for (kind, name), o in objects.items() if kind == "HorizontalPodAutoscaler"}
    assert {name: o["spec"]["scaleTargetRef"]["name"] for name, o in hpas.items()} == \
        {"imgclf": "imgclf", "imgclf-gpu": "imgclf-gpu"}
    for o in hpas.values():
        ref = o["spec"]["scaleTargetRef"]
        assert ("Deployment", ref["name"]) in objects and ref["apiVersion"] == "apps/v1"
        assert 1 <= o["spec"]["minReplicas"] <= o["spec"]["maxReplicas"]
    gpu_target = hpas["imgclf-gpu"]["spec"]["metrics"][0]["resource"]
    assert gpu_target["name"] == "cpu" and gpu_target["target"] == {"type": "AverageValue", "averageValue": "5600m"}


def test_the_gpu_deployment_gives_its_workers_the_gpu():
    """WORKERS unset: on a GPU the default is a number (8 per GPU, at most one per CPU of the limit), for
    which BentoML assigns the GPU to the workers (tests/test_scale.py checks BentoML's allocator)."""
    pod = _objects()[("Deployment", "imgclf-gpu")]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "imgclf"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DEVICE"] == "auto" and "WORKERS" not in env
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert int(container["resources"]["limits"]["cpu"]) == 8  # room for the 8 default workers


# The fields of monitoring.coreos.com/v1 that these objects may use (from the operator's CRDs; the
# operator's schemas are not vendored here, so unknown or misspelt fields are caught by these sets).
RULE_GROUP_FIELDS = {"name", "interval", "labels", "limit", "partial_response_strategy", "query_offset", "rules"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
ENDPOINT_FIELDS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                   "relabelings", "metricRelabelings", "params", "tlsConfig"}


def _operator_objects() -> dict[str, dict]:
    folder = DEPLOY / "kubernetes" / "prometheus-operator"
    return {o["kind"]: o for p in sorted(folder.glob("*.yaml")) for o in yaml.safe_load_all(p.read_text()) if o}


def test_the_prometheus_rule_holds_exactly_the_rules_of_alerts_yml():
    rule = _operator_objects()["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"] == "imgclf"
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rule["spec"]["groups"]:
        assert set(group) <= RULE_GROUP_FIELDS and group["name"]
        for r in group["rules"]:
            assert set(r) <= RULE_FIELDS and "expr" in r and ("alert" in r) != ("record" in r)


def test_the_checked_in_operator_files_are_what_the_generator_writes(capsys):
    from deploy import prometheus_operator

    folder = DEPLOY / "kubernetes" / "prometheus-operator"
    assert {name: (folder / name).read_text() for name in prometheus_operator.render()} == prometheus_operator.render()
    assert prometheus_operator.main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_a_changed_alerts_yml_makes_the_check_fail(tmp_path, monkeypatch, capsys):
    from deploy import prometheus_operator

    changed = tmp_path / "alerts.yml"
    changed.write_text((DEPLOY / "prometheus" / "alerts.yml").read_text().replace("for: 10m", "for: 15m"))
    monkeypatch.setattr(prometheus_operator, "ALERTS", changed)
    assert prometheus_operator.main(["--check"]) == 1
    assert "prometheusrule.yaml is out of date with its sources" in capsys.readouterr().err


def test_the_prometheus_rule_spec_is_a_rule_file_promtool_accepts(promtool, tmp_path):
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(_operator_objects()["PrometheusRule"]["spec"]))
    r = _run(promtool, "check", "rules", str(tmp_path / "rules.yml"))
    assert r.returncode == 0 and "12 rules found" in r.stdout, r.stdout + r.stderr


def test_the_service_monitor_scrapes_the_service_port_and_path():
    monitor = _operator_objects()["ServiceMonitor"]
    service = _objects()[("Service", "imgclf")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= ENDPOINT_FIELDS
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert endpoint["interval"] == scrape["global"]["scrape_interval"]


# series that exist only while a challenger is served beside the champion (service/rollout.py): a server
# without one cannot show them; tests/test_rollout_service.py checks them on a server with one
WITH_A_CHALLENGER = {"imgclf_shadow_agreement_total"}


def metric_names_used() -> set[str]:
    """Every metric the dashboard and the alert rules name, histogram suffixes stripped (not the recording
    rules' names, level:metric:operation, which Prometheus makes from these)."""
    exprs = [t["expr"] for p in json.loads((DEPLOY / "grafana" / "imgclf-dashboard.json").read_text())["panels"]
             for t in p["targets"]]
    exprs.append((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = set(re.findall(r"(?<![\w:])((?:imgclf|bentoml_service)_[a-z_]+)(?![\w:])", "\n".join(exprs)))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboard_is_grafana_json():
    d = json.loads((DEPLOY / "grafana" / "imgclf-dashboard.json").read_text())
    assert d["panels"] and all(p["targets"] for p in d["panels"])
    assert {"imgclf_evaluated_correct_total", "imgclf_expected_prediction_share", "imgclf_forward_batch_size",
            "imgclf_inference_latency_seconds", "imgclf_shadow_dropped_total",
            *WITH_A_CHALLENGER} <= metric_names_used()


def test_every_recorded_series_the_dashboard_and_alerts_read_is_a_rule_of_alerts_yml():
    """The windowed accuracy, its shortfall and the drift distance come from recording rules; a misspelt one
    would draw an empty panel or an alert that never fires."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    recorded = {r["record"] for r in rules if "record" in r}
    exprs = [t["expr"] for p in json.loads((DEPLOY / "grafana" / "imgclf-dashboard.json").read_text())["panels"]
             for t in p["targets"]] + [r["expr"] for r in rules]
    read = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", "\n".join(exprs)))
    assert {"model_version:imgclf_evaluated_accuracy:ratio6h", "model_version:imgclf_accuracy_shortfall:z6h",
            "model_version:imgclf_prediction_share:tvd1h"} <= read
    assert read <= recorded, sorted(read - recorded)


# --- the proxy sidecar (deploy/nginx/nginx.conf; tests/test_proxy.py runs it in front of a real server)

@pytest.mark.parametrize("deployment", ["imgclf", "imgclf-gpu"])
def test_each_deployment_runs_the_shipped_proxy_in_front_of_the_service(deployment):
    """Clients reach the pod only through the proxy: the Service's client port targets the sidecar's port,
    whose nginx runs the ConfigMap of deploy/nginx/nginx.conf; the probes and Prometheus reach the service."""
    objects = _objects()
    pod = objects[("Deployment", deployment)]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"imgclf", "proxy"}
    service, proxy = containers["imgclf"], containers["proxy"]
    ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c["ports"]}
    assert ports == {"http": 3000, "proxy": 8080}
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"^\s+listen 8080\b", conf, re.M) and re.search(r"^\s+server 127\.0\.0\.1:3000\b", conf, re.M)
    # the sidecar's nginx reads the mounted ConfigMap, which is nginx.conf verbatim, and writes only its emptyDir
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    config_dir = proxy["command"][proxy["command"].index("-c") + 1].rsplit("/", 1)[0]
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "imgclf-proxy"
    prefix = proxy["command"][proxy["command"].index("-p") + 1].rstrip("/")
    assert "emptyDir" in volumes[mounts[prefix]] and proxy["securityContext"]["readOnlyRootFilesystem"] is True
    configmap = objects[("ConfigMap", "imgclf-proxy")]
    assert configmap["data"]["nginx.conf"] == conf
    # the Service: clients to the proxy, Prometheus to the service's own port (the proxy answers /metrics 404)
    svc_ports = {p["name"]: p["targetPort"] for p in objects[("Service", "imgclf")]["spec"]["ports"]}
    assert svc_ports == {"http": "proxy", "metrics": "http"}
    assert re.search(r"location = /metrics \{\s*return 404;", conf)
    assert {service["readinessProbe"]["httpGet"]["port"], service["livenessProbe"]["httpGet"]["port"]} == {"http"}
    assert pod.get("securityContext", {}).get("runAsNonRoot") is True  # nginx too: no root, port 8080


def test_the_proxy_configmap_is_what_the_generator_writes(capsys, tmp_path, monkeypatch):
    from deploy import proxy_configmap

    assert proxy_configmap.main(["--check"]) == 0 and capsys.readouterr().err == ""
    changed = tmp_path / "nginx.conf"
    changed.write_text(proxy_configmap.SOURCE.read_text().replace("client_body_timeout 10s", "client_body_timeout 60s"))
    monkeypatch.setattr(proxy_configmap, "SOURCE", changed)
    assert proxy_configmap.main(["--check"]) == 1
    assert "proxy-configmap.yaml is out of date" in capsys.readouterr().err


def test_the_shipped_nginx_config_is_valid_for_nginx(tmp_path):
    """nginx -t with the shipped file, unprivileged paths under a prefix (as make proxy and the sidecar run it)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx missing: make tools (apt-get install nginx)"
    r = _run(nginx, "-t", "-p", f"{tmp_path}/", "-c", str(DEPLOY / "nginx" / "nginx.conf"), "-e", "stderr")
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stdout + r.stderr


def test_the_proxy_body_limit_is_the_services_default_rounded_up_to_a_mib():
    """nginx refuses what the service would refuse anyway, and nothing the service takes (28x28 models)."""
    from service.settings import Settings

    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    (mib,) = re.findall(r"^\s+client_max_body_size (\d+)m;", conf, re.M)
    assert int(mib) == -(-Settings().max_body_bytes // 2**20)
