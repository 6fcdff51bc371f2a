# Two commands a new user needs: `make demo` (the main job on the embedded default) and
# `make test`. Both create .venv and install the project first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The torch build to install first. These versions lie on the build machines' local disk;
# on a GPU cluster pick the build for your CUDA driver, e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: test demo compare gpu-check cluster-rehearsal install clean-venv

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

# Every algorithm on one budget, 2 seeds each, one MLflow experiment; writes outputs/compare/ (26 min on 2 idle CPU cores).
compare: $(STAMP)
	$(BIN)/r2d3ray compare

# On a CUDA machine: gsplat parity, GPU render timings, DiffSplat-size memory/time (benchmarks/README.md).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out outputs/gpu_check.json

# A three-node Ray cluster and an MLflow server on this machine: the reward plane and two training
# jobs through the Jobs API, a trainer node and a reward replica killed mid-run (benchmarks/README.md).
cluster-rehearsal: $(STAMP)
	$(BIN)/python benchmarks/cluster_rehearsal.py --out outputs/cluster_rehearsal.json

clean-venv:
	rm -rf $(VENV)
