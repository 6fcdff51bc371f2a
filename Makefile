# Two commands a new user needs: `make demo` (the main job on the embedded default) and
# `make test`. Both create .venv and install the project first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The torch build to install first. These versions lie on the build machines' local disk;
# on a GPU cluster pick the build for your CUDA driver, e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: test demo gpu-check install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/r2d3ray demo

# On a CUDA machine: gsplat parity, GPU render timings, DiffSplat-size memory/time (benchmarks/README.md).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out outputs/gpu_check.json

clean-venv:
	rm -rf $(VENV)
