"""`vagrant up lab` with labkit's box under the lab's libvirt, driven from the host over Paramiko.

One module-scoped VM (2 CPUs, 2 GB, QEMU TCG): it boots from the box, answers over
Paramiko with its host key pinned, has no route off its isolated network, and runs
the netns testbed driven from the host (``labkit up/status/down --on vagrant:lab`` and
``labkit replay --on vagrant:lab`` of quick iterations 2 and 8).  Last, the VM is re-created: its new host key is refused.
At the end the VM, the daemons and the namespace are gone and the machine's own
tables are as before.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from labkit.exceptions import HostKeyError
from labkit.vm.guest import VagrantLab
from labkit.vm.libvirtd import LibvirtLab
from tests.vm.conftest import NOTES, VM_WORK, assert_machine_as_before, timed

pytestmark = pytest.mark.vm

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(machine_before, built_box, tmp_path_factory):
    """The lab VM up (``vagrant up lab``), as ``(libvirt, vagrant, host)``; all torn down after."""
    settings = yaml.safe_load((ROOT / "vagrant" / "settings.yaml").read_text())
    settings.update(box_source="local", storage_pool="labkit")
    path = tmp_path_factory.mktemp("vagrant") / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    libvirt = LibvirtLab()
    with timed("libvirt start"):
        libvirt.start()
    vagrant = VagrantLab(libvirt, VM_WORK, path)
    try:
        vagrant.forget_keys()  # pins of an earlier run's VM (same address, other key) would refuse this one
        with timed("vagrant box add"):
            vagrant.add_box(built_box.box, built_box.key)
        with timed("vagrant up lab (boot)"):
            vagrant.up("lab")
        with timed("pin key, first SSH"):
            host = vagrant.host("lab")
            host.run(["true"], timeout=60)
        yield libvirt, vagrant, host
    finally:
        with timed("teardown"):
            try:
                vagrant.destroy()
            finally:
                libvirt.stop()
        assert_machine_as_before(machine_before)


def test_the_lab_vm_boots_debian_12_and_answers_over_paramiko(lab):
    _, _, host = lab
    out = host.run("uname -r; hostname; cat /etc/machine-id; nproc; id -u", timeout=60).stdout.split()
    kernel, hostname, machine_id, cpus, uid = out
    assert kernel.startswith("6.1.")
    assert hostname == "lab"
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id)
    assert cpus == "2"
    assert uid == "0"  # driven as root through sudo, like a Vagrant node


def test_the_guest_has_no_route_off_its_isolated_network(lab):
    libvirt, _, host = lab
    assert host.run(["ip", "-4", "route", "show", "default"], timeout=60).stdout.strip() == ""
    assert host.run(["ip", "-6", "route", "show", "default"], timeout=60).stdout.strip() == ""
    unreachable = host.run(["ip", "route", "get", "192.0.2.1"], timeout=60, check=False)
    assert not unreachable.ok and "unreachable" in unreachable.stderr.lower()
    networks = libvirt.inventory()["networks"]
    assert networks and "default" not in networks
    for net in networks:
        assert "<forward" not in libvirt.network_xml(net), net


def _labkit_on_host(libvirt, vagrant, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``labkit ARGS`` run on the host, where the lab's guests are reachable (the lab's namespace),
    with the lab's Vagrant environment: as a participant runs it on a laptop beside ``vagrant up lab``."""
    env = dict(vagrant.env(), MPLBACKEND="Agg", LABKIT_DEPLOY_DIR="/var/lib/labkit/src")
    done = subprocess.run(libvirt.exec_prefix() + [sys.executable, "-m", "labkit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"labkit {' '.join(args)} (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def test_the_host_drives_the_netns_testbed_in_the_lab_vm_with_on(lab, tmp_path):
    """``labkit up/status/down --on vagrant:lab`` and ``labkit replay --on vagrant:lab`` of quick
    iterations 2 and 8: the notebooks run on the host, every command of the testbed goes to the
    guest over Paramiko (its host key pinned through ``vagrant ssh``), the load runs in the guest
    from the labkit copied there."""
    libvirt, vagrant, host = lab
    with timed("tests: up/status/down --on"):
        up = _labkit_on_host(libvirt, vagrant, "up", "--on", "vagrant:lab", "--iteration", "8",
                             "--profile", "quick", "--json", timeout=900)
        status = json.loads(up.stdout)
        assert status["state"] == "up" and status["iteration"] == 8 and status["machine"] == "vagrant:lab"
        pod = next(h for h in status["hosts"] if h["role"] == "pod")
        # iteration 8's pod sysctls, admitted and set inside the pod namespace of the guest's kernel
        assert host.run(["ip", "netns", "exec", pod["netns"], "cat",
                         "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"], timeout=60).stdout.strip() == "10"
        shown = _labkit_on_host(libvirt, vagrant, "status", "--on", "vagrant:lab")
        assert "iteration 8" in shown.stdout
        _labkit_on_host(libvirt, vagrant, "down", "--on", "vagrant:lab")
        assert host.run(["ip", "netns", "list"], timeout=60).stdout.strip() == ""
    with timed("tests: replay 2,8 --on"):
        out = tmp_path / "replay"
        _labkit_on_host(libvirt, vagrant, "replay", "--on", "vagrant:lab", "--profile", "quick",
                        "--iterations", "2,8", "--out", str(out), timeout=2400)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete", manifest
    for number in (2, 8):
        row = json.loads((out / f"iteration-{number}" / "summary-row.json").read_text())
        NOTES.append(f"replay --on vagrant:lab, iteration {number} (quick): {row['transfers_per_s']} transfers/s, "
                     f"{row['transfers_ok']} ok, {row['transfers_failed']} failed, node peak "
                     f"{row['peak_node_count']} of {row['conntrack_max']}")
        assert row["transfers_ok"] > 0  # real TFTP transfers through the NodePort in the guest
        samples = (out / f"iteration-{number}" / "samples.csv")
        assert samples.exists() and "nf_conntrack_count" in samples.read_text()
    assert (out / "index.html").exists()
    # the reports name the guest's kernel as the testbed's, beside the host's where the notebooks ran
    assert manifest["testbed_machine"]["kernel"].startswith("6.1.") and manifest["on"] == "vagrant:lab"
    assert f"testbed on vagrant:lab: Linux {manifest['testbed_machine']['kernel']}" in \
        (out / "index.html").read_text()
    # the replay took its testbeds down: no namespace, no server left in the guest
    assert host.run(["ip", "netns", "list"], timeout=60).stdout.strip() == ""
    assert not host.run(["pgrep", "-x", "in.tftpd"], timeout=60, check=False).ok


def test_a_recreated_lab_vm_is_refused_for_its_new_host_key(lab):
    _, vagrant, old = lab
    old_address = old.hostname
    old.close()
    with timed("re-create lab VM"):
        vagrant.vagrant("destroy", "-f", "lab", timeout=600)
        vagrant.up("lab")
    with pytest.raises(HostKeyError) as refused:
        vagrant.host("lab").run(["true"], timeout=60)
    text = str(refused.value)
    assert "HOST KEY CHANGED" in text and "ssh-keygen -R" in text
    assert vagrant.ssh_config("lab").hostname == old_address  # same address, new key
