# The two commands of the README.  Each does all the set-up it needs (as root on
# a Debian-like machine: Debian packages, then .venv) and is quick when done.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: lab notebook test unit setup-lab setup-test clean-lab

lab: setup-lab
	$(VENV)/bin/labkit doctor
	$(VENV)/bin/labkit replay --profile lab

notebook: setup-lab
	$(VENV)/bin/labkit notebook

test: setup-test
	$(VENV)/bin/python -m pytest -q tests

unit: setup-test
	$(VENV)/bin/python -m pytest -q tests/unit

setup-lab:
	@bash scripts/setup.sh lab

setup-test:
	@bash scripts/setup.sh test

clean-lab: setup-lab
	$(VENV)/bin/labkit clean
