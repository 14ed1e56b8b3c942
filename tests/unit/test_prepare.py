"""The seam: `labkit run`, the notebook session and the replay driver get their testbed from one
prepare(), and a testbed's teardown removes what its own class says it made."""

from __future__ import annotations

import argparse
import json

import pytest

from labkit import prepare as prepare_mod
from labkit.prepare import prepare
from labkit.results import replay_state_dir
from labkit.testbed.netns import NetnsTestbed


@pytest.fixture(autouse=True)
def own_folders(tmp_path, monkeypatch):
    """State and results in the test's own folders (nothing of the machine's is read or written)."""
    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path / "results"))


def _where(testbed) -> tuple:
    return type(testbed), testbed.state_dir, testbed.replay_run_id, testbed.global_wait


def test_the_cli_and_the_notebook_get_the_same_testbed_and_their_default_folders(tmp_path, monkeypatch):
    from labkit import run
    from labkit.replay.replay_cli import cmd_run
    from labkit.session import IterationSession

    ran = {}

    def fake_run_iteration(testbed, iteration, out_dir, **kw):
        ran.update(testbed=testbed, iteration=iteration, out_dir=out_dir, calibration=kw.get("calibration"))
        return {"iteration": iteration.number, "transfers_per_s": 1.0, "article_transfers_per_s": 2,
                "transfers_failed": 0, "peak_node_count": 3, "conntrack_max": 4, "node_drops": 0,
                "pod_drops": 0, "node_early_drops": 0, "pod_early_drops": 0}

    monkeypatch.setattr(run, "run_iteration", fake_run_iteration)
    args = argparse.Namespace(iteration=4, profile="quick", testbed="netns", on=None, out=None, duration=7.0,
                              cooldown=None, keep_up=False)
    assert cmd_run(args) == 0
    session = IterationSession(4, "quick", duration=7.0)
    assert _where(ran["testbed"]) == _where(session.testbed) == (
        NetnsTestbed, tmp_path / "state", None, prepare_mod.GLOBAL_WAIT_S)
    assert ran["iteration"] == session.iteration and ran["iteration"].duration_s == 7.0
    assert ran["calibration"] == session.prepared.calibration  # the model's columns from the same profile
    assert ran["out_dir"] == tmp_path / "results" / "run-quick" / "iteration-4"
    assert session.out_dir == tmp_path / "results" / "notebook-quick" / "iteration-4"


def test_the_replays_notebook_and_its_teardown_get_the_same_testbed(tmp_path, monkeypatch):
    from labkit.replay import driver
    from labkit.session import IterationSession

    torn: list[tuple] = []
    monkeypatch.setattr(NetnsTestbed, "teardown", lambda self: torn.append(_where(self)) or [])
    session = IterationSession(4, "quick", run_id="20261201-120000-quick", out_dir=tmp_path / "it-4")
    assert driver._teardown(driver.ReplayOptions(testbed="netns"), "20261201-120000-quick", 4) is None
    assert torn == [_where(session.testbed)]
    assert session.testbed.state_dir == replay_state_dir("20261201-120000-quick") == \
        tmp_path / "state" / "replay-20261201-120000-quick"


def test_a_netns_testbed_of_a_replay_removes_what_its_replay_folder_holds(tmp_path):
    from labkit.ledger import Ledger

    testbed = prepare(4, "quick", "netns", tmp_path / "it-4", run_id="r-gone").testbed
    run = replay_state_dir("r-gone") / "netns-abcde"  # a testbed run a dead notebook left
    (run / "srv").mkdir(parents=True)
    left = run / "srv" / "file-5120.bin"  # its ledger names what it made
    left.write_text("x")
    Ledger(run).record("path", path=str(left))
    (run / "state.json").write_text(json.dumps({"state": "up", "pods": []}))
    removed = testbed.teardown()
    assert not left.exists() and any(str(left) in line for line in removed)
    assert not replay_state_dir("r-gone").exists()
    assert testbed.teardown() == []  # idempotent


def test_a_netns_testbed_outside_a_replay_tears_down_by_bringing_itself_down(monkeypatch):
    downs = []
    monkeypatch.setattr(NetnsTestbed, "down", lambda self, **kw: downs.append(self.state_dir))
    testbed = prepare(4, "quick").testbed
    assert testbed.teardown() == [] and downs == [testbed.state_dir]  # never the whole state directory


def test_a_cluster_testbeds_teardown_brings_it_down(tmp_path):
    from labkit.scenario import load_scenario
    from labkit.testbed.cluster import ClusterTestbed, parse_inventory
    from labkit.testbed.kubeadm import KubeadmDriver
    from tests.kubeadm_fake import FakeCluster, clock
    from tests.unit.test_cluster_testbeds import _inventory_doc

    key = tmp_path / "id"
    key.write_text("x")
    tb = ClusterTestbed.for_replay("r-cluster", inventory=parse_inventory(_inventory_doc(key), "inv.yaml"),
                                   state_path=tmp_path / "state.json")
    sim = FakeCluster(node="worker-1", control="cp")
    now, sleep = clock()
    tb._driver = KubeadmDriver(sim.host("node"), sim.host("control"), node_name="worker-1",
                               node_ip=tb.node_ip, state_path=tb.state_path, sleep=sleep, clock=now)
    tb.up(load_scenario().iteration(9, "lab"))
    assert tb.replay_run_id == "r-cluster" and not tb.is_local and tb.status()["state"] == "up"
    tb.teardown()
    assert tb.status()["state"] == "down" and not tb.state_path.exists()


def test_behaviour_follows_where_the_testbed_runs_not_its_name():
    from labkit.run import background_flows
    from labkit.testbed.cluster import ClusterTestbed

    it = prepare(8, "lab").iteration
    assert it.background_flows > 0
    assert background_flows(prepare(8, "lab").testbed, it) == it.background_flows

    class NamedNetns(ClusterTestbed):  # a remote testbed that happens to be called "netns"
        name = "netns"

    assert background_flows(NamedNetns.__new__(NamedNetns), it) == 0


def test_a_replay_on_another_machine_gives_its_notebooks_and_teardown_that_machine(tmp_path, monkeypatch):
    """``labkit replay --on bench``: each notebook's session and the driver's teardown build the netns
    testbed of the same machine (named by the same inventory host)."""
    from labkit.replay import driver
    from labkit.session import IterationSession

    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  bench: {address: 198.51.100.4, user: lab, sudo: true}\n")
    monkeypatch.setenv("LABKIT_INVENTORY", str(inventory))
    monkeypatch.setattr(NetnsTestbed, "_load", lambda self: None)  # (no connection: nothing to attach to)
    torn = []
    monkeypatch.setattr(NetnsTestbed, "teardown", lambda self: torn.append(self.machine.name) or [])
    options = driver.ReplayOptions(testbed="netns", on="bench")
    assert driver._teardown(options, "20261201-120000-lab", 4) is None and torn == ["bench"]
    session = IterationSession(4, "quick", on="bench", run_id="20261201-120000-lab", out_dir=tmp_path / "it-4")
    assert session.testbed.machine.name == "bench" and not session.testbed.is_local
    assert "on `bench`" in session.title().data


def test_a_replay_on_another_machine_records_that_machine_and_its_sysctls(tmp_path, monkeypatch):
    from labkit.remote import targets
    from labkit.replay import driver
    from labkit.replay.manifest import Manifest

    from labkit.host import Result

    class There:
        name = "bench"

        def read_sysctl(self, name):
            return {"net.netfilter.nf_conntrack_max": "128"}.get(name, "7")

        def run(self, cmd, **kw):   # the machine's uname, nproc and os-release, as it prints them
            return Result(str(cmd), self.name, 0, "bench1\n6.1.0-50-amd64\n#1 SMP\nx86_64\n2\n"
                          "Debian GNU/Linux 12 (bookworm)\n", "", 0.1)

    monkeypatch.setattr(targets, "machine_for", lambda spec, **kw: There())
    monkeypatch.setattr(driver, "_MACHINES", {})
    options = driver.ReplayOptions(profile="quick", iterations=[2], out=tmp_path / "run", on="bench")
    run_dir, manifest = driver._prepare_run_dir(options)
    data = Manifest.load(run_dir).data
    assert data["on"] == "bench" and data["sysctls"]["before"]["net.netfilter.nf_conntrack_max"] == "128"
    assert data["testbed_machine"] == {"name": "bench", "hostname": "bench1", "kernel": "6.1.0-50-amd64",
                                       "kernel_version": "#1 SMP", "machine": "x86_64",
                                       "distro": "Debian GNU/Linux 12 (bookworm)", "cpus": 2}
