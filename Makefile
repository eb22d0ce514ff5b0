# Two entry points: `make run` (serve the default preset locally) and `make test` (the suite).
# Both create .venv and install the project into it first if needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install redis-server chromium run test clean

install: $(STAMP)

# Reinstall when the dependency list changes. The editable install means code edits need no reinstall.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	touch $(STAMP)

# `make run CONFIG=tiny` serves the preset that covers every modality (random weights).
CONFIG ?= shapes

run: install
	$(BIN)/omnistage serve --config $(CONFIG)

# `$(call apt_install,COMMAND,PACKAGE)`: succeeds if COMMAND is on PATH, or installs Debian's
# PACKAGE when run as root where apt-get exists; fails otherwise.
apt_install = command -v $(1) >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; }

# The cache tests start their own redis-server on loopback (with a password), so the binary must
# exist; Debian's package provides it.
redis-server:
	@$(call apt_install,redis-server,redis-server) || { \
	  echo "make test needs redis-server on PATH (Debian/Ubuntu: sudo apt-get install redis-server)" >&2; exit 1; }

# The playground tests drive a real headless Chromium. Where it cannot be installed they skip,
# saying so, rather than fail the suite.
chromium:
	@$(call apt_install,chromium,chromium) || \
	  echo "no chromium: the playground's browser tests will be skipped (Debian: sudo apt-get install chromium)" >&2

# The linter first (seconds, configured in pyproject.toml), then the suite.
test: install redis-server chromium
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
