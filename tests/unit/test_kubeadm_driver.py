"""The kubeadm driver against recorded command transcripts and a simulated cluster.

The transcript test is strict: every command the driver sends to the node and
to the control plane, in order, with its stdin, must be the recorded one.
Re-record after an intended change with ``LABKIT_RECORD_TRANSCRIPTS=1`` and
review the diff of ``tests/data/kubeadm/transcript-article.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from labkit.exceptions import PodRejected, SSHError, SysctlError, TestbedError
from labkit.scenario import ARTICLE_ITERATIONS, load_scenario
from labkit.testbed import kubeadm as K
from tests.kubeadm_fake import DATA, DEFAULTS, FakeCluster, ReplayHost, Transcript, clock

SCENARIO = load_scenario()


def iteration(n: int, profile: str = "lab"):
    return SCENARIO.iteration(n, profile)


def driver(node, control, state_path, **kw) -> K.KubeadmDriver:
    now, sleep = clock()
    options = dict(node_name="worker-1", node_ip="192.168.56.11", state_path=state_path,
                   ready_timeout=30, rollout_timeout=60, poll=2, sleep=sleep, clock=now)
    options.update(kw)
    return K.KubeadmDriver(node, control, **options)


def story(d: K.KubeadmDriver, profile: str = "lab") -> None:
    for n in ARTICLE_ITERATIONS:  # the recorded transcript is the article's nine
        d.apply(iteration(n, profile))
    d.restore()


# The article profile's values are the article's and do not move; the lab profile's
# are recalibrated, so its commands are checked against the simulated cluster instead.
@pytest.mark.parametrize("profile", ["article"])
def test_every_iteration_sends_the_recorded_commands_in_order(tmp_path, profile):
    path = DATA / f"transcript-{profile}.yaml"
    if os.environ.get("LABKIT_RECORD_TRANSCRIPTS"):
        sim = FakeCluster()
        story(driver(sim.host("node"), sim.host("control"), tmp_path / "rec.json"), profile)
        header = (f"# The kubeadm driver's commands for iterations 1..9 ({profile} profile) and restore,\n"
                  "# with the answers of a one-worker kubeadm cluster (tests/kubeadm_fake.py).\n")
        path.write_text(header + yaml.safe_dump(sim.transcript(), sort_keys=False, width=100))
    transcript = Transcript.load(path)
    node, control = ReplayHost("worker-1", transcript), ReplayHost("control-plane", transcript)
    story(driver(node, control, tmp_path / "state.json"), profile)
    assert transcript.done, f"{len(transcript.steps) - transcript.pos} recorded commands not sent"
    assert not (tmp_path / "state.json").exists()


def _commands(sim: FakeCluster, host: str | None = None) -> list[list[str]]:
    return [s["cmd"] for s in sim.steps if host is None or s["host"] == host]


def test_the_story_leaves_the_node_as_it_found_it(tmp_path):
    sim = FakeCluster()
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    d.apply(iteration(1))
    assert sim.plain == "active" and sim.deployment is None
    assert d.file.name == "file-5120.bin" and d.file.size == 5120
    d.apply(iteration(7))
    lab7 = iteration(7)
    assert {k: sim.sysctls[k] for k in lab7.node_sysctls} == {k: str(v) for k, v in lab7.node_sysctls.items()}
    assert sim.plain == "inactive" and len(sim.pods) == 1 and not sim.kubelet_allowed
    assert sim.files[K.SYSCTL_FILE].count("\n") == len(lab7.node_sysctls) + 1
    sim.steps.clear()
    d.apply(iteration(8))
    cmds = _commands(sim)
    restart = cmds.index(["systemctl", "restart", "kubelet"])
    patch = next(i for i, c in enumerate(cmds) if c[:2] == ["kubectl", "patch"])
    assert restart < patch  # the kubelet allows the sysctls before pods ask for them
    assert sim.kubelet_allowed == list(iteration(8).allowed_unsafe_sysctls)
    ops = json.loads(cmds[patch][-1])
    assert {"op": "replace", "path": "/spec/replicas", "value": 1} in ops
    want = {k: str(v) for k, v in iteration(8).pod_sysctls.items()}
    assert sim.pods[0]["sysctls"] == want
    # read back inside the pod, through its container's process
    assert ["nsenter", "-t", str(sim.pods[0]["pid"]), "-n", "sysctl", "-n", *want] in cmds
    d.apply(iteration(9))
    assert len(sim.pods) == 2 and [p["pid"] for p in d.pods] == [p["pid"] for p in sim.pods]
    d.restore()
    assert sim.sysctls == DEFAULTS and K.SYSCTL_FILE not in sim.files
    assert yaml.safe_load(sim.files[K.KUBELET_CONFIG]) == yaml.safe_load(
        (DATA / "kubelet-config.yaml").read_text())
    assert sim.raw_rules == [] and sim.deployment is None and not sim.service


def test_restore_twice_sends_nothing_the_second_time(tmp_path):
    sim = FakeCluster()
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    d.apply(iteration(8))
    d.restore()
    before = len(sim.steps)
    driver(sim.host("node"), sim.host("control"), tmp_path / "state.json").restore()
    assert len(sim.steps) == before


def test_kubelet_not_ready_in_time_is_a_clear_error(tmp_path):
    sim = FakeCluster(never_ready=True)
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    with pytest.raises(TestbedError, match=r"worker-1: the kubelet is not Ready 30 s after its restart "
                                           r"\(healthz failing\)") as info:
        d.apply(iteration(8))
    assert "failed to validate kubelet configuration" in str(info.value)
    polls = [c for c in _commands(sim) if c[0] == "curl"]
    assert 15 <= len(polls) <= 17  # every 2 s for 30 s, on the fake clock


def test_a_stuck_rollout_names_the_pods_and_their_state(tmp_path):
    sim = FakeCluster(stuck=True)
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    with pytest.raises(TestbedError, match=r"rollout of deployment/tftp-server to 3 replica\(s\) did not "
                                           r"finish within 60 s \(error: timed out waiting for the "
                                           r"condition\); pods: tftp-server-[\w-]+: Running"):
        d.apply(iteration(3))


def test_a_sysctl_the_kernel_refuses_keeps_its_message(tmp_path):
    sim = FakeCluster(refuse={"net.netfilter.nf_conntrack_expect_max": "Invalid argument"})
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    it = iteration(2)
    value = it.node_sysctls["net.netfilter.nf_conntrack_expect_max"]
    with pytest.raises(SysctlError, match=rf'worker-1: writing net.netfilter.nf_conntrack_expect_max={value}: '
                                          r'setting key "net.netfilter.nf_conntrack_expect_max": '
                                          r"Invalid argument"):
        d.apply(it)
    assert not any(c[0] == "kubectl" for c in _commands(sim))  # stopped before the workload


def test_pod_sysctls_not_allowed_are_refused_before_any_change(tmp_path):
    sim = FakeCluster()
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    bad = dataclasses.replace(iteration(8), allowed_unsafe_sysctls=())
    with pytest.raises(PodRejected, match="SysctlForbidden"):
        d.apply(bad)
    assert sim.steps == []


def test_the_kubelets_own_refusal_is_reported_as_pod_rejected(tmp_path):
    sim = FakeCluster(stale_kubelet=True)  # the restarted kubelet kept its old allowlist
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    with pytest.raises(PodRejected, match=r"pod tftp-server-[\w-]+: SysctlForbidden: Pod forbidden sysctl: "
                                          r'"net.netfilter.nf_conntrack_udp_timeout" not allowlisted'):
        d.apply(iteration(8))


def test_ssh_dropped_mid_run_is_reported_and_the_state_allows_restore(tmp_path):
    sim = FakeCluster()
    d = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    d.apply(iteration(7))
    # drop the connection at the patch of the Deployment in iteration 8
    sim.faults["drop_at"] = len(sim.steps) + 1 + next(
        i for i, c in enumerate(_dry_run(iteration(8))) if c[:2] == ["kubectl", "patch"])
    with pytest.raises(SSHError, match="control-plane: SSH connection lost while running 'kubectl patch") as info:
        d.apply(iteration(8))
    assert f"recorded in {tmp_path / 'state.json'}; `labkit down` undoes it" in str(info.value)
    del sim.faults["drop_at"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["kubelet_backup"] and state["originals"] and state["workload"]
    again = driver(sim.host("node"), sim.host("control"), tmp_path / "state.json")
    again.restore()
    assert sim.sysctls == DEFAULTS and sim.deployment is None


def _dry_run(it) -> list[list[str]]:
    """The commands of ``it`` after iteration 7, on a cluster of their own."""
    import tempfile
    from pathlib import Path

    sim = FakeCluster()
    with tempfile.TemporaryDirectory() as tmp:
        d = driver(sim.host("node"), sim.host("control"), Path(tmp) / "s.json")
        d.apply(iteration(7))
        sim.steps.clear()
        d.apply(it)
    return _commands(sim)


def test_parsers_refuse_what_they_do_not_know():
    assert K.parse_file_list(f"5120 file-5120.bin {'a' * 64}\n", "x")[0].size == 5120
    with pytest.raises(TestbedError, match="unexpected file listing line"):
        K.parse_file_list("total 8\n", "x")
    pods = K.parse_pods(json.dumps({"items": [
        {"metadata": {"name": "b", "deletionTimestamp": "2026-11-26T11:00:00Z"}, "status": {}},
        {"metadata": {"name": "a"}, "status": {"phase": "Pending", "containerStatuses": [
            {"ready": False, "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "no image"}}}]}},
    ]}))
    assert [(p["name"], p["reason"], p["container_id"]) for p in pods] == [("a", "ErrImageNeverPull", None)]


def test_node_config_alone_records_each_original_before_changing_it_and_restores_the_node(tmp_path):
    from labkit.testbed.node_config import KUBELET_CONFIG, SYSCTL_FILE, NodeConfig

    sim = FakeCluster()
    now, sleep = clock()
    state: dict = {"originals": {}, "kubelet_backup": False}
    saved: list[tuple[int, dict]] = []  # (commands sent so far, the state saved)
    config = NodeConfig(sim.host("node"), sim.host("control"), node_name="worker-1", state=state,
                        save=lambda: saved.append((len(sim.steps), json.loads(json.dumps(state)))),
                        ready_timeout=30, poll=2, sleep=sleep, clock=now)
    it = iteration(8)
    config.apply_node_sysctls(dict(it.node_sysctls))
    config.apply_kubelet(list(it.allowed_unsafe_sysctls))
    assert sim.sysctls == {**DEFAULTS, **{k: str(v) for k, v in it.node_sysctls.items()}}
    assert sim.kubelet_allowed == list(it.allowed_unsafe_sysctls) and SYSCTL_FILE in sim.files
    first_write = next(i for i, s in enumerate(sim.steps) if s["cmd"][:2] == ["sysctl", "-w"])
    first_backup = next(i for i, s in enumerate(sim.steps) if s["cmd"][0] == "cp")
    # a connection lost at the first change still leaves the originals on disk for `labkit down`
    assert any(n <= first_write and s["originals"] == {k: DEFAULTS[k] for k in it.node_sysctls}
               for n, s in saved)
    assert any(first_backup < n <= first_backup + 1 and s["kubelet_backup"] for n, s in saved)
    config.restore()
    assert sim.sysctls == DEFAULTS and SYSCTL_FILE not in sim.files and sim.kubelet_allowed == []
    assert yaml.safe_load(sim.files[KUBELET_CONFIG]) == yaml.safe_load((DATA / "kubelet-config.yaml").read_text())
    assert state == {"originals": {}, "kubelet_backup": False}
