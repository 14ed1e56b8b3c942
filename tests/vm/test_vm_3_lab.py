"""`vagrant up lab` with labkit's box under the lab's libvirt, driven from the host over Paramiko.

One module-scoped VM (2 CPUs, 2 GB, QEMU TCG): it boots from the box, answers over
Paramiko with its host key pinned, has no route off its isolated network, and runs
the netns testbed (labkit's CLI from the uploaded source, as root) for iterations 2
and 8 of the quick profile.  Last, the VM is re-created: its new host key is refused.
At the end the VM, the daemons and the namespace are gone and the machine's own
tables are as before.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from labkit.exceptions import HostKeyError
from labkit.vm.guest import VagrantLab, labkit_in_guest, upload_labkit
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
        vagrant.known_hosts.unlink(missing_ok=True)
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


def test_the_netns_testbed_runs_inside_the_lab_vm(lab):
    _, _, host = lab
    with timed("tests: upload labkit"):
        upload_labkit(host)
    with timed("tests: iteration 2 and 8"):
        doctor = labkit_in_guest(host, ["doctor"], timeout=300, check=False)
        assert doctor.ok, doctor.stdout + doctor.stderr
        labkit_in_guest(host, ["up", "--iteration", "8", "--profile", "quick"], timeout=600)
        status = json.loads(labkit_in_guest(host, ["status", "--json"], timeout=300).stdout)
        assert status["state"] == "up" and status["iteration"] == 8
        pod = next(h for h in status["hosts"] if h["role"] == "pod")
        # iteration 8's pod sysctls, admitted and set inside the pod namespace of the guest's kernel
        assert host.run(["ip", "netns", "exec", pod["netns"], "cat",
                         "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"], timeout=60).stdout.strip() == "10"
        labkit_in_guest(host, ["down"], timeout=300)
        for iteration in ("2", "8"):
            run = labkit_in_guest(host, ["run", "--iteration", iteration, "--profile", "quick",
                                         "--out", f"/tmp/labkit-run-{iteration}"], timeout=900)
            assert f"iteration {iteration}:" in run.stdout and "transfers/s" in run.stdout, run.stdout
            row = json.loads(host.read_file(f"/tmp/labkit-run-{iteration}/summary-row.json"))
            NOTES.append(f"guest iteration {iteration} (quick): {row['transfers_per_s']} transfers/s, "
                         f"{row['transfers_ok']} ok, {row['transfers_failed']} failed")
            assert row["transfers_ok"] > 0  # real TFTP transfers through the NodePort in the guest
            samples = host.read_file(f"/tmp/labkit-run-{iteration}/samples.csv").decode()
            assert "nf_conntrack_count" in samples
    # the run took its testbed down: no namespace, no server left in the guest
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
