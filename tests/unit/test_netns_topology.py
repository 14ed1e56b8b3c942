"""The netns topology as data, and the typed run state: no root, no machine."""

import json

import pytest

from labkit.exceptions import StateCorrupt
from labkit.manifests import Manifests
from labkit.scenario import load_scenario
from labkit.testbed import topology
from labkit.testbed.runstate import Pod, RunState, parse_state


@pytest.fixture(scope="module")
def scenario():
    return load_scenario()


@pytest.fixture(scope="module")
def manifests():
    return Manifests()


def test_an_iteration_with_one_pod_is_two_namespaces_and_a_pod_behind_the_bridge(scenario, manifests):
    it = scenario.iteration(2, "quick")
    top = topology.plan(it, manifests, "ab12c")
    assert [(n.name, n.role) for n in top.namespaces] == [
        ("lkab12c-client", "client"), ("lkab12c-node", "node"), ("lkab12c-pod1", "pod1")]
    veth, bridge, pod_veth = top.links
    assert (veth.name, veth.peer, veth.peer_netns) == ("lkab12cn0", "lkab12cc0", "lkab12c-client")
    assert (bridge.name, bridge.kind) == ("lkab12cbr", "bridge")
    assert (pod_veth.name, pod_veth.peer, pod_veth.master) == ("lkab12cv1", "lkab12ce1", "lkab12cbr")
    assert {(a.netns, a.cidr) for a in top.addresses} == {
        ("lkab12c-node", "10.69.0.1/24"), ("lkab12c-client", "10.69.0.2/24"),
        ("lkab12c-node", "10.244.0.1/24"), ("lkab12c-pod1", "10.244.0.2/24")}
    assert [(r.netns, r.dest, r.via) for r in top.routes] == [("lkab12c-pod1", "default", "10.244.0.1")]
    # the quick profile's tables for iteration 2: global ones apart from the node's own
    assert top.global_sysctls == {"net.netfilter.nf_conntrack_max": 1024,
                                  "net.netfilter.nf_conntrack_expect_max": 128}
    assert top.sysctls["lkab12c-node"]["net.ipv4.ip_forward"] == 1
    [server] = top.servers
    assert (server.netns, server.cgroup, server.ip, server.cpu_limit) == (
        "lkab12c-pod1", "lkab12c-pod1", "10.244.0.2", 0.35)
    assert server.argv[0].endswith("in.tftpd") and server.argv[-1] == "/run/labkit/netns-xxxxx/srv"
    kube, track = top.rules
    assert kube.tool == "iptables-restore" and "KUBE-NODEPORTS" in kube.text
    assert "--helper tftp" in kube.text and "10.244.0.2:69" in kube.text
    assert track.netns == "lkab12c-pod1" and "--ctstate INVALID" in track.text


def test_replicas_spread_the_nodeport_over_each_pod_and_the_plain_server_has_no_rules(scenario, manifests):
    three = topology.plan(scenario.iteration(3, "quick"), manifests, "ab12c")
    assert [s.ip for s in three.servers] == ["10.244.0.2", "10.244.0.3", "10.244.0.4"]
    assert three.rules[0].text.count("--mode random") == 2  # the last endpoint takes the rest
    plain = topology.plan(scenario.iteration(1, "quick"), manifests, "ab12c")
    assert [n.role for n in plain.namespaces] == ["client", "node"]
    assert plain.rules == [] and [(s.label, s.netns, s.ip, s.cgroup) for s in plain.servers] == [
        ("server", "lkab12c-node", "10.69.0.1", "lkab12c-server")]


def test_rule_modes_past_the_article(scenario, manifests):
    nft = topology.plan(scenario.iteration(12, "quick"), manifests, "ab12c")
    assert nft.rules[0].tool == "nft" and "table ip kube-proxy" in nft.rules[0].text
    notrack = topology.plan(scenario.iteration(11, "quick"), manifests, "ab12c")
    assert [r.purpose for r in notrack.rules if r.netns.endswith("node")][-1] == "NodePort untracked (NOTRACK)"
    untracked_pods = topology.plan(scenario.iteration(10, "quick"), manifests, "ab12c")
    assert all(not r.netns.endswith("pod1") for r in untracked_pods.rules)
    no_helper = topology.plan(scenario.iteration(2, "quick"), manifests, "ab12c", helper_rule=False)
    assert "--helper" not in no_helper.rules[0].text


def test_the_topology_prints_readably_and_as_a_table(scenario, manifests):
    top = topology.plan(scenario.iteration(8, "quick"), manifests, "ab12c")
    text = str(top)
    assert text.splitlines()[0] == "netns topology of run ab12c:"
    assert "lkab12cv1" in text and "10.244.0.2/24" in text and "in.tftpd" in text
    assert "net.netfilter.nf_conntrack_udp_timeout" in text  # iteration 8's pod sysctls
    frame = top.to_frame()
    assert list(frame.columns) == ["kind", "netns", "name", "detail"]
    assert set(frame["kind"]) == {"netns", "link", "address", "route", "sysctl", "rules", "server"}
    assert "*nat" in top.describe(rules=True)


def test_interface_names_that_would_not_fit_are_refused():
    with pytest.raises(Exception, match="15 characters"):
        topology.pod("ab12c", 123456789, "10.244.0.2", Manifests().pod_template(), None, "/srv")


def test_udp_port_bound_reads_proc_net_udp():
    text = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            "  12: 00000000:0045 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2\n")
    assert topology.udp_port_bound(text, 69) and not topology.udp_port_bound(text, 70)
    assert not topology.udp_port_bound(text.splitlines()[0] + "\n", 69)


# --- the run state ---------------------------------------------------------------------------

OLD_STATE = {  # a state.json as labkit wrote it before the state was typed
    "testbed": "netns", "run_id": "k2x9p", "state": "up", "created": 1.0, "helper_rule": True,
    "rules_applied": True, "server": None, "next_serial": 2, "next_ip": 3,
    "globals": {"net.netfilter.nf_conntrack_max": 1024}, "node_defaults": {},
    "file": {"name": "file-5120.bin", "size": 5120, "sha256": "ab", "path": "/run/labkit/x/srv/file-5120.bin"},
    "pods": [{"serial": 1, "name": "tftp-abc-12345", "netns": "lkk2x9p-pod1", "ip": "10.244.0.2",
              "template": "abc", "veth": "lkk2x9pv1", "cpu_limit": 0.35, "sysctls": {}, "track_conntrack": True,
              "link_id": 7, "cgroup": "/sys/fs/cgroup/lkk2x9p-pod1", "pid": 4242, "start": 99, "ledger_id": 9}],
    "iteration": {"number": 2}, "last_up": {"seconds": 0.5}, "updated": 2.0, "proxy_mode": "iptables",
    "notrack": False, "endpoints": ["10.244.0.2:69"]}


def test_an_old_state_file_loads_typed_and_writes_back_the_same_keys():
    state = parse_state(json.dumps(OLD_STATE).encode(), "/run/labkit/netns-k2x9p/state.json")
    [pod] = state.pods
    assert isinstance(pod, Pod) and (pod.netns, pod.pid, pod.start, pod.link_id) == ("lkk2x9p-pod1", 4242, 99, 7)
    assert state.file.size == 5120 and state.globals["net.netfilter.nf_conntrack_max"] == 1024
    assert state.to_dict() == OLD_STATE


def test_a_state_from_before_the_rule_modes_gets_their_defaults():
    old = {k: v for k, v in OLD_STATE.items() if k not in ("proxy_mode", "notrack", "endpoints", "last_up")}
    state = RunState.from_dict(old)
    assert (state.proxy_mode, state.notrack, state.endpoints) == ("iptables", False, [])


@pytest.mark.parametrize("doc, why", [(b"{broken", "not JSON"), (b"[1, 2]", "not a netns testbed state"),
                                       (b'{"state": "up", "pods": [3]}', "pods"),
                                       (b'{"state": "up", "file": "x"}', "file")])
def test_a_damaged_state_file_is_refused_naming_it(doc, why):
    with pytest.raises(StateCorrupt) as info:
        parse_state(doc, "/run/labkit/netns-k2x9p/state.json")
    assert "/run/labkit/netns-k2x9p/state.json" in str(info.value) and why in str(info.value)
