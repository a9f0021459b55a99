# One entry point for the common chores. Everything runs from the project's own virtualenv (.venv).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install proto test lint model demo

# torch goes first, pinned, and the CPU build: PyPI's Linux build of torch 2.13.0 is the CUDA one (several
# GB, and it needs another triton than the dev extra's). PyTorch's CPU index has 2.13.0+cpu, which pip
# prefers to PyPI's 2.13.0; the build machines, which cannot reach that index, have the file on disk. The
# engine extra's looser torch requirement is then already satisfied. torch alone is looked up there; its
# dependencies come from PyPI (the second command).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-deps torch==2.13.0 --extra-index-url $(TORCH_CPU_INDEX)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[all,dev]"

# Regenerate the committed Python stubs from protos/ (tests/test_protos.py checks they are current).
proto:
	$(PY) -m grpc_tools.protoc -I protos --python_out=clients/python --pyi_out=clients/python \
		--grpc_python_out=clients/python protos/pagoda/v1/*.proto

test:
	$(PY) -m pytest

lint:
	$(VENV)/bin/ruff check

# Fetch the default model (SmolLM2-135M-Instruct) into ~/.cache/pagoda/models.
model:
	$(VENV)/bin/pagoda-fetch-model

# The README's first command: install (when .venv is missing), fetch the default model, start an engine on the
# CPU and the tokenizer service on loopback, stream a chat answer, stop both (clients/python/pagoda_client/demo.py).
demo: | $(PY)
	$(PY) -m pagoda_client.demo

$(PY):
	$(MAKE) install
