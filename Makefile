# kldb-boundary: `make demo` runs the main job, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the builds this project is tested with; the package itself takes ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help install test lint demo clean

help:
	@echo "make demo   - generate prompt-only vs KLDB-guided digits on the CPU (outputs/demo)"
	@echo "make test   - create .venv if needed, install, run ruff and the whole test suite"
	@echo "make lint   - ruff check"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collected no tests; that is a failure of the suite, reported as such.
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -n 2 --dist loadfile -q; \
	status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$status

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m kldb.demo

clean:
	rm -rf outputs .pytest_cache .ruff_cache
