"""service/settings.py: one frozen dataclass read once from the environment, bad values refused by name,
the documented table in step with it, and the limits /model_info reports taken from BentoML's merged
configuration (a BENTOML_CONFIG file and BENTOML_CONFIG_OPTIONS over the service's own arguments)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import psutil
import pytest

from service import settings
from service.settings import Settings, SettingsError
from tests.conftest import ROOT, Server, lenet_env


def test_defaults_are_the_documented_ones():
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.artifacts_dir, s.model_name, s.model_version, s.device, s.workers) == (
        "artifacts", "cnn", None, "auto", None)
    assert (s.max_images, s.max_npz_images, s.max_body_bytes, s.max_concurrency, s.request_timeout) == (
        1024, 100_000, 100_000 * (28 * 28 + 8) + 64 * 1024, 256, 60)  # the largest legal .npz of 28x28 images
    assert (s.torch_threads, s.reload_poll_s, s.tracing, s.port, s.host) == (1, 2, False, 3000, "0.0.0.0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_images = 1


def test_values_are_read_and_typed():
    s = Settings.from_env({"MAX_IMAGES": "4", "MAX_BODY_MB": "0.01", "WORKERS": "3", "DEVICE": "cuda:1",
                           "TRACING": "1", "RELOAD_POLL_S": "0", "MODEL_VERSION": "", "PORT": "3111"})
    assert (s.max_images, s.max_body_bytes, s.workers, s.device, s.tracing, s.reload_poll_s) == (
        4, 10485, 3, "cuda:1", True, 0.0)
    assert s.model_version is None and s.port == 3111  # MODEL_VERSION="" (make's default) is "not pinned"


@pytest.mark.parametrize("env, words", [
    ({"MAX_IMAGES": "abc"}, "MAX_IMAGES must be a whole number >= 1, got 'abc'"),
    ({"MAX_IMAGES": "0"}, "MAX_IMAGES must be a whole number >= 1, got '0'"),
    ({"MAX_NPZ_IMAGES": "1.5"}, "MAX_NPZ_IMAGES must be a whole number >= 1"),
    ({"MAX_BODY_MB": "-1"}, "MAX_BODY_MB must be a number > 0, got '-1'"),
    ({"MAX_BODY_MB": "nan"}, "MAX_BODY_MB must be a number > 0"),
    ({"MAX_CONCURRENCY": "many"}, "MAX_CONCURRENCY must be a whole number >= 1"),
    ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT must be a number > 0"),
    ({"TORCH_THREADS": ""}, "TORCH_THREADS must be a whole number >= 1, got ''"),
    ({"RELOAD_POLL_S": "-2"}, "RELOAD_POLL_S must be a number >= 0 (0: off)"),
    ({"WORKERS": "all"}, "WORKERS must be cpu_count or a whole number >= 1, got 'all'"),
    ({"DEVICE": "tpu"}, "DEVICE must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"TRACING": "yes"}, "TRACING must be 0 (off) or 1 (on), got 'yes'"),
    ({"PORT": "70000"}, "PORT must be a port number 1..65535"),
    ({"MODEL_NAME": " "}, "MODEL_NAME must be a non-empty string"),
])
def test_a_bad_value_is_refused_naming_the_variable_and_what_is_allowed(env, words):
    with pytest.raises(SettingsError) as e:
        Settings.from_env(env)
    assert words in str(e.value)


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"MAX_IMAGES": "x", "TRACING": "on"})
    assert "MAX_IMAGES" in str(e.value) and "TRACING" in str(e.value)


def test_the_cli_refuses_a_bad_setting_before_bentoml_starts(monkeypatch, capsys):
    from service import cli

    def execve(*args):  # a regression must fail here, not replace the test process with `bentoml serve`
        raise AssertionError(f"bentoml would have started: {args[1]}")

    monkeypatch.setattr(cli.os, "execve", execve)
    settings.get()  # cached before the variable changes: the CLI must read the environment as it is now
    monkeypatch.setenv("MAX_CONCURRENCY", "0")
    code = cli.main(["serve"])
    assert (code, capsys.readouterr().err) == (2, "error: MAX_CONCURRENCY must be a whole number >= 1, got '0'\n")


def test_only_settings_reads_the_environment():
    readers = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "service").glob("*.py"))
               if "os.environ" in p.read_text() or "getenv" in p.read_text()]
    assert readers == ["service/settings.py"]


def test_docs_table_lists_every_setting():
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text.split("## Settings")[1].split("\n## ")[0]
    documented = re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE)
    assert documented == [f.metadata["env"] for f in dataclasses.fields(Settings)]


# ------------------------------------------------------------------------------------------
# a real server: BentoML's own configuration wins, and /model_info reports what BentoML enforces


@pytest.mark.slow
def test_limits_set_in_bentoml_configuration_are_the_ones_model_info_reports(lenet_version, tmp_path):
    config = Path(tmp_path / "bentoml.yaml")
    config.write_text("services:\n  imgclf:\n    traffic:\n      timeout: 30\n")
    env = {**lenet_env(lenet_version), "MAX_IMAGES": "8", "MAX_CONCURRENCY": "100", "REQUEST_TIMEOUT": "60",
           "BENTOML_CONFIG": str(config),
           "BENTOML_CONFIG_OPTIONS": "services.imgclf.traffic.max_concurrency=7 services.imgclf.workers=2"}
    with Server(env, workers=1) as s:
        limits = httpx.get(s.url + "/model_info", timeout=30).json()["limits"]
        assert limits["request_timeout_s"] == 30.0  # the config file over REQUEST_TIMEOUT
        assert limits["workers"] == 2  # the options over the environment
        assert limits["max_concurrency"] == 100  # the service-wide limit the guard counts (service/admission.py)
        assert limits["bentoml_max_concurrency_per_worker"] == 4  # BentoML's own, set here: ceil(7 / 2)
        assert limits["max_images"] == 8  # the service's own limits come from the environment
        workers = [p for p in psutil.Process(s.proc.pid).children(recursive=True)
                   if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
        assert len(workers) == 2  # and BentoML started the workers it divides by
