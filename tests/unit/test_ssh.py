"""SSHHost pieces that need no server: command lines, key pinning, refusals."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import paramiko
import pytest

from labkit.exceptions import HostKeyError
from labkit.hostkeys import known_hosts_name, pin_host_key
from labkit.remote import SSHHost

PACKAGE = Path(__file__).resolve().parents[2] / "labkit"


def _host(**kw) -> SSHHost:
    return SSHHost("192.0.2.10", username="vagrant", known_hosts="/nonexistent/kh", **kw)


def test_command_line_bounds_the_process_group_and_enters_the_namespace():
    host = _host(sudo=True)
    line = host.remote_command(["sysctl", "-w", "a.b=1 2"], timeout=9.2, env={"LC_ALL": "C"},
                               prefix=["nsenter", "-t", "42", "-n"])
    assert shlex.split(line) == ["sudo", "-n", "timeout", "-k", "2", "11", "env", "LC_ALL=C",
                                 "nsenter", "-t", "42", "-n", "sysctl", "-w", "a.b=1 2"]


def test_a_plain_string_is_sent_as_is_and_a_wrapped_one_through_sh():
    host = _host()
    assert host.remote_command("echo $HOME | wc -c") == "echo $HOME | wc -c"
    assert shlex.split(host.remote_command("echo $HOME", timeout=3)) == [
        "timeout", "-k", "2", "4", "sh", "-c", "echo $HOME"]


def test_netns_views_share_the_connection_and_validate_their_target():
    host = _host()
    view = host.netns("lkpod1")
    assert view.parent is host and view.netns == "lkpod1" and view.prefix == ["ip", "netns", "exec", "lkpod1"]
    assert host.netns(pid=4242).prefix == ["nsenter", "-t", "4242", "-n"]
    for bad in ({"name": "../x"}, {"name": "-n"}, {"pid": 0}, {}, {"name": "a", "pid": 1}):
        with pytest.raises(ValueError):
            host.netns(**bad)


def test_default_name_says_user_host_and_port():
    assert _host().name == "vagrant@192.0.2.10:22"
    assert SSHHost("h", port=2222, known_hosts="/x").name == "h:2222"
    assert known_hosts_name("h", 22) == "h" and known_hosts_name("h", 2222) == "[h]:2222"


def test_pinning_adds_a_line_keeps_others_and_refuses_a_different_key(tmp_path):
    path = tmp_path / "sub" / "known_hosts"
    keys = [paramiko.ECDSAKey.generate() for _ in range(2)]
    pin_host_key(path, "[10.0.0.1]:2222", keys[0])
    pin_host_key(path, "[10.0.0.1]:2222", keys[0])  # again: no duplicate
    pin_host_key(path, "node", keys[1])
    lines = path.read_text().splitlines()
    assert lines == [f"[10.0.0.1]:2222 {keys[0].get_name()} {keys[0].get_base64()}",
                     f"node {keys[1].get_name()} {keys[1].get_base64()}"]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(HostKeyError, match=r"ssh-keygen -R 'node'"):
        pin_host_key(path, "node", keys[0])
    assert path.read_text().splitlines() == lines


def test_no_policy_that_ignores_host_keys_anywhere_in_labkit():
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text()
        assert not re.search(r"AutoAddPolicy|WarningPolicy", text), source
