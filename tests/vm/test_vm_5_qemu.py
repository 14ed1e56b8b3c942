"""labkit's box under plain QEMU: user networking with restrict=on, nothing off the guest's network.

One guest (1 vCPU, QEMU TCG, no libvirt, no Vagrant) boots the box's image through an
overlay; its host key is pinned from its console; over Paramiko (127.0.0.1, the only
forwarded port) it shows no default route, and a TCP listener of this machine's
loopback, which QEMU's user network would hand the guest at 10.0.2.2 without
``restrict=on``, is not reachable from it.  At the end no QEMU process is left.
"""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from labkit.vm.qemu import QemuGuest
from tests.vm.conftest import VM_WORK, timed

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guest(machine_before, built_box):
    """A plain QEMU guest of labkit's box, up and answering over SSH."""
    vm = QemuGuest(built_box.directory, VM_WORK / "qemu", cpus=1, memory=1024)
    try:
        with timed("plain QEMU boot to SSH"):
            vm.start()
            vm.host()
        yield vm
    finally:
        with timed("plain QEMU stop"):
            pid = vm.pid
            vm.stop()
    assert pid is None or subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert subprocess.run(["pgrep", "-f", str(vm.disk)], capture_output=True).returncode != 0


def test_qemu_runs_the_guest_with_restricted_user_networking(guest):
    cmdline = open(f"/proc/{guest.pid}/cmdline", "rb").read().split(b"\0")
    netdev = cmdline[cmdline.index(b"-netdev") + 1].decode()
    assert netdev == f"user,id=net0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:{guest.port}-:22"
    assert guest.host().run(["uname", "-r"], timeout=60).stdout.startswith("6.1.")


def test_the_guest_has_no_route_off_its_network_and_cannot_reach_this_machine(guest):
    host = guest.host()
    assert host.run(["ip", "-4", "route", "show", "default"], timeout=60).stdout.strip() == ""
    assert host.run(["ip", "-6", "route", "show", "default"], timeout=60).stdout.strip() == ""
    unreachable = host.run(["ip", "route", "get", "192.0.2.1"], timeout=60, check=False)
    assert not unreachable.ok and "unreachable" in unreachable.stderr.lower()
    # a listener on this machine's loopback: QEMU's user network maps 10.0.2.2 to it
    # unless restricted; the guest's attempt must not arrive
    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(20)
        port = server.getsockname()[1]

        def accept():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass
        waiter = threading.Thread(target=accept)
        waiter.start()
        tried = host.run(["timeout", "15", "bash", "-c", f"echo hi > /dev/tcp/10.0.2.2/{port}"],
                         timeout=60, check=False)
        waiter.join()
    assert not tried.ok
    assert accepted == []
