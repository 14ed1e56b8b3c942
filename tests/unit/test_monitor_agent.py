"""The monitor agent's protocol and the monitor's argument checks (no root needed)."""

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from labkit.exceptions import MonitorError
from labkit.monitor.agent import AGENT_MODULES, build_agent_zip, parse_target, remote_target, run_agent
from labkit.monitor.monitor_cli import parse_netns_args
from labkit.monitor.sampler import NetnsTarget

HAS_CONNTRACK = os.path.exists("/proc/sys/net/netfilter/nf_conntrack_count")


@pytest.mark.skipif(not HAS_CONNTRACK, reason="needs nf_conntrack in this kernel")
def test_agent_streams_hello_ticks_and_end_as_json_lines():
    out = io.StringIO()
    status = run_agent([NetnsTarget("init")], hz=20, kmsg=False, duration=0.5, out=out)
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert status == 0
    hello = [o for o in objs if o["type"] == "hello"][0]
    assert hello["netns"]["init"] == os.stat("/proc/self/ns/net").st_ino
    ticks = [o for o in objs if o["type"] == "tick"]
    assert 6 <= len(ticks) <= 14                      # 20 Hz for 0.5 s, plus the last one
    values = ticks[-1]["values"]
    for metric in ("nf_conntrack_count", "expect_count", "nf_conntrack_max", "nf_conntrack_expect_max",
                   "udp_timeout", "udp_timeout_stream", "stat_drop", "stat_early_drop",
                   "stat_insert_failed", "stat_expect_create"):
        assert isinstance(values[metric], int), metric
    assert values["nf_conntrack_max"] == int(open("/proc/sys/net/netfilter/nf_conntrack_max").read())
    assert objs[-1]["type"] == "end"


def test_agent_reports_a_namespace_it_cannot_join():
    out = io.StringIO()
    with pytest.raises(MonitorError, match="lk-no-such-ns"):
        run_agent([NetnsTarget("node", "/run/netns/lk-no-such-ns")], hz=10, kmsg=False,
                  duration=0.2, out=out)


def test_agent_zip_runs_with_the_standard_library_alone(tmp_path):
    path = tmp_path / "agent.pyz"
    path.write_bytes(build_agent_zip())
    names = zipfile.ZipFile(path).namelist()
    assert "__main__.py" in names and "labkit/__init__.py" in names and all(f"labkit/{m}" in names for m in AGENT_MODULES)
    # -S -I: no site-packages (no pandas), as on a bare node
    proc = subprocess.run([sys.executable, "-S", "-I", str(path), "--help"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--target" in proc.stdout


def test_target_arguments():
    assert parse_target("node=-") == NetnsTarget("node", None)
    assert parse_target("pod-1=/proc/42/ns/net") == NetnsTarget("pod-1", "/proc/42/ns/net")
    with pytest.raises(MonitorError, match="ROLE=PATH"):
        parse_target("node")
    hosts = parse_netns_args(["node=lk1n", "init=-"])
    assert hosts["node"].netns == "lk1n" and hosts["node"].name == "node"
    with pytest.raises(MonitorError, match="twice"):
        parse_netns_args(["node=a", "node=b"])


def test_remote_targets_of_an_ssh_node_and_its_pods():
    class Node:
        name = "node1"

    class View:
        def __init__(self, netns):
            self.parent, self.netns = node, netns

    node = Node()
    assert remote_target("node", node) == (node, NetnsTarget("node", None))
    assert remote_target("pod-1", View("pid:4242")) == (node, NetnsTarget("pod-1", "/proc/4242/ns/net"))
    assert remote_target("pod-2", View("cni-1")) == (node, NetnsTarget("pod-2", "/run/netns/cni-1"))


def test_monitor_refuses_bad_arguments():
    from labkit.host import LocalHost
    from labkit.monitor import Monitor

    with pytest.raises(MonitorError, match="no targets"):
        Monitor({})
    with pytest.raises(MonitorError, match="hz"):
        Monitor({"init": LocalHost()}, hz=0)
