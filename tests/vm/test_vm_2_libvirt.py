"""The lab's libvirt: its own daemons in their own namespace, and nothing left when stopped."""

from __future__ import annotations

import subprocess

import pytest

from labkit.exceptions import VMError
from labkit.vm.libvirtd import LibvirtLab
from tests.vm.conftest import assert_machine_as_before, firewall, timed

pytestmark = pytest.mark.vm

ISOLATED = """<network><name>lkt-isolated</name><bridge name='lktbr0'/>
<ip address='192.168.125.1' netmask='255.255.255.0'><dhcp><range start='192.168.125.10' end='192.168.125.20'/></dhcp></ip>
</network>"""


def test_libvirt_runs_in_its_namespace_and_stopping_leaves_the_machine_as_found(machine_before, tmp_path):
    lab = LibvirtLab()
    with timed("libvirt start (test 2)"):
        lab.start()
    try:
        pid = int((lab.state_dir / "libvirtd.pid").read_text())
        where = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout
        assert where.strip() == "labkit-vm"
        assert "default" not in lab.inventory()["networks"]  # libvirt's NAT network is never started
        with pytest.raises(VMError, match="exists"):
            LibvirtLab().start()  # a second start is refused, the first one untouched
        assert lab.running
        xml = tmp_path / "net.xml"
        xml.write_text(ISOLATED)
        lab.virsh("net-define", str(xml))
        lab.virsh("net-start", "lkt-isolated")
        # the network's bridge and libvirt's chains are in the lab's namespace, not the machine's
        assert subprocess.run(["ip", "link", "show", "lktbr0"], capture_output=True).returncode != 0
        inside = subprocess.run(["ip", "netns", "exec", "labkit-vm", "iptables-save"], capture_output=True,
                                text=True).stdout
        assert "LIBVIRT_" in inside
        assert firewall() == machine_before["firewall"]
    finally:
        with timed("libvirt stop (test 2)"):
            removed = lab.stop()
    assert "network lkt-isolated" in removed and "netns labkit-vm" in removed
    assert_machine_as_before(machine_before)
