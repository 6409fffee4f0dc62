# icl-lab: every target sets up the project virtualenv first (idempotent: re-runs only when pyproject changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
OUT    ?= runs
EXTRAS ?= dev,tl,sweep,wandb
# The current TransformerLens line (4.x) in a virtualenv of its own: the default one keeps 3.9 (the user's code).
TL4_VENV  ?= .venv-tl4
TL4_STAMP := $(TL4_VENV)/.setup-done

.PHONY: setup test test-slow test-tl4 browser lint demo demo-quick bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# TransformerLens interop on the 4.x line (tests/test_tl.py; its 3.x tests skip there, saying so).
test-tl4: $(TL4_STAMP)
	$(TL4_VENV)/bin/python -m pytest tests/test_tl.py

$(TL4_STAMP): pyproject.toml constraints.txt
	test -x $(TL4_VENV)/bin/python || $(PYTHON) -m venv $(TL4_VENV)
	$(TL4_VENV)/bin/python -m pip install -q --upgrade pip
	$(TL4_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TL4_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[dev,tl4]'
	touch $(TL4_STAMP)

# A headless browser for the HTML report test (tests/studies/test_low_diversity.py; it skips, saying why, without
# one): chromium and chromedriver, from apt-get where they are missing (as root, or through sudo). Idempotent.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then \
		echo "browser: chromium and chromedriver are installed"; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "browser: install chromium (or chromium-browser) and chromedriver on PATH with your package manager"; \
		exit 1; \
	fi

lint: setup
	$(BIN)/ruff check src tests benchmarks examples

# The main job: the low-diversity study (M = 1, 2 on the user's seed model), figures and an HTML report.
demo: setup
	$(BIN)/icl-lab study low-diversity --out $(OUT)/low-diversity

demo-quick: setup
	$(BIN)/icl-lab study low-diversity --quick --out $(OUT)/low-diversity-quick

bench: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/llc_speed.py

clean-venv:
	rm -rf $(VENV) $(TL4_VENV)
