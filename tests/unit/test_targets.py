"""``--on MACHINE``: how a user names the netns testbed's machine (no connection made)."""

from __future__ import annotations

import os

import pytest

from labkit.exceptions import ScenarioError, TestbedError
from labkit.prepare import build_testbed
from labkit.remote.targets import Target, machine_for, parse_target


@pytest.mark.parametrize("spec, target", [
    ("vagrant:lab", Target("vagrant", "lab")),
    ("lab-vm", Target("ssh", "lab-vm")),
    ("pat@192.0.2.7", Target("ssh", "192.0.2.7", "pat")),
    ("pat@lab.example.org:2222", Target("ssh", "lab.example.org", "pat", 2222)),
    ("root@[2001:db8::7]:2200", Target("ssh", "2001:db8::7", "root", 2200)),
    ("2001:db8::7", Target("ssh", "2001:db8::7")),
])
def test_the_three_forms_are_read(spec, target):
    assert parse_target(spec) == target
    assert str(target) == spec


def test_an_inventory_host_is_taken_by_its_name():
    assert parse_target("bench", {"bench", "other"}) == Target("inventory", "bench")
    assert parse_target("bench") == Target("ssh", "bench")  # no inventory: a host name


@pytest.mark.parametrize("spec, says", [
    ("", "empty machine"),
    ("vagrant:", "not a Vagrant machine name"),
    ("vagrant:lab one", "not a Vagrant machine name"),
    ("pat@", "not a host name"),
    ("p at@host", "not a user name"),
    ("host:ssh", "port 'ssh' is not a number"),
    ("host:70000", "port 70000 is not 1-65535"),
    ("host/../x", "not a host name"),
])
def test_a_bad_machine_is_refused_naming_what_is_wrong_and_the_forms(spec, says):
    with pytest.raises(TestbedError) as refused:
        parse_target(spec)
    assert says in str(refused.value) and "vagrant:NAME" in str(refused.value)


def test_an_inventory_host_becomes_an_ssh_host_with_its_login(tmp_path):
    key = tmp_path / "id"
    key.write_text("not read before connecting")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"known_hosts: {tmp_path / 'kh'}\nhosts:\n  bench: {{address: 198.51.100.4, port: 2201, "
                         f"user: lab, key: {key}, sudo: true}}\n")
    host = machine_for("bench", inventory=inventory)
    c = host.connection
    assert (c.hostname, c.port, c.username, host.name) == ("198.51.100.4", 2201, "lab", "bench")
    assert host.executor.sudo and str(c.known_hosts) == str(tmp_path / "kh")
    direct = machine_for("pat@198.51.100.9:2022", inventory=inventory)
    assert (direct.connection.hostname, direct.connection.port, direct.name) == ("198.51.100.9", 2022,
                                                                                 "pat@198.51.100.9:2022")
    assert direct.executor.sudo  # not root there: privileged commands through sudo -n


def test_a_bad_inventory_entry_names_the_file_and_field(tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  bench: {address: 198.51.100.4, port: none}\n")
    with pytest.raises(ScenarioError) as refused:
        machine_for("bench", inventory=inventory)
    assert "hosts.bench.port" in str(refused.value) and str(inventory) in str(refused.value)
    with pytest.raises(ScenarioError, match="no such inventory file"):
        machine_for("bench", inventory=tmp_path / "missing.yaml")


def test_on_is_for_the_netns_testbed_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_INVENTORY", str(tmp_path / "none.yaml"))
    with pytest.raises(TestbedError, match="--on runs the netns testbed on another machine; the ssh testbed"):
        build_testbed("ssh", on="vagrant:lab")


def test_the_cli_refuses_a_bad_on_before_touching_anything(capsys):
    from labkit.cli import main

    code = main(["status", "--on", "host:ssh"])
    err = capsys.readouterr().err
    assert code != 0 and "port 'ssh' is not a number" in err
