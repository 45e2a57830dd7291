# kldb-boundary: `make demo` runs the main job, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the builds this project is tested with; the package itself takes ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help install test test-install lint demo clean

help:
	@echo "make demo   - generate prompt-only vs KLDB-guided digits on the CPU (outputs/demo)"
	@echo "make test   - create .venv if needed, install, run ruff and the whole test suite"
	@echo "make test-install - build the wheel, install it with no extras into a fresh venv, run kldb demo outside the checkout"
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

# A plain install, as users install it: the wheel with no extras in a fresh venv (torch from the pins), then
# `kldb demo` on the packaged digits world from a folder outside the checkout, and `kldb sweep` naming the extra it
# needs. Everything lives in a temporary folder that is removed afterwards.
test-install: $(STAMP)
	@set -eu; \
	work=$$(mktemp -d "$${TMPDIR:-/tmp}/kldb-install-check.XXXXXX"); \
	trap 'rm -rf "$$work"' EXIT; \
	start=$$(date +%s); \
	rm -rf build; \
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w "$$work/dist" . ; \
	rm -rf build; \
	$(PYTHON) -m venv "$$work/venv"; \
	"$$work/venv/bin/python" -m pip install -q $(TORCH_PINS); \
	"$$work/venv/bin/python" -m pip install -q "$$work"/dist/kldb_boundary-*.whl; \
	installed=$$(date +%s); \
	mkdir "$$work/outside"; cd "$$work/outside"; \
	export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1; \
	"$$work/venv/bin/kldb" demo --out demo --num-images 4 --steps 20; \
	test -s demo/grid.png && test -s demo/report.json; \
	grep -q '"world": "digits world"' demo/report.json || { echo "kldb demo did not run on the packaged digits world"; exit 1; }; \
	status=0; "$$work/venv/bin/kldb" sweep --out sweep-run 2> sweep.err || status=$$?; \
	if [ $$status -ne 2 ] || ! grep -q 'pip install "kldb-boundary\[audit\]"' sweep.err; then \
		echo "kldb sweep without the audit extra should exit 2 naming it, but exited $$status:"; cat sweep.err; exit 1; \
	fi; \
	echo "test-install: wheel built and installed with no extras in $$((installed - start)) s; kldb demo ran outside the checkout; kldb sweep names the audit extra ($$(( $$(date +%s) - start )) s in all)"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m kldb.demo

clean:
	rm -rf outputs .pytest_cache .ruff_cache
