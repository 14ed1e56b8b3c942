"""``labkit up/status/exec/run/down --on MACHINE``: the netns testbed on another machine, from the CLI.

The machine is this one behind the real sshd the SSH tests start, named by a host of
an inventory file (address, port, user, key, known_hosts), as a user names a lab
machine.  labkit copies its own source there (:mod:`labkit.remote.deploy`), the
testbed's state, namespaces and servers live "there", and afterwards nothing of the
run is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.scenario import load_scenario
from tests.conftest import need_program

pytestmark = pytest.mark.integration


def _labkit(env: dict, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "labkit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"labkit {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


def _namespaces(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix)) if os.path.isdir("/run/netns") else []


def test_a_user_runs_the_netns_testbed_on_an_inventory_machine_from_the_cli(sshd, tmp_path):
    need_program("in.tftpd", "conntrack", "iptables", "flock")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line())
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"known_hosts: {known}\nhosts:\n  bench:\n    address: {sshd.host}\n    port: {sshd.port}\n"
                         f"    user: {sshd.user}\n    key: {sshd.user_key}\n")
    env = dict(os.environ, LABKIT_STATE_DIR=str(tmp_path / "state"), LABKIT_DEPLOY_DIR=str(tmp_path / "deploy"),
               LABKIT_INVENTORY=str(inventory), MPLBACKEND="Agg")
    iteration = load_scenario().iteration(2, "quick")
    doctor = _labkit(env, "doctor", "--on", "bench")
    assert "labkit's Python parts" in doctor.stdout and "can run on bench" in doctor.stdout
    assert (tmp_path / "deploy").is_dir()  # the doctor copied labkit there (and the run reuses it)
    try:
        up = _labkit(env, "up", "--on", "bench", "--iteration", "2", "--profile", "quick", "--wait", "300", "--json")
        status = json.loads(up.stdout)
        assert status["state"] == "up" and status["machine"] == "bench"
        run_id = status["run_id"]
        assert len(_namespaces(f"lk{run_id}-")) >= 3  # client, node, pod: made on the machine behind sshd
        shown = _labkit(env, "exec", "--on", "bench", "node", "--", "sysctl", "-n",
                        "net.netfilter.nf_conntrack_udp_timeout")
        assert shown.stdout.strip() == str(iteration.node_sysctls["net.netfilter.nf_conntrack_udp_timeout"])
        _labkit(env, "down", "--on", "bench")
        assert _namespaces(f"lk{run_id}-") == []
        out = tmp_path / "it2"
        run = _labkit(env, "run", "--on", "bench", "--iteration", "2", "--profile", "quick", "--out", str(out))
        assert "iteration 2:" in run.stdout
        row = json.loads((out / "summary-row.json").read_text())
        # the load ran there, through the copied labkit (its python wrapper), through the NodePort
        assert row["transfers_ok"] > 0 and row["peak_node_count"] > 0
        wrappers = list((tmp_path / "deploy").glob("*/python"))
        assert len(wrappers) == 1 and "PYTHONPATH=" in wrappers[0].read_text()
        after = json.loads(_labkit(env, "status", "--on", "bench", "--json").stdout)
        assert after["state"] == "down"
        assert _namespaces("lk") == [] or all(not n.startswith(f"lk{run_id}") for n in _namespaces("lk"))
        # a testbed left up by a process that ended (as `labkit up` leaves it): clean --on removes it
        left = json.loads(_labkit(env, "up", "--on", "bench", "--iteration", "3", "--profile", "quick",
                                  "--wait", "300", "--json").stdout)
        assert len(_namespaces(f"lk{left['run_id']}-")) >= 4
        cleaned = _labkit(env, "clean", "--on", "bench")
        assert "removed" in cleaned.stdout and _namespaces(f"lk{left['run_id']}-") == []
    finally:
        _labkit(env, "down", "--on", "bench", check=False)
    assert not [p for p in (tmp_path / "state").rglob("state.json")]
