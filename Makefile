# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-fast demo demo-xtok demo-seeds demo-xtok-seeds bench clean

install: $(STAMP)

# PyTorch's CPU wheel first (from this machine's disk), or pip pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,lm-eval]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q --durations=20

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/kv_task/demo.sh

# the demo with an augmenting model that reads the text through a tokenizer of its own (issue #24)
demo-xtok: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH XTOK=1 bash examples/kv_task/demo.sh

# the composition over 2 base-model seeds x 3 composition seeds: mean and spread in artifacts/kv_demo/seeds.md
demo-seeds: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/kv_task/seeds.sh

# the same for make demo-xtok: artifacts/kv_demo/seeds_xtok.md
demo-xtok-seeds: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH XTOK=1 bash examples/kv_task/seeds.sh

bench: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/run.py

clean:
	rm -rf runs artifacts .pytest_cache
