# One-word entries. `make test` and `make demo` work on a fresh clone: they create .venv if absent.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench app browser

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,app]'
	touch $(STAMP)

install: $(STAMP)

# tests/test_app.py drives Debian's chromium (never a downloaded browser): installed where we run as
# root with apt-get (CI); elsewhere the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser tests will skip"

test: $(STAMP) browser
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m scripts.demo

# the web app on the models `make demo` trained; others: make app APP_ARGS="--lvm DIR --tokenizer DIR"
app: $(STAMP)
	$(PY) -m scripts.app $(APP_ARGS)

bench: $(STAMP)
	$(PY) bench/tokenizer.py
