# The one interface for people and CI. Variables pass through:
#   make train MODEL=lenet EPOCHS=2 ARGS="--loss focal"     make serve PORT=3111 MODEL_VERSION=...
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

MODEL ?=
EPOCHS ?=
ARGS ?=
PORT ?= 3000
ARTIFACTS_DIR ?= artifacts
MODEL_NAME ?= $(if $(MODEL),$(MODEL),cnn)
MODEL_VERSION ?=
DEVICE ?= auto
WORKERS ?=
PYTEST_ARGS ?=

export ARTIFACTS_DIR MODEL_NAME MODEL_VERSION DEVICE WORKERS

TRAIN_FLAGS := $(if $(MODEL),--model $(MODEL)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	--artifacts-dir $(ARTIFACTS_DIR) $(ARGS)

.PHONY: setup data tools train cv list promote lint test serve proxy bench bento containerize clean-venv
.PHONY: audit

setup: $(STAMP)

# Reinstall only when the pins or the project's metadata change. The pins are installed from
# requirements*.txt (the one list); the project itself (the `imgclf` command) without dependencies.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -qq --no-deps -e .   # the imgclf command; its dependencies are the pins above
	touch $(STAMP)

# Fashion-MNIST: DATA_DIR if given, else ./data, else the Debian package (installed when possible).
data:
	@if [ -n "$(DATA_DIR)" ] || [ -d data/FashionMNIST ] || [ -f $(FMNIST)/t10k-labels-idx1-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Fashion-MNIST from Debian (dataset-fashion-mnist)"; \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else echo "error: no Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' or set DATA_DIR=/folder/with/idx-files"; exit 1; fi

# System tools the tests run, as command:Debian-package: wrk (load tests), promtool and prometheus
# (rule checks, a real Prometheus scraping a real service), nginx (the proxy of deploy/nginx/ in front
# of a real service). Installed like the dataset: through apt-get when make runs as root, else one
# line naming the packages. nginx lives in /usr/sbin, which a user's PATH may lack.
TOOLS ?= wrk:wrk promtool:prometheus prometheus:prometheus nginx:nginx
tools:
	@missing=$$(for t in $(TOOLS); do command -v "$${t%%:*}" >/dev/null || [ -x "/usr/sbin/$${t%%:*}" ] || echo "$${t#*:}"; done | sort -u | tr '\n' ' '); \
	missing=$${missing% }; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing $$missing from Debian (the tests run them)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get install -y -q --no-install-recommends $$missing || (apt-get update -q && apt-get install -y -q --no-install-recommends $$missing)) >/dev/null \
		|| { echo "error: apt-get could not install $$missing; install them and run make test again"; exit 1; }; \
	else echo "error: the tests need the Debian package(s) $$missing: run 'sudo apt-get install $$missing'"; exit 1; fi

train: setup data
	$(PY) -m training train $(TRAIN_FLAGS)

cv: setup data
	$(PY) -m training cv $(TRAIN_FLAGS) $(if $(FOLDS),--folds $(FOLDS))

list: setup
	$(PY) -m training list --artifacts-dir $(ARTIFACTS_DIR)

promote: setup
	$(PY) -m training promote --artifacts-dir $(ARTIFACTS_DIR) $(MODEL_NAME) $(MODEL_VERSION)

# ruff, configured in pyproject.toml ([tool.ruff]), over every Python file of the checkout.
lint: setup
	$(PY) -m ruff check .

# pytest exits 5 when it collected nothing: that is a failure here too.
test: setup data tools
	$(PY) -m pytest $(PYTEST_ARGS)

serve: setup
	$(PY) -m service.cli serve --port $(PORT)

# The proxy of the shipped deployment (deploy/nginx/nginx.conf), in the foreground, without root:
# clients on :8080, the service (make serve) on 127.0.0.1:3000; its pid and buffers under PROXY_DIR.
NGINX := $(or $(shell command -v nginx),/usr/sbin/nginx)
PROXY_DIR ?= .proxy
proxy:
	@test -x $(NGINX) || { echo "error: no nginx: run 'make tools' as root or 'sudo apt-get install nginx'"; exit 1; }
	mkdir -p $(PROXY_DIR)
	$(NGINX) -p $(abspath $(PROXY_DIR))/ -c $(CURDIR)/deploy/nginx/nginx.conf -e stderr

# serving: MODEL if given, else lenet when it has a version, else what `make train` made
bench: setup data
	BENCH_MODEL=$(MODEL) $(PY) -m bench

bento: setup
	$(PY) -m deploy.bento build

containerize: setup
	$(PY) -m deploy.bento containerize

clean-venv:
	rm -rf $(VENV)

# Dependency audit of requirements.txt (pinned, no resolver run) against PyPI's advisory data.
# Where the advisory service cannot be reached or knows none of the packages (an offline mirror),
# it says "audit skipped: <reason>" and exits 0: it never reports a pass it did not check.
define AUDIT_PY
import json, subprocess, sys
cmd = [sys.executable, "-m", "pip_audit", "-r", "requirements.txt", "--no-deps", "--disable-pip",
       "--progress-spinner", "off", "--timeout", "15", "-f", "json"]
p = subprocess.run(cmd, capture_output=True, text=True)
try:
    deps = json.loads(p.stdout)["dependencies"]
except (ValueError, KeyError):
    lines = [l.strip() for l in p.stderr.splitlines() if l.strip()]
    why = lines[-1][:300] if lines else f"pip-audit exited {p.returncode} without a report"
    if any(w in p.stderr for w in ("ConnectionError", "NameResolution", "Max retries", "timed out",
                                   "Failed to establish", "ProxyError", "SSLError")):
        sys.exit(print(f"audit skipped: the advisory service is unreachable ({why})"))
    print(p.stderr[-3000:])
    sys.exit(f"audit failed: {why}")
audited = [d for d in deps if "skip_reason" not in d]
skipped = [d for d in deps if "skip_reason" in d]
vulns = [(d["name"], d["version"], v["id"], ",".join(v.get("fix_versions", []))) for d in audited for v in d["vulns"]]
for name, version, vid, fix in vulns:
    print(f"VULNERABLE {name}=={version}: {vid} (fixed in: {fix or 'no release yet'})")
if vulns:
    sys.exit(f"audit failed: {len(vulns)} known vulnerabilities in requirements.txt")
if not audited:
    sys.exit(print(f"audit skipped: the advisory service answered for none of the {len(deps)} pinned packages "
                   f"({skipped[0]['skip_reason'] if skipped else 'empty report'}); nothing was checked"))
for d in skipped:
    print(f"not audited: {d['name']}: {d['skip_reason']}")
print(f"audit passed: {len(audited)} of {len(deps)} pinned packages have no known vulnerabilities")
endef
export AUDIT_PY

audit: setup
	@$(PY) -c "$$AUDIT_PY"

# The 3-seed results table pasted in README.md and docs/training-results.md (about 20 minutes on 2 cores).
# DEVICE=cuda: the GPU rows instead (bench.gpu_train: cnn 1 seed, resnet 3 seeds; needs CUDA), and with
# GPU_JSON=file only the rows rendered from a JSON that bench.gpu_train wrote on the device machine.
.PHONY: results gpu-bundle
results: setup data
	$(PY) -m $(if $(filter cuda%,$(DEVICE)),bench.gpu_train $(if $(GPU_JSON),--render $(GPU_JSON)),bench.results_table)

# What a GPU machine without internet needs besides the tracked tree: the four Fashion-MNIST .gz files in
# an ignored folder that travels with it (docs/training-results.md, "GPU", has the command run there),
# and wheels of the serving stack for its Python 3.12 (it has torch, not BentoML). There:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target .site gpu-bundle/wheels/*.whl
#   PYTHONPATH=.site:. python3 -m bench.gpu_serve --artifacts-dir /tmp/gpu-art   (the serving check, issue 11)
GPU_BUNDLE := gpu-bundle
GPU_WHEELS := bentoml|pydantic|prometheus-client|starlette|uvicorn|httpx
gpu-bundle: data
	mkdir -p $(GPU_BUNDLE)/fashion-mnist
	cp $(addprefix $(if $(DATA_DIR),$(DATA_DIR),$(FMNIST))/,train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
		t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz) $(GPU_BUNDLE)/fashion-mnist/
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $(GPU_BUNDLE)/wheels \
		$$(grep -E '^($(GPU_WHEELS))==' requirements.txt)
	@du -sh $(GPU_BUNDLE)
