# The two commands of the README:
#   make reproduce   install, then run the main job on the offline default corpus
#   make test        install, then lint and run the test suite (offline) against the installed package
PYTHON ?= python3
TORCH  ?= torch==2.13.0

.PHONY: install reproduce test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q ".[dev,hf,ray]"

reproduce: install
	$(PYTHON) -m trime reproduce

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	@start=$$(date +%s); $(PYTHON) -m pytest -q; rc=$$?; \
	echo "make test: the suite took $$(( $$(date +%s) - start )) s"; exit $$rc

bench: install
	$(PYTHON) bench/run
