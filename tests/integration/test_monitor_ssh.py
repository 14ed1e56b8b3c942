"""The monitor's agent over a real SSH channel (the sshd fixture of the SSH part's tests)."""

from __future__ import annotations

import glob
import time

import pytest

from labkit.monitor import Monitor
from tests.conftest import need_program, need_root, unique_name
from tests.integration.pressure import PressureLab

pytestmark = pytest.mark.integration


@pytest.fixture
def ssh_node(sshd):
    host = sshd.ssh_host()
    yield host
    host.close()


def test_one_agent_over_ssh_samples_the_node_and_a_namespace_of_it(ssh_node):
    need_root()
    need_program("ip", "iptables", "conntrack")
    lab = PressureLab(unique_name("lks"))
    try:
        pod = ssh_node.netns(lab.node, host_name="pod-1")
        before = set(glob.glob("/tmp/labkit-monitor-agent-*"))
        with Monitor({"node": ssh_node, "pod-1": pod}, hz=10) as mon:
            lab.send(30, port=69)
            time.sleep(0.5)
        samples = mon.samples
        count = int(lab.node_run("conntrack", "-C"))
    finally:
        lab.close()
    assert set(samples["host"]) == {ssh_node.name}           # both came through the node's agent
    pod_rows = samples[samples.netns == "pod-1"]
    counts = pod_rows[pod_rows.metric == "nf_conntrack_count"].sort_values("time")["value"]
    assert counts.iloc[0] == 0 and counts.iloc[-1] == count == 30
    expect = pod_rows[pod_rows.metric == "expect_count"].sort_values("time")["value"]
    assert expect.iloc[-1] == 30
    assert samples[samples.netns == "node"]["time"].nunique() >= 5
    assert set(glob.glob("/tmp/labkit-monitor-agent-*")) == before     # the uploaded agent is removed
