# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment (.venv, unless one is
# active), the package with its test extra, then the job. Re-installs only when setup.py changes.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.mthl-ds-installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(BIN)/python:
	python3 -m venv $(VENV)

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mthl-ds demo --out runs/demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf runs .pytest_cache
