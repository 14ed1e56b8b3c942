"""The netns testbed on the real kernel: real in.tftpd pods behind rendered kube-proxy rules.

Fetched by clients no one here wrote (tftp-hpa's ``tftp``, ``atftp``) from the
client namespace.  Every test keeps its state in its own $LABKIT_STATE_DIR and
uses the quick profile without the global sysctls (they are shared with other
runs on this machine); the tests of the globals are in test_testbed_lifecycle.py.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from labkit.exceptions import PodRejected, SysctlError
from labkit.scenario import load_scenario, with_overrides
from labkit.testbed import get_testbed
from labkit.testbed.netns import clean
from tests.conftest import need_program, need_root

pytestmark = pytest.mark.integration

UDP = "net.netfilter.nf_conntrack_udp_timeout"
STREAM = "net.netfilter.nf_conntrack_udp_timeout_stream"
MAX = "net.netfilter.nf_conntrack_max"


def local_iteration(number: int, **changes):
    """Iteration ``number`` (quick profile) without the machine-wide sysctls."""
    it = load_scenario().iteration(number, "quick")
    return with_overrides(it, node_sysctls=it.namespaced_node_sysctls, **changes)


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A factory of netns testbeds in this test's own state directory; all removed afterwards."""
    need_root()
    need_program("ip", "iptables-restore", "in.tftpd", "conntrack")
    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path / "state"))
    made = []

    def make(**options):
        tb = get_testbed("netns", **options)
        made.append(tb)
        return tb

    yield make
    for tb in made:
        tb.down()
    clean(tmp_path / "state")


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fetch(tb, tmp_path, tool: str, n: int = 0) -> str:
    """Fetch the served file from the client namespace with ``tool``; return the copy's sha256."""
    ip, port = tb.service
    out = tmp_path / f"{tool}-{n}.bin"
    if tool == "tftp":
        cmd = ["tftp", ip, str(port), "-m", "binary", "-c", "get", tb.file.name, str(out)]
    else:
        cmd = ["atftp", "-g", "-r", tb.file.name, "-l", str(out), ip, str(port)]
    tb.host("client").run(cmd, timeout=30)
    return sha256(out)


@pytest.mark.parametrize("replicas", [1, 3])
def test_tftp_and_atftp_fetch_the_file_byte_identical_through_the_nodeport(lab, tmp_path, replicas):
    need_program("tftp", "atftp")
    tb = lab()
    tb.up(local_iteration(3, replicas=replicas))
    assert tb.service == ("10.69.0.1", 30069)
    assert len([h for h in tb.status()["hosts"] if h["role"] == "pod"]) == replicas
    for i in range(3):
        assert fetch(tb, tmp_path, "tftp", i) == tb.file.sha256
        assert fetch(tb, tmp_path, "atftp", i) == tb.file.sha256
    assert tb.file.size == 5120


def test_with_three_replicas_every_pod_serves_some_of_300_fetches(lab, tmp_path):
    need_program("tftp")
    tb = lab()
    tb.up(local_iteration(3))
    ip, port = tb.service
    out = tmp_path / "loop.bin"
    script = (f"ok=0; for i in $(seq 300); do rm -f {out}; "
              f"tftp {ip} {port} -m binary -c get {tb.file.name} {out} && "
              f"[ $(sha256sum < {out} | cut -c1-64) = {tb.file.sha256} ] && ok=$((ok+1)); done; echo $ok")
    res = tb.host("client").run(["sh", "-c", script], timeout=240)
    assert int(res.stdout.split()[-1]) == 300
    # Each pod tracks its connections: its table counts what it served (entries live 30 s).
    served = {r: int(tb.host(r).read_sysctl("net.netfilter.nf_conntrack_count"))
              for r in tb.roles() if r.startswith("pod-")}
    assert len(served) == 3 and all(n > 0 for n in served.values()), served
    assert sum(served.values()) >= 300  # at least the data flow of each transfer


def test_the_node_tracks_the_request_with_the_tftp_helper(lab, tmp_path):
    need_program("tftp")
    tb = lab()
    tb.up(local_iteration(2))
    fetch(tb, tmp_path, "tftp")
    res = tb.host("node").run(["conntrack", "-L", "-p", "udp", "--orig-port-dst", "30069"])
    request = [line for line in res.stdout.splitlines() if "dport=30069" in line]
    assert request and all("helper=tftp" in line for line in request), res.stdout
    assert "[UNREPLIED]" in request[0]  # the reply comes from a new port: another flow


def fetch_fails(tb, tmp_path) -> bool:
    """True when tftp gives up (3 s) without the whole file."""
    ip, port = tb.service
    out = tmp_path / "maybe.bin"
    out.unlink(missing_ok=True)
    script = f"rexmt 1\ntimeout 3\nbinary\nget {tb.file.name} {out}\nquit\n"
    res = tb.host("client").run(["tftp", ip, str(port)], input=script, check=False, timeout=30)
    failed = "timed out" in res.stdout + res.stderr
    assert failed or sha256(out) == tb.file.sha256
    return failed


def test_without_the_helper_rule_the_fetch_fails(lab, tmp_path):
    need_program("tftp")
    tb = lab(helper_rule=False)
    tb.up(local_iteration(2))
    assert "--helper" not in tb.host("node").run(["iptables-save", "-t", "raw"]).stdout
    assert tb.status()["helper_rule"] is False
    assert fetch_fails(tb, tmp_path)
    # the switch also works on a running testbed, both ways
    lab(helper_rule=True).up(local_iteration(2))
    assert not fetch_fails(tb, tmp_path)
    again = lab(helper_rule=False)
    again.up(local_iteration(2))
    assert fetch_fails(again, tmp_path)


def test_pods_that_do_not_track_keep_an_empty_conntrack_table(lab, tmp_path):
    need_program("tftp")
    tb = lab()
    tb.up(local_iteration(2, pods_track_conntrack=False))
    fetch(tb, tmp_path, "tftp")
    assert tb.host("pod-1").read_sysctl("net.netfilter.nf_conntrack_count") == "0"
    assert int(tb.host("node").read_sysctl("net.netfilter.nf_conntrack_count")) >= 2
    tb.up(local_iteration(2))  # tracking is part of the pod template: the pod is replaced
    fetch(tb, tmp_path, "tftp", 1)
    assert int(tb.host("pod-1").read_sysctl("net.netfilter.nf_conntrack_count")) >= 2


def test_the_plain_server_of_iteration_1_is_reached_without_nat(lab, tmp_path):
    need_program("tftp")
    tb = lab()
    tb.up(local_iteration(1))
    assert tb.service == ("10.69.0.1", 69)
    assert tb.roles() == ["init", "node", "client"]
    assert fetch(tb, tmp_path, "tftp") == tb.file.sha256
    assert "KUBE-" not in tb.host("node").run(["iptables-save"]).stdout
    server = tb.status()["hosts"][1]
    assert server["role"] == "node" and server["server_pid"] > 0


def test_allowed_pod_sysctls_read_back_inside_the_pod(lab):
    tb = lab()
    tb.up(local_iteration(8))
    pod, node = tb.host("pod-1"), tb.host("node")
    assert (pod.read_sysctl(UDP), pod.read_sysctl(STREAM)) == ("10", "20")
    assert (node.read_sysctl(UDP), node.read_sysctl(STREAM)) == ("10", "20")
    # iteration 7: node timeouts only; the new pod keeps the kernel's defaults
    tb.up(local_iteration(7))
    assert tb.host("pod-1").read_sysctl(UDP) == "30"
    assert tb.host("node").read_sysctl(UDP) == "10"


def test_a_forbidden_pod_sysctl_refuses_the_pod_and_changes_nothing(lab):
    tb = lab()
    with pytest.raises(PodRejected) as info:
        tb.up(local_iteration(8, allowed_unsafe_sysctls=()))
    assert info.value.reason == "SysctlForbidden" and UDP in str(info.value)
    assert tb.status()["state"] == "down" and not tb.state_dir.exists()
    tb.up(local_iteration(3))  # a running testbed stays as it was
    before = tb.status()
    with pytest.raises(PodRejected):
        tb.up(local_iteration(8, allowed_unsafe_sysctls=("net.ipv4.*",)))
    assert tb.status()["hosts"] == before["hosts"]


def test_the_global_sysctls_are_refused_per_pod(lab):
    tb = lab()
    with pytest.raises(PodRejected) as info:
        tb.up(local_iteration(8, pod_sysctls={MAX: 4096}, allowed_unsafe_sysctls=("net.netfilter.*",)))
    assert info.value.reason == "SysctlForbidden" and MAX in str(info.value)
    assert "not namespaced" in str(info.value)
    # and the kernel agrees: a pod's namespace cannot write it
    tb.up(local_iteration(2))
    with pytest.raises(SysctlError, match="read-only|Permission|not permitted"):
        tb.host("pod-1").write_sysctl(MAX, 4096)


def test_reconfiguring_scales_pods_and_switches_setups_without_leaks(lab, tmp_path):
    need_program("tftp")
    tb = lab()
    tb.up(local_iteration(3))
    run = tb.run_id
    first = {h["netns"] for h in tb.status()["hosts"] if h["role"] == "pod"}
    tb.up(local_iteration(2))  # 3 -> 1 replica: two pods go, one stays
    pods = [h for h in tb.status()["hosts"] if h["role"] == "pod"]
    assert len(pods) == 1 and pods[0]["netns"] in first and len(tb.status()["endpoints"]) == 1
    assert fetch(tb, tmp_path, "tftp") == tb.file.sha256
    tb.up(local_iteration(8))  # new pod template (sysctls): the pod is replaced
    assert tb.status()["hosts"][2]["netns"] not in first
    tb.up(local_iteration(1))  # plain server: pods and kube-proxy rules go
    assert tb.run_id == run and tb.roles() == ["init", "node", "client"]
    assert fetch(tb, tmp_path, "tftp", 1) == tb.file.sha256
    live = [e["name"] for e in tb.ledger.entries() if e["kind"] == "netns"]
    assert sorted(live) == sorted([f"lk{run}-client", f"lk{run}-node"])
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(n.split()[0] for n in listed.splitlines() if n.startswith(f"lk{run}")) == sorted(live)
    tb.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"lk{run}" not in listed


def test_status_hosts_and_monitor_targets_agree(lab):
    tb = lab()
    tb.up(local_iteration(9))
    status = tb.status()
    assert status["state"] == "up" and status["service"] == {
        "node_ip": "10.69.0.1", "node_port": 30069, "protocol": "udp", "name": "default/tftp-server",
        "cluster_ip": "10.96.0.69"}
    assert status["file"]["size"] == 5120 and len(status["file"]["sha256"]) == 64
    assert tb.roles() == ["init", "node", "pod-1", "pod-2", "client"]
    assert set(tb.monitor_targets()) == {"init", "node", "pod-1", "pod-2"}
    roles = tb.netns_roles()
    assert sorted(roles.values()) == sorted(tb.roles())
    for h in status["hosts"]:
        assert tb.host(h["name"]).netns == h["netns"]
        assert h["ip"] in tb.host(h["name"]).run(["ip", "-br", "addr"]).stdout
    with pytest.raises(Exception, match="pod-3"):
        tb.host("pod-3")


def test_a_pods_in_tftpd_runs_under_its_cpu_limit(lab):
    tb = lab()
    tb.up(local_iteration(3, cpu_limit=0.25))
    for h in tb.status()["hosts"][2:]:
        cgroup = h["cgroup"]
        assert h["pid"] in [int(p) for p in open(f"{cgroup}/cgroup.procs").read().split()]
        if cgroup.startswith("/sys/fs/cgroup/cpu/"):
            assert open(f"{cgroup}/cpu.cfs_quota_us").read().strip() == "25000"
        else:
            assert open(f"{cgroup}/cpu.max").read().split()[0] == "25000"
        assert open(f"/proc/{h['pid']}/comm").read().strip() == "in.tftpd"


def test_a_client_reusing_its_port_reaches_the_new_pod_after_a_rollout(lab, tmp_path):
    # kube-proxy deletes the UDP conntrack entries of removed endpoints; without that the
    # node's old request entry (30 s) would still send this client to the pod that is gone.
    need_program("tftp")
    tb = lab()
    tb.up(local_iteration(2))
    node_ip, port = tb.service
    cmd = ["tftp", "-R", "40000:40000", node_ip, str(port), "-m", "binary", "-c", "get", tb.file.name]
    tb.host("client").run([*cmd, str(tmp_path / "a.bin")], timeout=30)
    old = tb.status()["hosts"][2]["ip"]
    tb.up(local_iteration(8))  # new pod template: the pod is replaced by one with a new address
    assert tb.status()["hosts"][2]["ip"] != old
    tb.host("client").run([*cmd, str(tmp_path / "b.bin")], timeout=30)
    assert sha256(tmp_path / "b.bin") == tb.file.sha256
    assert old not in tb.host("node").run(["conntrack", "-L", "-p", "udp"]).stdout
