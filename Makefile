# evalfabric — all set-up happens here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test soak bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

## the main job on the embedded default (cassette in $$FABRIC_HOME or the user cache dir)
demo: $(STAMP)
	$(VENV)/bin/fabric demo

## the default suite (no soaks); pytest's exit 5 (no tests collected) is not a failure
test: $(STAMP)
	$(PY) -m pytest -q -m "not soak" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

## long soaks (the `soak` marker), then the default suite drawing fresh hypothesis examples
soak: $(STAMP)
	$(PY) -m pytest -q -m soak $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
	FABRIC_HYPOTHESIS=explore $(PY) -m pytest -q -m "not soak" $(PYTEST_ARGS)

## every benchmark, one table of ratios against raw floors measured in the same run
bench: $(STAMP)
	$(VENV)/bin/fabric bench --json bench.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
