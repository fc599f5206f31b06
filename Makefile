# Two commands: `make train` (set up, then train the example language model) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup train demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $$(scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

train: setup
	$(PY) examples/train_lm.py $(ARGS)

# Test files spread over the cores (pytest-xdist; one file per worker keeps module fixtures once).
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile $(ARGS)

clean:
	rm -rf $(VENV) runs
