# Two entry points: `make demo` (the simulated demo consortium) and `make test`.
# Both create .venv on first use and install the package with a CPU build of torch.
# GPU sites: make demo TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/fl-sim --consortium sites/demo/consortium.yaml $(DEMO_ARGS)

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .work
