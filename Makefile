# Every target creates what it needs: a venv in .venv with pinned installs (constraints.txt).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint format bench clean check-install check-install-oldest-torch

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# timm for the parity tests: --no-deps, since its torchvision pin would pull a CUDA build
	$(PY) -m pip install -q --no-deps timm==1.0.31 pillow==13.0.0
	touch $(STAMP)

demo: venv
	$(PY) -m flows.demo

test: venv
	$(PY) -m pytest -q

# The base install (no extras) in a clean venv, run over the real NeMo files (make test runs it too).
check-install:
	$(PYTHON) tests/install/check_install.py build/venv-base

# The same with the oldest supported torch. PyPI serves only CUDA builds of it for Linux (about
# 3 GB with their nvidia-* libraries); they run on the CPU. Not part of make test for that reason.
TORCH_OLDEST ?= torch==2.1.2
check-install-oldest-torch:
	$(PYTHON) tests/install/check_install.py build/venv-torch-oldest --torch '$(TORCH_OLDEST)'

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) bench/reshard_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo-out

# The local stack (deployments/README.md): Prefect server, moto S3, work pools, deployments,
# one worker per pool, all on 127.0.0.1; `make stop` stops exactly what `make serve` started.
STACK_ENV ?= $(or $(CKPT_STACK_DIR),deployments/.run)/env

.PHONY: serve stop demo-s3

serve: venv
	deployments/serve.sh

stop:
	deployments/stop.sh

demo-s3: venv
	@test -f $(STACK_ENV) || { echo "make demo-s3: no $(STACK_ENV); run make serve first" >&2; exit 1; }
	. $(abspath $(STACK_ENV)) && $(PY) -m flows.demo --s3
