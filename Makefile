# The two commands of the README.  Each does all the set-up it needs (as root on
# a Debian-like machine: Debian packages, then .venv) and is quick when done.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: lab notebook test unit test-vm setup-lab setup-test setup-vm clean-lab

lab: setup-lab
	$(VENV)/bin/labkit doctor
	$(VENV)/bin/labkit replay --profile lab

notebook: setup-lab
	$(VENV)/bin/labkit notebook

# the whole suite; the vm tier (real VMs under QEMU, see docs/vagrant.md) beside the rest
# (scripts/test.sh)
test: setup-vm
	@bash scripts/test.sh

# the vm tier alone, the cluster too: builds labkit's box (cached in /var/cache/labkit/box),
# boots real VMs under QEMU TCG with the lab's own libvirt
test-vm: setup-vm
	$(VENV)/bin/python -m pytest -q -m vm tests/vm

unit: setup-test
	$(VENV)/bin/python -m pytest -q tests/unit

setup-lab:
	@bash scripts/setup.sh lab

setup-test:
	@bash scripts/setup.sh test

setup-vm:
	@bash scripts/setup.sh vm

clean-lab: setup-lab
	$(VENV)/bin/labkit clean
