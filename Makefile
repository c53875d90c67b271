# slimserve: `make test` and `make demo` work on a fresh machine (Python 3.11, no GPU).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/tiny.yaml
STAMP := $(VENV)/.installed

.PHONY: venv test demo artifacts lint format clean-artifacts help

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# [cpu] = onnxruntime; the GPU image builds with EXTRAS=dev,gpu (onnxruntime-gpu instead).
EXTRAS ?= dev,cpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install slimserve[dev,cpu] (EXTRAS=dev,gpu: onnxruntime-gpu instead)

test: $(STAMP)  ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q

artifacts: $(STAMP)  ## build the default profile's variants (slimserve build)
	$(BIN)/slimserve build --config $(CONFIG) --report-dir reports

demo: artifacts  ## build the tiny profile, then serve it (:8000) with the dashboard (:8501)
	@echo "serving on http://127.0.0.1:8000 (OpenAI API), dashboard on http://127.0.0.1:8501; Ctrl-C stops both"
	$(BIN)/python -m deployments.preflight serve_config.yaml
	$(BIN)/serve run serve_config.yaml & serve_pid=$$!; \
	trap 'kill $$serve_pid 2>/dev/null; wait $$serve_pid 2>/dev/null' EXIT INT TERM; \
	$(MAKE) --no-print-directory dashboard

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## ruff format + autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-artifacts:  ## remove built artifacts (keeps .venv)
	rm -rf artifacts

.PHONY: dashboard screenshots

dashboard: $(STAMP)  ## the Streamlit dashboard on :8501 (SLIMSERVE_URL = the ingress, default :8000)
	$(BIN)/streamlit run dashboard/app.py --server.headless true --server.port 8501 \
		--browser.gatherUsageStats false --client.toolbarMode minimal

screenshots: artifacts  ## regenerate docs/screenshots/ from the browser test (needs chromium)
	test -x /usr/bin/chromium || test -n "$$SLIMSERVE_CHROMIUM" || \
		{ echo "no Chromium: apt-get install -y chromium"; exit 1; }
	SLIMSERVE_SCREENSHOTS=1 SLIMSERVE_E2E_CONFIG=$(CONFIG) SLIMSERVE_E2E_ARTIFACTS=artifacts \
		$(BIN)/python -m pytest -q tests/dashboard/test_e2e_browser.py

.PHONY: serve

# The preflight stops a HAProxy that a crashed Serve left holding :8000 (and names anything
# else on Serve's ports) before `serve run` trips over it: deployments/preflight.py.
serve: $(STAMP)  ## serve every built variant: OpenAI-compatible API on :8000 (serve_config.yaml)
	$(BIN)/python -m deployments.preflight serve_config.yaml
	$(BIN)/serve run serve_config.yaml

.PHONY: docker kuberay test-cluster

DOCKER_TARGET ?= cpu
BUILD_ARTIFACTS ?= false

docker:  ## build the image slimserve:$(DOCKER_TARGET) (cpu | gpu; BUILD_ARTIFACTS=true bakes tiny in)
	docker build --target $(DOCKER_TARGET) --build-arg BUILD_ARTIFACTS=$(BUILD_ARTIFACTS) \
		-t slimserve:$(DOCKER_TARGET) .

kuberay: $(STAMP)  ## regenerate deploy/kuberay/rayservice.yaml's serveConfigV2 from serve_config.yaml
	$(BIN)/python deploy/gen_rayservice.py

test-cluster: $(STAMP)  ## two Ray nodes on this machine: 2 training workers, 2 replicas (~2 min)
	$(BIN)/python -m pytest -q -m cluster tests/cluster

.PHONY: reliability

SOAK_S ?= 600
RELIABILITY_ARTIFACTS ?=
RELIABILITY_QUICK ?=

# With RELIABILITY_ARTIFACTS (a folder already built) the build step is skipped.
reliability: $(if $(RELIABILITY_ARTIFACTS),$(STAMP),artifacts)  ## faults under load, channel cut, pre-auth flood, overload, soak (SOAK_S=600), hostile input, restart after a crash -> reports/reliability.{json,md} (RELIABILITY_QUICK=1: ~5 min)
	RELIABILITY_QUICK=$(RELIABILITY_QUICK) $(BIN)/python -m reliability.run --config $(CONFIG) \
		$(if $(RELIABILITY_ARTIFACTS),--artifacts-dir $(RELIABILITY_ARTIFACTS)) \
		$(if $(RELIABILITY_QUICK),,--soak-s $(SOAK_S))

.PHONY: bench

bench: $(STAMP)  ## benchmarks on the built variants -> reports/ (variants, Serve vs baseline race, GPU)
	$(BIN)/slimserve bench all --config $(CONFIG)

.PHONY: bench-peers

PEERS_ARGS ?=

# vLLM gets its own venv (.venv-vllm/, reused once installed): its CPU wheel pins its own torch
# and an older transformers. PEERS_ARGS passes options, e.g. "--concurrency 1 4 --no-big".
bench-peers: $(STAMP)  ## slimserve vs vLLM, llama-server, the Flask baseline (+ CTranslate2 in process), same weights -> reports/bench_peers.*
	$(BIN)/python -m bench.peers --config $(CONFIG) $(PEERS_ARGS)

.PHONY: llama-server

LLAMA_JOBS ?= 2

# llama.cpp's server, a bench-peers peer: built from the source vendored in the llama-cpp-python
# sdist (pip download) into .cache/llama.cpp/ (git-ignored), ~14 min with -j2 on 2 cores, then
# reused (a stamp names the source version). bench-peers builds it too when it is missing.
llama-server: $(STAMP)  ## build llama.cpp's llama-server into .cache/llama.cpp/ for bench-peers (LLAMA_JOBS=2)
	$(BIN)/python -m bench.peer_llamacpp build --jobs $(LLAMA_JOBS)

.PHONY: smoke-gpt2

# configs/gpt2.yaml offline on the CPU: local stand-ins for the hub, a few thousand tokens per
# step; every CPU variant built, served (serve_config.yaml) and probed. Needs ~16 GiB free.
smoke-gpt2: $(STAMP)  ## the GPT-2 profile end to end, offline, CPU (<= 25 min) -> reports/gpt2_smoke.{json,md}
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -m gpt2_smoke tests/bench/test_gpt2_smoke.py

.PHONY: gpu-smoke

# No Ray and no install step: the GPU machine's Python with torch, transformers, onnx,
# onnxruntime(-gpu) and pydantic (tensorrt optional); .venv's when there is one.
GPU_SMOKE_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-smoke:  ## GPU smoke run: PASS / FAIL / SKIP per GPU path -> reports/gpu_smoke.{json,md} (<= 8 min)
	PYTHONPATH=. $(GPU_SMOKE_PY) -m bench.gpu_smoke --out reports

.PHONY: eval

EVAL_ARGS ?=

# lm-evaluation-harness is the optional [eval] extra, installed on first use. EVAL_ARGS passes
# options, e.g. "--url http://127.0.0.1:8000" (a running ingress) or "--only student".
eval: $(STAMP)  ## lm-eval on every served variant, API vs in-process, quality for speed -> reports/eval.{json,md,png}
	$(BIN)/python -c "import lm_eval" 2>/dev/null || $(BIN)/pip install -q -e '.[eval]'
	$(BIN)/python -m bench.eval --config $(CONFIG) $(EVAL_ARGS)
