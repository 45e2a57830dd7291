# kldb-boundary: `make demo` runs the main job, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the builds this project is tested with; the package itself takes ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# The second environment: diffusers, transformers, huggingface_hub, accelerate and safetensors at the floors that
# pyproject.toml declares (.ci/floors.py writes them as pip constraints), torch from the same pins.
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
# The tests run again at the floors: the pipeline and its diffusers contracts, the guidance callback, loading (folders,
# the Hub layout, the digits world, the classifier component, community loading), the Hub tools and the sweep under
# accelerate.
COMPAT_TESTS := tests/test_pipeline.py tests/test_diffusers_contract.py tests/test_options.py tests/test_errors.py \
	tests/test_guidance_callback.py tests/test_step_control.py tests/test_loading.py tests/test_loading_paths.py \
	tests/test_digits_world.py \
	tests/test_classifier_component.py tests/test_community.py tests/test_hub.py tests/test_accelerate.py

.PHONY: help install test test-install test-compat lint demo clean

help:
	@echo "make demo   - generate prompt-only vs KLDB-guided digits on the CPU (outputs/demo)"
	@echo "make test   - create .venv if needed, install, run ruff and the whole test suite"
	@echo "make test-install - build the wheel, install it with no extras into a fresh venv, run kldb demo outside the checkout"
	@echo "make test-compat - build .venv-compat with the declared floors of the Hugging Face stack, run the pipeline, callback, loading and hub tests there"
	@echo "make lint   - ruff check"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test,app]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collected no tests; that is a failure of the suite, reported as such.
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -n 2 --dist loadfile -q --durations=30; \
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

$(COMPAT_STAMP): pyproject.toml .ci/floors.py
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q $(TORCH_PINS)
	$(COMPAT_PY) .ci/floors.py > $(COMPAT_VENV)/floors.txt
	$(COMPAT_PY) -m pip install -q -c $(COMPAT_VENV)/floors.txt -e ".[test]"
	$(COMPAT_PY) -m pip check
	touch $(COMPAT_STAMP)

# The floors proven: COMPAT_TESTS in .venv-compat. pytest's exit 5 (no tests collected) is a failure, as in `test`.
test-compat: $(COMPAT_STAMP)
	@start=$$(date +%s); \
	echo "test-compat at: $$($(COMPAT_PY) -m pip list --format=freeze | grep -iE '^(torch|torchvision|diffusers|transformers|huggingface.hub|accelerate|safetensors)==' | tr '\n' ' ')"; \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(COMPAT_PY) -m pytest -n 2 --dist loadfile -q $(COMPAT_TESTS); \
	status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests (exit 5): failing"; exit 1; fi; \
	echo "test-compat: pytest exited $$status in $$(( $$(date +%s) - start )) s"; \
	exit $$status

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m kldb.demo

clean:
	rm -rf outputs .pytest_cache .ruff_cache
