# Search-ranking serving bundle. Every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= default
ENCODER ?= int8
RANKER ?= compressed
POINTS ?= 0.5:0,0.35:2,0.25:3
# Written under build/, not docs/: `make demo` must not rewrite a tracked, curated doc.
ENCODER_REPORT ?= $(if $(filter default,$(PROFILE)),$(if $(filter int8,$(ENCODER)),build/reports/encoder_compression.md))
REPOSITORY ?= build/model_repository
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

# encoder-frontier: keep-FLOPs/layers vs fidelity vs speed, one table (POINTS=0.5:0,0.35:2,...)
.PHONY: encoder-frontier help venv client-wheel models serve demo test test-unit test-server bench bench-batching bench-latency bench-perf-analyzer bench-ranker loadtest \
	loadtest-distributed reliability bench-overload clean deploy-tools image-bundle image k8s-render \
	catalog bench-encoding bench-catalog bench-catalog-serving swap-catalog gpu-check

help:
	@echo "make demo     build models, start Triton, rank sample queries, stop"
	@echo "make test     run the test suite (unit + real-Triton server tests)"
	@echo "make client-wheel   build the client distribution (search-rank-client, Python >= 3.9) into build/dist"
	@echo "make models   build artifacts (PROFILE=default|ci, ENCODER=int8|fp32, RANKER=compressed|fp32) and render $(REPOSITORY);"
	@echo "              ENCODER=fp32 RANKER=fp32 serves the uncompressed pipeline under the same contract"
	@echo "              the default profile also writes the encoder compression report (build/reports/encoder_compression.md)"
	@echo "make catalog [CATALOG_INPUT=dir|glob CATALOG_OUTPUT=dir ACTORS=2 RAY_ADDRESS=host:port]   encode item titles"
	@echo "              with the served encoder on Ray Data (default input: the PROFILE's catalog); resumable (docs/catalog.md)"
	@echo "make bench-encoding [ITEMS=100000]   item-encoding throughput: one process vs Ray 1 and 2 actors, PASS/FAIL"
	@echo "make encoder-frontier [POINTS=0.5:0,0.35:2]   pruning budget vs fidelity vs speed (docs/encoder_frontier.md)"
	@echo "make serve    serve $(REPOSITORY) on ports $(HTTP_PORT)/$(GRPC_PORT)/$(METRICS_PORT) until Ctrl-C"
	@echo "              REPLICAS=N: N servers (ports +10 each); prints the balanced client target"
	@echo "              TLS_CERT=server.pem TLS_KEY=server.key [TLS_CLIENT_CA=ca.pem for mutual TLS]: gRPC over TLS;"
	@echo "              ADMIN_KEY_FILE=key.txt: admin endpoints need that key (docs/deploy.md)"
	@echo "make bench    the bundle vs a naive PyTorch gRPC service vs Triton FP32: latency, throughput at p99 <= 50 ms,"
	@echo "              CPU per request and per step, refusals at c4/c8, top-10 agreement, INT8 efficiency, perf_analyzer cross-check; PASS/FAIL (docs/BENCHMARKS.md)"
	@echo "make bench-batching   encoder batch / throughput / p99 per concurrency for several batching delays (docs/architecture.md)"
	@echo "make bench-latency   search_rank latency (100 and 1000 candidates) against a fresh local server"
	@echo "make bench-perf-analyzer   the same, cross-checked with Triton's perf_analyzer"
	@echo "make reliability   overload, stub-kill, restart, hot-swap, cancellation and shutdown scenarios (real servers)"
	@echo "make bench-overload   3x capacity with and without the queue policy, PASS/FAIL (docs/reliability.md)"
	@echo "make bench-catalog   bench-encoding + bench-catalog-serving: the catalog at scale, both halves (docs/catalog.md)"
	@echo "make bench-catalog-serving [CATALOG_SIZES=100000,1000000,10000000]   synthetic catalogs served by Triton:"
	@echo "              start-up, memory, 1000-candidate lookup, FP16 storage; PASS/FAIL at 10M (docs/catalog_scale.md)"
	@echo "make swap-catalog CATALOG=<artifact folder>   serve a new catalog version without a restart"
	@echo "make bench-ranker   ranker AUCs (ground truth, FP32, compressed) and ORT latency at 100/1000 candidates,"
	@echo "              PASS/FAIL against the targets (docs/ranker_benchmark.md for the default profile);"
	@echo "              RANKER_BASELINE=1 also trains the first MLP ranker on the same split for comparison"
	@echo "make loadtest [TARGET=host:port[,host:port...] USERS= DURATION= RATE= LOADTEST_PROFILE=cpu|gpu]"
	@echo "              Locust against TARGET (default: a local server on $(REPOSITORY)), checked against"
	@echo "              loadtests/targets.toml; non-zero exit on any FAIL; reports in build/loadtest/"
	@echo "make loadtest-distributed [WORKERS=2 ...]   the same with a Locust master and WORKERS workers"
	@echo "make image    stage the model bundle (build/image/bundle) and docker build deploy/docker/Dockerfile"
	@echo "make k8s-render OVERLAY=cpu|gpu   render the Kubernetes manifests (docs/deploy.md)"
	@echo "make gpu-check [GPU_CHECK_PROFILE=ci]   on a GPU node in the Triton container: build the engine, serve the"
	@echo "              GPU repository, check it against FP32, perf_analyzer at 1/8/32; report in build/reports/gpu_check.md"

venv: $(STAMP)

# Re-installs only when pyproject.toml changes. torch==2.13.0 resolves to the CPU build on local disk.
$(STAMP): pyproject.toml client/pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "error: $(PYTHON) is not Python 3.11 (the Triton python-backend stub is built for 3.11)"; exit 1; }
	@# The python-backend stub links the system libpython3.11; install it if this machine lacks it.
	@ldconfig -p | grep -q 'libpython3.11.so.1.0' || { apt-get update -qq && apt-get install -y -qq libpython3.11; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./client -e ".[models,dev,loadtest,deploy]"
	touch $(STAMP)

# The stages write a manifest of the served folders; the renderer reads only that (it needs neither
# torch nor conversion/, so a node that only serves can render: `python -m model_repository.render`).
MANIFEST ?= build/artifacts/served-$(PROFILE)-$(ENCODER)-$(RANKER).json
# EVAL_TEXTS=file: the encoder gate judges this file instead of the bundled broad set; DISTILL_TEXTS=file:
# texts added to distillation (docs/encoder_compression.md).
EVAL_TEXTS ?=
DISTILL_TEXTS ?=
models: $(STAMP)
	$(PY) -m conversion.build_models --profile $(PROFILE) --encoder $(ENCODER) $(if $(MODEL),--model $(MODEL)) \
		--ranker $(RANKER) $(if $(ENCODER_REPORT),--report-markdown $(ENCODER_REPORT)) --manifest $(MANIFEST) \
		$(if $(EVAL_TEXTS),--eval-texts $(EVAL_TEXTS)) $(if $(DISTILL_TEXTS),--distill-texts $(DISTILL_TEXTS))
	$(PY) -m model_repository.render --artifacts $(MANIFEST) --out $(REPOSITORY)

# REPLICAS=N > 1: N servers on HTTP_PORT+10*i (+1 gRPC, +2 metrics); it prints the client target
# (host:port,host:port) that SearchClient and `make loadtest TARGET=` balance over (deploy/replicas.py).
REPLICAS ?= 1
serve: models
ifeq ($(REPLICAS),1)
	$(PY) -m model_repository.triton_server --repository $(REPOSITORY) --host $(HOST) \
		--grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) \
		$(if $(TLS_CERT),--grpc-tls-cert $(TLS_CERT) --grpc-tls-key $(TLS_KEY)) \
		$(if $(TLS_CLIENT_CA),--grpc-tls-client-ca $(TLS_CLIENT_CA)) $(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE))
else
	$(PY) -m deploy.replicas --repository $(REPOSITORY) --replicas $(REPLICAS) --host $(HOST) --base-port $(HTTP_PORT)
endif

demo: models
	$(PY) -m model_repository.demo --repository $(REPOSITORY)

# The client distribution that backend services install (client/pyproject.toml): a wheel in build/dist.
client-wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation ./client -w build/dist
	@ls build/dist/search_rank_client-*.whl

test: $(STAMP) deploy-tools
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: $(STAMP) deploy-tools
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-server: $(STAMP)
	$(PY) -m pytest -m server $(PYTEST_ARGS)

# Overload, stub kill, server restart, rolling hot swap, cancellation, graceful shutdown: real servers,
# each scenario's numbers printed (-s). All of them also run in `make test` (CI), at these sizes.
reliability: $(STAMP)
	$(PY) -m pytest -m reliability -s $(PYTEST_ARGS)

# 3x the measured capacity against the served config, then against the same repository without
# the queue policy: PASS/FAIL on admitted p99 and refusal latency (docs/reliability.md).
bench-overload: models
	$(PY) -m loadtests.overload --repository $(REPOSITORY) --compare-unbounded --json build/reports/overload.json

# Item titles -> embedding shards with the served encoder on Ray Data (docs/catalog.md). A local Ray
# unless RAY_ADDRESS names a cluster; finished shards are skipped on a rerun.
CATALOG_INPUT ?=
CATALOG_OUTPUT ?=
ACTORS ?= 2
RAY_ADDRESS ?=
catalog: $(STAMP)
	$(PY) -m conversion.encode_items --profile $(PROFILE) --encoder $(ENCODER) --actors $(ACTORS) \
		$(if $(CATALOG_INPUT),--input "$(CATALOG_INPUT)") $(if $(CATALOG_OUTPUT),--output "$(CATALOG_OUTPUT)") \
		$(if $(RAY_ADDRESS),--address $(RAY_ADDRESS))

ITEMS ?= 100000
bench-encoding: $(STAMP)
	$(PY) -m loadtests.bench_item_encoding --profile $(PROFILE) --items $(ITEMS) --json build/reports/item_encoding.json \
		$(if $(filter default,$(PROFILE)),--markdown build/reports/item_encoding.md)

encoder-frontier: $(STAMP)
	$(PY) -m conversion.encoder_frontier --points $(POINTS) --markdown docs/encoder_frontier.md

# perf_analyzer comes with tritonclient 2.34's wheel, which pins an old client: its own venv.
PERF_VENV := .venv-perf
$(PERF_VENV)/.installed:
	@ldconfig -p | grep -q 'libb64.so.0d' || { apt-get update -qq && apt-get install -y -qq libb64-0d; }
	test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install -q "tritonclient[all]==2.34.0" nvidia-cuda-runtime-cu12
	touch $@

# The bundle side by side with a naive PyTorch service and Triton FP32 (docs/BENCHMARKS.md; other
# profiles write under build/reports). Exit 1 when a target fails.
BENCH_MARKDOWN ?= $(if $(filter default,$(PROFILE)),docs/BENCHMARKS.md,build/reports/BENCHMARKS-$(PROFILE).md)
bench: models $(PERF_VENV)/.installed
	$(PY) -m loadtests.side_by_side --profile $(PROFILE) --markdown $(BENCH_MARKDOWN) --json build/reports/side_by_side.json \
		--perf-analyzer $(PERF_VENV)/bin/perf_analyzer

# The encoder's average batch, throughput and p99 per concurrency for several batching delays
# (the table in docs/architecture.md, "Batching").
bench-batching: models
	$(PY) -m loadtests.batching --repository $(REPOSITORY)

bench-latency: models
	$(PY) -m loadtests.latency --repository $(REPOSITORY)

# Serving 1e5..1e7 items (synthetic artifacts, several GB at 10M, deleted afterwards): start-up, memory,
# lookup latency, FP16 storage's effect; PASS/FAIL at 10M items (docs/catalog_scale.md).
CATALOG_SIZES ?= 100000,1000000,10000000
bench-catalog-serving: models
	$(PY) -m loadtests.catalog_scale --sizes $(CATALOG_SIZES) --json build/reports/catalog_scale.json \
		$(if $(filter default,$(PROFILE)),--markdown docs/catalog_scale.md)

# Both halves of the catalog at scale, in one run: item encoding (Ray) and serving (1e5..1e7 items).
# Both always run; the exit status is 1 if either missed a target.
bench-catalog: models
	@e=0; $(MAKE) --no-print-directory bench-encoding || e=1; \
	$(MAKE) --no-print-directory bench-catalog-serving || e=1; exit $$e

# Serve a new catalog artifact from a running (or stopped) repository without a restart.
swap-catalog: $(STAMP)
	@test -n "$(CATALOG)" || { echo "error: CATALOG=<catalog artifact folder> is required"; exit 2; }
	$(PY) -m model_repository.catalog_store --repository $(REPOSITORY) --catalog $(CATALOG)

bench-ranker: models
	$(if $(RANKER_BASELINE),$(PY) -m conversion.train_ranker --profile $(PROFILE) --encoder $(ENCODER) --compare-baseline)
	$(PY) -m conversion.ranker_report --profile $(PROFILE) --encoder $(ENCODER) $(if $(RANKER_BASELINE),--compare-baseline) \
		$(if $(filter default,$(PROFILE)),$(if $(filter int8,$(ENCODER)),--markdown docs/ranker_benchmark.md))

bench-perf-analyzer: models $(PERF_VENV)/.installed
	$(PY) -m loadtests.latency --repository $(REPOSITORY) --perf-analyzer $(PERF_VENV)/bin/perf_analyzer

# Load tests (loadtests/README.md). Without TARGET a local server is started on $(REPOSITORY) (hence
# `models`); with TARGET the traffic is still generated from $(REPOSITORY)'s catalog unless CATALOG= names one.
# RATE switches to open loop (constant arrival rate, requests/s). Empty variables take the profile's load.
TARGET ?=
USERS ?=
DURATION ?=
RATE ?=
WORKERS ?= 2
CATALOG ?=
LOADTEST_PROFILE ?= cpu
LOADTEST_ARGS ?=
LOADTEST_CMD = $(PY) -m loadtests.run --repository $(REPOSITORY) --profile $(LOADTEST_PROFILE) \
	$(if $(TARGET),--target $(TARGET)) $(if $(CATALOG),--catalog $(CATALOG)) $(if $(USERS),--users $(USERS)) \
	$(if $(DURATION),--duration $(DURATION)) $(if $(RATE),--mode open --rate $(RATE)) $(LOADTEST_ARGS)

loadtest: $(STAMP) $(if $(TARGET),,models)
	$(LOADTEST_CMD)

loadtest-distributed: $(STAMP) $(if $(TARGET),,models)
	$(LOADTEST_CMD) --workers $(WORKERS)

# kubectl carries kustomize (the deploy tests render every overlay with it); Debian/Ubuntu's package.
deploy-tools:
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubectl; }
	@kubectl kustomize --help >/dev/null

# The model payload the image carries (ONNX, tokenizer, catalog; never engines), then the image.
IMAGE ?= search-rank-triton:dev
image-bundle: models
	$(PY) -m deploy.bundle --profile $(PROFILE) --encoder $(ENCODER) $(if $(MODEL),--model $(MODEL)) --out build/image/bundle

image: image-bundle
	@command -v docker >/dev/null || { echo "error: docker not found; the bundle is staged in build/image/bundle"; exit 1; }
	docker build -f deploy/docker/Dockerfile -t $(IMAGE) .

# Render a Kubernetes overlay (cpu|gpu) to stdout.
OVERLAY ?= gpu
k8s-render: deploy-tools
	kubectl kustomize deploy/k8s/overlays/$(OVERLAY)

# The first GPU node's one command (docs/tensorrt.md). The preflight runs with the system Python before
# anything is installed, so a machine without a GPU stops at once with one line naming what it lacks.
GPU_CHECK_PROFILE ?= ci
$(VENV)/.installed-gpu: $(STAMP)
	$(PY) -m pip install -q -e ./client -e ".[gpu]"
	touch $@

gpu-check:
	$(eval GPU_MISSING := $(shell $(PYTHON) -m deploy.gpu_check preflight 2>&1))
	$(if $(GPU_MISSING),$(error $(GPU_MISSING)))
	$(MAKE) --no-print-directory models PROFILE=$(GPU_CHECK_PROFILE) ENCODER=int8
	$(MAKE) --no-print-directory $(VENV)/.installed-gpu $(PERF_VENV)/.installed
	$(PY) -m deploy.gpu_check run --profile $(GPU_CHECK_PROFILE) --perf-analyzer $(PERF_VENV)/bin/perf_analyzer

clean:
	rm -rf build
