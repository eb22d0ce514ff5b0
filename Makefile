# Two entry points: `make run` (serve the default preset locally) and `make test` (the suite).
# Both create .venv and install the project into it first if needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install redis-server run test clean

install: $(STAMP)

# Reinstall when the dependency list changes. The editable install means code edits need no reinstall.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	touch $(STAMP)

run: install
	$(BIN)/omnistage serve --config shapes

# The cache tests start their own redis-server on loopback (with a password), so the binary must
# exist; Debian's package provides it.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "make test needs redis-server on PATH (Debian/Ubuntu: sudo apt-get install redis-server)" >&2; exit 1; \
	  fi; }

test: install redis-server
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
