# Quick start: `make demo` then `make test`. Both create their own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test install install-dev bench accuracy clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -e .

install-dev: $(BIN)/python
	DS_BUILD_OPS=0 $(PIP) install --quiet -c constraints.txt -e '.[train,aws,skypilot,deepspeed,test]'

demo: install
	$(BIN)/ftplan estimate llama2-7b
	$(BIN)/ftplan estimate llama3-8b --method qlora --instance g5.xlarge
	$(BIN)/ftplan recommend llama2-7b --tokens 20M --budget 50 --yes --force -o build/demo-plan.yaml
	$(BIN)/ftplan plan show build/demo-plan.yaml

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/recommend.py

clean:
	rm -rf $(VENV) build dist *.egg-info

accuracy: install-dev
	$(BIN)/python benchmarks/accuracy.py
