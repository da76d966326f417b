# `make test` and `make demo` create the virtual environment from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.PHONY: test demo demo-quick
test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) demo.py

demo-quick: $(VENV)/.installed
	$(PY) demo.py --quick
