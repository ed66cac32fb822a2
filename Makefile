# The two commands of the README:
#   make reproduce   install, then run the main job on the offline default corpus
#   make test        install, then run the test suite (offline)
PYTHON ?= python3
TORCH  ?= torch==2.13.0

.PHONY: install reproduce test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

reproduce: install
	$(PYTHON) -m trime reproduce

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/run
