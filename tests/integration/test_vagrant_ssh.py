"""The vagrant and ssh testbeds' SSH side against a real OpenSSH server.

No VM can run here, so the ``vagrant`` command is replaced by an object that
answers as python-vagrant would for running machines: ``ssh_config()`` prints
Vagrant's ssh-config (the captured shape in tests/data/vagrant, pointed at the
test's sshd) and ``ssh(command=cat host key)`` returns the server's real host
key line, as ``vagrant ssh`` would.  Everything after that is real: parsing,
pinning in the lab's known_hosts, strict connections, commands.
"""

from __future__ import annotations

import re
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from labkit.exceptions import HostKeyError
from labkit.testbed.inventory import SSHTestbed
from labkit.testbed.vagrant import VagrantTestbed
from tests.integration.conftest import keygen

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "vagrant"
Status = namedtuple("Status", "name state provider")


class VagrantCLI:
    """python-vagrant's Vagrant for three running machines, all served by ``server``."""

    def __init__(self, server, host_key_pub: Path):
        self.server = server
        self.host_key_pub = host_key_pub
        self.calls: list[tuple] = []

    def status(self):
        return [Status(n, "running", "libvirt") for n in ("control-plane", "worker-1", "client")]

    def up(self, **kw):
        self.calls.append(("up", kw))

    def ssh_config(self, vm_name=None):
        text = (DATA / "ssh-config-libvirt.txt").read_text()
        text = re.sub(r"HostName \S+", f"HostName {self.server.host}", text)
        text = text.replace("Port 22\n", f"Port {self.server.port}\n").replace("User vagrant", f"User {self.server.user}")
        return re.sub(r"IdentityFile \S+", f"IdentityFile {self.server.user_key}", text)

    def ssh(self, vm_name=None, command=None, extra_ssh_args=None):
        self.calls.append(("ssh", vm_name, command))
        assert command == "cat /etc/ssh/ssh_host_ed25519_key.pub"
        return self.host_key_pub.read_text()


def _testbed(sshd, tmp_path, pub=None) -> tuple[VagrantTestbed, VagrantCLI]:
    cli = VagrantCLI(sshd, pub or sshd.host_key.with_suffix(".pub"))
    return VagrantTestbed(root=tmp_path, vagrant=cli), cli


def test_vagrant_ssh_config_becomes_pinned_strict_ssh_hosts(sshd, tmp_path):
    tb, cli = _testbed(sshd, tmp_path)
    tb.bring_up()  # all running: no `vagrant up`, keys pinned through `vagrant ssh`
    assert [c[0] for c in cli.calls] == ["ssh"]  # the three share the server's address: asked once
    known = tmp_path / ".vagrant" / "labkit_known_hosts"
    assert known.read_text() == sshd.known_hosts_line()  # one line: all three share the server
    inv = tb.inventory
    for name in ("control-plane", "worker-1", "client"):
        host = inv.ssh(name)
        assert host.known_hosts == known and not host.trust_on_first_use
    client = inv.ssh("client")
    assert client.run(["echo", "from", "the", "client"]).stdout == "from the client\n"
    assert inv.ssh("worker-1").sudo and not client.sudo
    doc = tb.status()
    assert doc["state"] == "down" and doc["machines"]["worker-1"] == "running"
    inv.close()


def test_a_recreated_vm_with_a_new_key_is_refused_until_its_pin_is_cleared(sshd, tmp_path):
    other = keygen(tmp_path / "old_host_key")
    tb, _ = _testbed(sshd, tmp_path, pub=other.with_suffix(".pub"))
    tb.pin_host_keys()  # pinned: the "old VM"'s key
    with pytest.raises(HostKeyError, match=r"HOST KEY CHANGED.*ssh-keygen -R"):
        tb.inventory.ssh("client").run("true")
    fresh, cli = _testbed(sshd, tmp_path)  # the VM now reports its real (new) key
    fresh.pin_host_keys()
    assert cli.calls == []  # pinned machines are not asked again: the pin stands
    with pytest.raises(HostKeyError, match=r"HOST KEY CHANGED"):
        fresh.inventory.ssh("worker-1").run("true")
    (tmp_path / ".vagrant" / "labkit_known_hosts").unlink()  # what destroy() does
    fresh.pin_host_keys()
    assert fresh.inventory.ssh("worker-1").run("echo new").stdout == "new\n"


def test_the_ssh_testbed_inventory_reaches_a_real_server(sshd, tmp_path):
    known = tmp_path / "known_hosts"
    doc = {"known_hosts": str(known), "kubectl": "cp", "node": "w1", "client": "c", "hosts": {
        name: {"address": sshd.host, "port": sshd.port, "user": sshd.user, "key": str(sshd.user_key)}
        for name in ("cp", "w1", "c")}}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    strict = SSHTestbed(inventory=path, state_dir=tmp_path)
    with pytest.raises(HostKeyError, match="not in the lab's known_hosts"):
        strict.inventory.ssh("w1").run("true")
    doc["trust_on_first_use"] = True
    path.write_text(yaml.safe_dump(doc))
    tofu = SSHTestbed(inventory=path, state_dir=tmp_path)
    assert tofu.inventory.ssh("w1").run("hostname").ok
    assert known.read_text() == sshd.known_hosts_line()
    pid = subprocess.Popen(["sleep", "20"])
    try:  # a pod's view: a process's network namespace on the node, over the same SSH
        view = tofu.inventory.ssh("w1").netns(pid=pid.pid, host_name="pod-1")
        assert view.read_sysctl("net.ipv4.ip_forward") in ("0", "1")
    finally:
        pid.kill()
        pid.wait()
    tofu.inventory.close()


def test_the_monitor_runs_on_the_worker_through_sudo(sshd, tmp_path, netns):
    """The vagrant testbed's worker host (sudo, as on a Vagrant box) carries the monitor's agent."""
    import time

    from labkit.host import NetnsHost
    from labkit.monitor import Monitor
    from tests.conftest import need_program

    need_program("sudo", "iptables")
    ns = netns()
    NetnsHost(ns).run(["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
    tb, _ = _testbed(sshd, tmp_path)
    tb.pin_host_keys()
    worker = tb.inventory.ssh("worker-1")
    assert worker.sudo
    with Monitor({"node": worker, "pod-1": worker.netns(ns, host_name="pod-1")}, hz=10) as mon:
        time.sleep(1.0)
    samples = mon.samples
    assert set(samples["host"]) == {"worker-1"} and set(samples["netns"]) == {"node", "pod-1"}
    assert list(samples.columns) == ["time", "host", "netns", "metric", "value"]
    pod = samples[(samples.netns == "pod-1") & (samples.metric == "nf_conntrack_count")]
    assert len(pod) >= 5 and pod["value"].max() == 0  # an idle namespace of its own
    tb.inventory.close()
