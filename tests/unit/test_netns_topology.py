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


# --- the node's rules: one source (the topology), applied in order by the backend -----------

NODE = "lkab12c-node"


def _change(manifests, ips, **kw):
    return topology.node_rule_change(manifests, NODE, ips, **kw)


def test_the_first_load_has_the_jumps_and_the_helper_later_ones_redefine_and_drop_stale_chains(manifests):
    first = _change(manifests, ["10.244.0.2"])
    [kube] = first.sets
    assert (kube.tool, kube.flush, kube.netns) == ("iptables-restore", False, NODE)
    assert "-A PREROUTING" in kube.text and "--helper tftp" in kube.text and "-X " not in kube.text
    assert first.endpoints == ["10.244.0.2:69"] and first.helper_rule
    rescaled = _change(manifests, ["10.244.0.3", "10.244.0.4"], stale_ips=["10.244.0.2"],
                       loaded=("iptables", False))
    [kube] = rescaled.sets
    assert "-A PREROUTING" not in kube.text and "--helper" not in kube.text  # the jumps stay from the first load
    assert kube.text.count("\n-X KUBE-SEP-") == 1 and "10.244.0.2" not in kube.text.replace("-X", "")
    assert rescaled.endpoints == ["10.244.0.3:69", "10.244.0.4:69"]


def test_switching_the_helper_rule_on_a_running_testbed_empties_the_raw_table_first(manifests):
    off = _change(manifests, ["10.244.0.2"], loaded=("iptables", False), helper_rule=True, helper_option=False)
    assert [(s.purpose, s.flush) for s in off.sets] == [("raw table emptied (helper rule switched)", True),
                                                        ("kube-proxy (iptables mode)", False)]
    assert off.sets[0].text == "*raw\nCOMMIT\n" and off.helper_rule is False
    on = _change(manifests, ["10.244.0.2"], loaded=("iptables", False), helper_rule=False, helper_option=True)
    assert [s.purpose for s in on.sets] == ["raw table emptied (helper rule switched)",
                                            "TFTP conntrack helper rule", "kube-proxy (iptables mode)"]
    assert "-j CT --helper tftp" in on.sets[1].text and on.helper_rule is True
    # the same switch as the running rules, or none given, or a first load: nothing extra
    for kw in (dict(helper_option=True), dict(helper_option=None), dict(loaded=None, helper_option=False)):
        change = _change(manifests, ["10.244.0.2"], **{"loaded": ("iptables", False), **kw})
        assert [s.purpose for s in change.sets] == ["kube-proxy (iptables mode)"] and change.helper_rule


def test_another_kind_of_rules_starts_from_empty_tables(manifests):
    to_nft = _change(manifests, ["10.244.0.2"], proxy_mode="nftables", loaded=("iptables", False))
    assert [(s.tool, s.purpose, s.flush) for s in to_nft.sets] == [
        ("iptables-restore", "tables emptied", True), ("nft", "kube-proxy (nftables mode)", False)]
    assert to_nft.sets[0].text == "*raw\nCOMMIT\n*filter\nCOMMIT\n*nat\nCOMMIT\n"
    back = _change(manifests, ["10.244.0.2"], notrack=True, loaded=("nftables", False))
    assert [(s.tool, s.purpose) for s in back.sets] == [
        ("nft", "kube-proxy's nftables tables removed"), ("iptables-restore", "tables emptied"),
        ("iptables-restore", "kube-proxy (iptables mode)"), ("iptables-restore", "NodePort untracked (NOTRACK)")]
    assert "delete table ip kube-proxy" in back.sets[0].text and "-A PREROUTING" in back.sets[2].text
    # NOTRACK comes with the first load only; an endpoint change keeps it
    again = _change(manifests, ["10.244.0.3"], stale_ips=["10.244.0.2"], notrack=True, loaded=("iptables", True))
    assert [s.purpose for s in again.sets] == ["kube-proxy (iptables mode)"]
    nft_again = _change(manifests, ["10.244.0.3"], proxy_mode="nftables", loaded=("nftables", False))
    assert [s.tool for s in nft_again.sets] == ["nft"] and "10.244.0.3" in nft_again.sets[0].text


def test_plan_shows_the_node_rules_of_a_first_load(scenario, manifests):
    for number in (2, 3, 11, 12):
        it = scenario.iteration(number, "quick")
        top = topology.plan(it, manifests, "ab12c")
        ips = [s.ip for s in top.servers]
        first = topology.node_rule_change(manifests, NODE, ips, proxy_mode=it.proxy_mode, notrack=it.node_notrack)
        assert [r for r in top.rules if r.netns == NODE] == first.sets


class _Recorder:
    """A machine that records the commands run in its namespaces."""

    def __init__(self, log, netns=None, nft=True):
        self.log, self.ns, self.nft = log, netns, nft

    def netns(self, name, host_name=None):
        return _Recorder(self.log, name, self.nft)

    def which(self, program):
        return self.nft or program != "nft"

    def run(self, argv, input=None, timeout=None, check=True):
        self.log.append((self.ns, " ".join(argv), input))


class _Testbed:
    def __init__(self, manifests, helper_option=None, nft=True):
        self.state = RunState("ab12c")
        self.manifests, self.helper_option, self.log, self.saved = manifests, helper_option, [], []
        self.machine = _Recorder(self.log, nft=nft)

    def ns(self, what):
        return f"lkab12c-{what}"

    def save(self):
        self.saved.append(self.state.to_dict())


def test_node_rules_apply_each_change_in_order_through_its_tool_and_record_what_is_loaded(manifests):
    from types import SimpleNamespace

    from labkit.testbed.netns_apply import NodeRules

    tb = _Testbed(manifests)
    rules = NodeRules(tb)
    iptables, nft = SimpleNamespace(proxy_mode="iptables", node_notrack=False), SimpleNamespace(proxy_mode="nftables")
    rules.apply([Pod("t", "10.244.0.2")], [], iptables)
    assert [(ns, cmd) for ns, cmd, _ in tb.log] == [(NODE, "iptables-restore -w --noflush")]
    assert tb.log[0][2] == _change(manifests, ["10.244.0.2"]).sets[0].text
    assert (tb.state.rules_applied, tb.state.endpoints) == (True, ["10.244.0.2:69"])
    tb.helper_option = False
    rules.apply([Pod("t", "10.244.0.3")], [Pod("t", "10.244.0.2")], iptables)
    assert [cmd for _, cmd, _ in tb.log[1:]] == ["iptables-restore -w", "iptables-restore -w --noflush"]
    assert tb.state.helper_rule is False and tb.saved[-1]["endpoints"] == ["10.244.0.3:69"]
    rules.apply([Pod("t", "10.244.0.3")], [], nft)
    assert [cmd for _, cmd, _ in tb.log[3:]] == ["iptables-restore -w", "nft -f -"]
    assert (tb.state.proxy_mode, tb.state.helper_rule) == ("nftables", False)
    assert "ct helper" not in tb.log[-1][2]  # the switch the running testbed has
    rules.clear()
    assert [cmd for _, cmd, _ in tb.log[5:]] == ["nft -f -", "iptables-restore -w"]
    assert (tb.state.rules_applied, tb.state.endpoints) == (False, [])
    rules.clear()  # nothing loaded: nothing to do
    assert len(tb.log) == 7


def test_nftables_mode_without_nft_installed_says_what_to_install(manifests):
    from types import SimpleNamespace

    from labkit.exceptions import TestbedError
    from labkit.testbed.netns_apply import NodeRules

    tb = _Testbed(manifests, nft=False)
    with pytest.raises(TestbedError, match="package nftables"):
        NodeRules(tb).apply([Pod("t", "10.244.0.2")], [], SimpleNamespace(proxy_mode="nftables"))
    assert tb.log == [] and not tb.state.rules_applied
