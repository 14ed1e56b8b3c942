"""The vagrant and ssh testbeds without machines: ssh-config, inventories, roles, status."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest
import yaml

from labkit.exceptions import HostKeyError, ScenarioError, TestbedError
from labkit.scenario import load_scenario
from labkit.remote import SSHHost, SSHNetnsHost
from labkit.testbed import get_testbed
from labkit.testbed.cluster import ClusterTestbed, parse_inventory
from labkit.testbed.kubeadm import KubeadmDriver
from labkit.testbed.vagrant import (inventory_from_ssh_config, load_settings, machine_addresses,
                                    parse_host_key, ssh_login)
from tests.kubeadm_fake import FakeCluster, clock

DATA = Path(__file__).resolve().parents[1] / "data" / "vagrant"
SETTINGS = load_settings()
MACHINES = ("control-plane", "worker-1", "client")


def _logins(name: str) -> dict:
    text = (DATA / name).read_text()
    return {m: ssh_login(text, m) for m in MACHINES}


def test_libvirt_ssh_config_gives_every_machine_its_login():
    logins = _logins("ssh-config-libvirt.txt")
    assert [logins[m].hostname for m in MACHINES] == ["192.168.121.57", "192.168.121.203", "192.168.121.94"]
    w = logins["worker-1"]
    assert (w.machine, w.hostname, w.port, w.user) == ("worker-1", "192.168.121.203", 22, "vagrant")
    assert w.identity_files == ("/home/ada/labkit/.vagrant/machines/worker-1/libvirt/private_key",)
    # what Vagrant says about host keys is read (labkit pins keys itself and ignores it)
    assert w.options["stricthostkeychecking"] == "no" and w.options["userknownhostsfile"] == "/dev/null"
    assert w.options["hostkeyalgorithms"] == "+ssh-rsa"


def test_virtualbox_ssh_config_with_forwarded_ports_and_quoted_paths():
    logins = _logins("ssh-config-virtualbox.txt")
    assert [(logins[m].hostname, logins[m].port) for m in MACHINES] == [
        ("127.0.0.1", 2222), ("127.0.0.1", 2200), ("127.0.0.1", 2201)]
    assert logins["client"].identity_files == (
        "/Users/ada/My Labs/labkit/.vagrant/machines/client/virtualbox/private_key",)


def test_ssh_config_defaults_and_key_equals_value_are_read_as_ssh_reads_them():
    # the first value obtained wins; Host * fills in what the machine's entry left out
    text = "Host worker-1\n  HostName=10.0.0.5\n  Port 2200\n\nHost *\n  User vagrant\n  Port 2222\n"
    login = ssh_login(text, "worker-1")
    assert (login.hostname, login.port, login.user, login.identity_files) == ("10.0.0.5", 2200, "vagrant", ())


@pytest.mark.parametrize("text, message", [
    ("Host other\n  HostName 10.0.0.1\n", r"no Host entry for machine 'worker-1' \(entries: other\)"),
    ("", r"no Host entry for machine 'worker-1' \(entries: none\)"),
    ("Host worker-1\n  HostName x\n  Port twenty\n", "Host worker-1: Port 'twenty' is not a number"),
    ("Host worker-1\n  HostName\n", "vagrant ssh-config: Unparsable line HostName"),
])
def test_ssh_config_without_a_usable_entry_is_refused_naming_the_machine(text, message):
    with pytest.raises(TestbedError, match=message):
        ssh_login(text, "worker-1")


def test_inventory_from_vagrant_uses_private_addresses_for_the_service(tmp_path):
    entries = _logins("ssh-config-virtualbox.txt")
    inv = inventory_from_ssh_config(entries, SETTINGS, node="worker-1", known_hosts=tmp_path / "kh")
    node = inv.hosts["worker-1"]
    assert (node.address, node.port, node.node_ip, node.sudo) == ("127.0.0.1", 2200, "192.168.56.11", True)
    assert node.keys == ("/Users/ada/My Labs/labkit/.vagrant/machines/worker-1/virtualbox/private_key",)
    assert inv.hosts["client"].sudo is False and inv.kubectl == "control-plane"
    ssh = inv.ssh("worker-1")
    assert isinstance(ssh, SSHHost) and ssh.known_hosts == tmp_path / "kh" and not ssh.trust_on_first_use
    assert machine_addresses(SETTINGS) == {"control-plane": "192.168.56.10", "client": "192.168.56.20",
                                           "worker-1": "192.168.56.11"}
    with pytest.raises(TestbedError, match="no machine 'control-plane'.*vagrant status"):
        inventory_from_ssh_config({}, SETTINGS, node="worker-1", known_hosts=tmp_path / "kh")


def test_host_key_lines_are_parsed_or_refused():
    key = paramiko.ECDSAKey.generate()
    line = f"{key.get_name()} {key.get_base64()} root@worker-1\n"
    assert parse_host_key(line, "w").get_base64() == key.get_base64()
    with pytest.raises(HostKeyError, match="worker-1:/etc/ssh/x.pub: not a public host key line"):
        parse_host_key("cat: /etc/ssh/x.pub: No such file or directory", "worker-1:/etc/ssh/x.pub")


def _inventory_doc(key: Path) -> dict:
    return {"kubectl": "cp", "node": "w1", "client": "c",
            "hosts": {"cp": {"address": "10.0.0.10", "user": "admin", "key": str(key), "sudo": True},
                      "w1": {"address": "10.0.0.11", "user": "admin", "key": [str(key)], "sudo": True,
                             "node_name": "worker-1", "node_ip": "10.1.0.11"},
                      "c": {"address": "10.0.0.20", "port": 2022}}}


def test_an_inventory_is_read_with_defaults(tmp_path):
    key = tmp_path / "id"
    key.write_text("x")
    inv = parse_inventory(_inventory_doc(key), "inv.yaml")
    assert inv.hosts["w1"].keys == (str(key),) and inv.hosts["c"].port == 2022
    assert inv.hosts["c"].user is None and not inv.trust_on_first_use


@pytest.mark.parametrize("change, field, words", [
    (lambda d: d.update(nodes="w1"), "nodes", "unknown field; allowed:"),
    (lambda d: d["hosts"]["w1"].pop("address"), "hosts.w1.address", "missing"),
    (lambda d: d["hosts"]["c"].update(port=70000), "hosts.c.port", "must be a port number"),
    (lambda d: d["hosts"]["cp"].update(sudo="yes"), "hosts.cp.sudo", "must be true or false"),
    (lambda d: d["hosts"]["cp"].update(key="/nonexistent/key"), "hosts.cp.key", "no such key file"),
    (lambda d: d["hosts"]["c"].update(passwd="x"), "hosts.c.passwd", "unknown field"),
    (lambda d: d.update(node="w9"), "node", "must name one of the hosts (cp, w1, c), got 'w9'"),
    (lambda d: d.update(rollout_timeout=0), "rollout_timeout", "positive number"),
])
def test_a_bad_inventory_field_is_named(tmp_path, change, field, words):
    key = tmp_path / "id"
    key.write_text("x")
    doc = _inventory_doc(key)
    change(doc)
    with pytest.raises(ScenarioError) as info:
        parse_inventory(doc, "inv.yaml")
    assert str(info.value).startswith(f"inv.yaml: {field}: ") and words in str(info.value)


def test_the_ssh_testbed_is_registered_and_needs_an_inventory(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_INVENTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScenarioError, match="inventory.yaml: no such inventory file"):
        get_testbed("ssh")
    key = tmp_path / "id"
    key.write_text("x")
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(_inventory_doc(key)))
    tb = get_testbed("ssh", state_dir=tmp_path / "state")
    assert tb.name == "ssh" and tb.status()["state"] == "down" and tb.roles() == []
    tb.down()  # nothing applied: nothing to undo, nothing contacted


def test_roles_hosts_and_status_follow_the_applied_iteration(tmp_path):
    key = tmp_path / "id"
    key.write_text("x")
    inv = parse_inventory(_inventory_doc(key), "inv.yaml")
    tb = ClusterTestbed(inv, state_path=tmp_path / "state.json")
    sim = FakeCluster(node="worker-1", control="cp")
    now, sleep = clock()
    tb._driver = KubeadmDriver(sim.host("node"), sim.host("control"), node_name="worker-1",
                               node_ip=tb.node_ip, state_path=tb.state_path, sleep=sleep, clock=now)
    with pytest.raises(TestbedError, match="not up"):
        tb.host("node")
    scenario = load_scenario()
    tb.up(scenario.iteration(9, "lab"))
    assert tb.roles() == ["node", "pod-1", "pod-2", "client"]
    pod = tb.host("pod-2")
    assert isinstance(pod, SSHNetnsHost) and pod.netns == f"pid:{sim.pods[1]['pid']}" and pod.name == "pod-2"
    assert tb.host("init") is tb.host("node") and tb.host("node").name == "w1"
    assert set(tb.monitor_targets()) == {"node", "pod-1", "pod-2"}
    assert tb.service == ("10.1.0.11", 30069)
    doc = tb.status()
    assert doc["state"] == "up" and doc["iteration"] == 9 and doc["replicas"] == 2
    assert doc["file"]["name"] == "file-5120.bin" and doc["service"]["node_port"] == 30069
    assert [h["name"] for h in doc["hosts"]] == ["client", "node", "pod-1", "pod-2"]
    tb.up(scenario.iteration(1, "lab"))
    assert tb.service == ("10.1.0.11", 69) and tb.roles() == ["node", "client"]
    with pytest.raises(TestbedError, match="no role 'pod-1'"):
        tb.host("pod-1")
    tb.down()
    assert tb.status()["state"] == "down"


def test_the_opt_in_lab_vm_is_not_part_of_the_vagrant_cluster(tmp_path):
    from collections import namedtuple

    from labkit.testbed.vagrant import VagrantTestbed

    status = namedtuple("Status", "name state provider")
    text = (DATA / "ssh-config-libvirt.txt").read_text()

    class Vagrant:  # python-vagrant as it answers with the cluster up and `lab` never created
        def status(self):
            return [status(n, "running", "libvirt") for n in ("control-plane", "worker-1", "client")] + [
                status("lab", "not_created", "libvirt")]

        def ssh_config(self, vm_name=None):
            if vm_name in (None, "lab"):  # Vagrant refuses ssh-config while a machine is not created
                raise RuntimeError("The provider for this Vagrant-managed machine is not ready for SSH")
            return text

    testbed = VagrantTestbed(root=tmp_path, vagrant=Vagrant())
    assert testbed.machines() == {"control-plane": "running", "worker-1": "running", "client": "running"}
    assert sorted(testbed.ssh_entries()) == ["client", "control-plane", "worker-1"]
