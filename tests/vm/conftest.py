"""The vm tier: real VMs booted here (QEMU TCG under the lab's own libvirt, Vagrant, labkit's box).

Run alone with ``make test-vm`` (``pytest -m vm tests/vm``); ``make test`` deselects it
(``-m 'not vm'`` in pyproject).  Each test skips, naming the reason, where VMs truly
cannot run: not root, a program or the vagrant-libvirt plugin missing, or a libvirtd
that labkit did not start already running here.

Every test module that boots anything checks at its end that the machine is as it
was: the same ``iptables-save``/``ip6tables-save``/``nft list ruleset``, no namespace,
daemon, domain, network, volume or folder of libvirt's.  The time of each phase (box
build, libvirt start, ``vagrant up``, tests, teardown) is printed at the end of the run
and kept in ``/var/cache/labkit/vm/timings.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need_program, need_root

VM_WORK = Path(os.environ.get("LABKIT_VM_WORK", "/var/cache/labkit/vm"))
TIMINGS: dict[str, float] = {}
NOTES: list[str] = []  # what the tier measured besides time, printed at the end


def pytest_configure(config):
    """INT and TERM end the tier through its fixtures' teardown (VMs destroyed, libvirt stopped):
    ``make test`` starts it in the background, where a shell has it ignore INT, and CI ends
    overrunning jobs with TERM."""
    if config.getoption("markexpr", "") and "not vm" not in config.getoption("markexpr", ""):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def need_vms() -> None:
    """Skip unless real VMs can run here (root, QEMU, libvirt, Vagrant with vagrant-libvirt)."""
    need_root()
    need_program("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd", "virsh", "dnsmasq",
                 "vagrant", "debootstrap", "mkfs.ext4", "unshare")
    if subprocess.run(["dpkg-query", "-W", "-f=${Status}", "vagrant-libvirt"], capture_output=True,
                      text=True).stdout.find("ok installed") < 0:
        pytest.skip("needs the vagrant-libvirt plugin (make test-vm installs it)")
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        pytest.skip("needs the libvirt-qemu user (scripts/setup.sh vm makes it)")
    if Path("/run/libvirt/libvirt-sock").exists() and not Path("/run/labkit/vm/state.json").exists():
        pytest.skip("a libvirtd that labkit did not start runs here; the vm tier runs its own")


def timed(name: str):
    """A context manager adding the seconds of its block to ``TIMINGS[name]``."""
    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            TIMINGS[name] = round(TIMINGS.get(name, 0.0) + time.monotonic() - self.start, 1)
    return _Timer()


def firewall() -> dict[str, str]:
    """The machine's own packet filter rules, without comments and counters."""
    out = {}
    for name, argv in (("iptables", ["iptables-save"]), ("ip6tables", ["ip6tables-save"]),
                       ("nft", ["nft", "list", "ruleset"])):
        if shutil.which(argv[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            text = subprocess.run(argv, capture_output=True, text=True).stdout
            out[name] = "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines()
                                  if not line.startswith("#"))
    return out


def machine_traces() -> dict[str, object]:
    """What a libvirt left behind would show: namespaces, daemons, folders."""
    procs = subprocess.run(["ps", "-eo", "comm="], capture_output=True, text=True).stdout.split()
    return {
        "netns": sorted(n for n in os.listdir("/run/netns") if n == "labkit-vm") if os.path.isdir("/run/netns") else [],
        "daemons": sorted(p for p in procs if p in ("libvirtd", "virtlogd", "dnsmasq") or p.startswith("qemu-system")),
        "dirs": sorted(d for d in ("/run/libvirt", "/var/lib/libvirt", "/etc/libvirt/qemu", "/var/lib/labkit/vm-pool")
                       if os.path.exists(d)),
    }


@pytest.fixture(scope="session")
def machine_before():
    """The machine's firewall and libvirt traces before the tier touched anything."""
    need_vms()
    return {"firewall": firewall(), "traces": machine_traces()}


@pytest.fixture(scope="session")
def built_box():
    """labkit's box, built now or found in the cache (``TIMINGS['box build']``)."""
    need_vms()
    from labkit.vm.box import build_box

    with timed("box build"):
        built = build_box()
    for step, seconds in built.seconds.items():
        TIMINGS[f"  box: {step}"] = seconds
    return built


def assert_machine_as_before(before: dict) -> None:
    """The machine's own tables and libvirt traces are what they were."""
    assert firewall() == before["firewall"], "the machine's own packet filter rules changed"
    assert machine_traces() == before["traces"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the vm tier's time split, and keep it in the cache folder."""
    if not TIMINGS:
        return
    terminalreporter.section("vm tier: time split (s)")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{name:28s} {seconds:8.1f}")
    for note in NOTES:
        terminalreporter.write_line(note)
    try:
        VM_WORK.mkdir(parents=True, exist_ok=True)
        (VM_WORK / "timings.json").write_text(json.dumps({"seconds": TIMINGS, "notes": NOTES}, indent=1) + "\n")
    except OSError as exc:
        terminalreporter.write_line(f"(timings not kept: {exc})")
