# The two commands a fresh machine needs: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo table install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev,deploy]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) benchmarks/digits_table.py --profile demo
	$(PY) benchmarks/digits_table.py --profile demo-text

table: $(STAMP)
	$(PY) benchmarks/digits_table.py

clean-venv:
	rm -rf $(VENV)
