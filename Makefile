# `make test` and `make run` work on a fresh clone: each sets up what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := .cache/demo

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: it comes from the local wheel; a range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(STAMP)

$(DEMO)/model/config.json: | $(STAMP)
	$(VENV)/bin/dlora model make-tiny --out $(DEMO) --adapters 4

run: $(STAMP) $(DEMO)/model/config.json
	$(VENV)/bin/dlora generate --model $(DEMO)/model \
		--lora lora-0=$(DEMO)/adapters/lora-0 --lora lora-1=$(DEMO)/adapters/lora-1 \
		--lora lora-2=$(DEMO)/adapters/lora-2 --lora lora-3=$(DEMO)/adapters/lora-3 \
		--input examples/requests.jsonl --output $(DEMO)/outputs.jsonl
	cat $(DEMO)/outputs.jsonl

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	mkdir -p bench-results
	$(VENV)/bin/dlora bench engine --preset small --json bench-results/engine.json
	$(VENV)/bin/dlora bench policy --preset small --json bench-results/policy.json

clean:
	rm -rf $(VENV) .cache bench-results
