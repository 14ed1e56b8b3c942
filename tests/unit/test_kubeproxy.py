"""kube-proxy's rules rendered from the Service and the pods, against golden output."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit.kubeproxy import Endpoint, probability, render_rules, sep_chain, svc_chain
from labkit.manifests import Manifests, ServicePort

DATA = Path(__file__).parent.parent / "data" / "kubeproxy"
EPS = [Endpoint(f"10.244.0.{i}", 69) for i in (2, 3, 4)]


@pytest.fixture(scope="module")
def svc():
    return Manifests().service_port()


@pytest.mark.parametrize("golden, kwargs", [
    ("one-endpoint.rules", dict(endpoints=EPS[:1], cluster_ip="10.96.0.69")),
    ("three-endpoints.rules", dict(endpoints=EPS, cluster_ip="10.96.0.69")),
    ("rescale-no-helper.rules", dict(endpoints=[EPS[1], Endpoint("10.244.0.5", 69)], cluster_ip="10.96.0.69",
                                     helper_rule=False, jumps=False, stale_endpoints=[EPS[0], EPS[2]])),
    ("no-endpoints.rules", dict(endpoints=[])),
])
def test_rendering_matches_the_golden_output(svc, golden, kwargs):
    endpoints = kwargs.pop("endpoints")
    assert render_rules(svc, endpoints, **kwargs) == (DATA / golden).read_text()


def test_chain_names_are_kube_proxys_own_hashes():
    # Values from kube-proxy's own tests (ns1/svc1:p80, TCP, endpoint 10.180.0.1:80).
    svc = ServicePort("ns1", "svc1", "p80", "TCP", 80, 80, 30080)
    assert svc_chain(svc) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert sep_chain(svc, Endpoint("10.180.0.1", 80)) == "KUBE-SEP-SXIVWICOYRO3J4NJ"


def test_random_probabilities_split_traffic_evenly():
    # Endpoint i of n is taken with 1/(n-i) of what reaches its rule: each gets 1/n overall.
    n = 3
    share, left = [], 1.0
    for i in range(n - 1):
        p = float(probability(i, n))
        share.append(left * p)
        left -= left * p
    share.append(left)
    assert share == pytest.approx([1 / 3] * 3)
    assert probability(0, 3) == "0.3333333333"


def test_three_endpoints_get_statistic_rules_and_a_dnat_each(svc):
    text = render_rules(svc, EPS)
    assert text.count("--mode random") == 2
    for ep in EPS:
        assert f"-j DNAT --to-destination {ep.ip}:69" in text
    assert "-j CT --helper tftp" in text and "--dport 30069" in text


def test_the_helper_rule_is_left_out_when_asked(svc):
    assert "--helper" not in render_rules(svc, EPS, helper_rule=False)
    assert "*raw" not in render_rules(svc, EPS, helper_rule=False)


@given(st.integers(min_value=1, max_value=40))
def test_any_number_of_endpoints_gets_an_even_share_and_its_own_chain(n):
    svc = ServicePort("default", "tftp-server", "tftp", "UDP", 69, 69, 30069)
    eps = [Endpoint(f"10.244.{i // 250}.{i % 250 + 2}", 69) for i in range(n)]
    text = render_rules(svc, eps)
    svc_rules = [line for line in text.splitlines() if line.startswith(f"-A {svc_chain(svc)} ")]
    assert [line.split()[-1] for line in svc_rules] == [sep_chain(svc, ep) for ep in eps]
    left, shares = 1.0, []
    for line in svc_rules:
        p = float(line.split("--probability ")[1].split()[0]) if "--probability" in line else 1.0
        shares.append(left * p)
        left -= left * p
    assert shares == pytest.approx([1 / n] * n, rel=1e-6)
    assert len({sep_chain(svc, ep) for ep in eps}) == n


def test_nftables_mode_spreads_the_nodeport_over_every_endpoint(svc):
    from labkit.kubeproxy import NFT_HELPER_TABLE, NFT_TABLE, render_nft_rules

    text = render_nft_rules(svc, EPS, cluster_ip="10.96.0.69")
    # loading it again replaces the tables: each is declared and deleted first
    assert text.startswith(f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")
    assert f"delete table ip {NFT_HELPER_TABLE}" in text
    assert "numgen random mod 3 vmap { 0 : goto" in text
    for ep in EPS:
        assert f"meta l4proto udp dnat to {ep.ip}:69" in text
        assert f"ip saddr {ep.ip} jump mark-for-masquerade" in text
    assert f"service-nodeports {{ udp . {svc.node_port} : goto external-" in text
    assert "service-ips { 10.96.0.69 . udp . 69 : goto service-" in text
    assert f'udp dport {svc.node_port} ct helper set "tftp"' in text
    assert "masquerade fully-random" in text and "meta mark & 0x4000 == 0 return" in text
    assert text.count("{") == text.count("}")


def test_nftables_helper_is_attached_between_conntrack_and_the_dnat(svc):
    """``ct helper set`` needs the entry conntrack (-200) made, and must see the nodePort before the
    nat chain (dstnat, -100) rewrites it to 69: at "filter" (0) it matched nothing and no transfer
    got through (iteration 12's defect)."""
    from labkit.kubeproxy import render_nft_rules

    named = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
    text = render_nft_rules(svc, EPS)
    chains = text.split("chain ")[1:]
    helper = next(c for c in chains if "ct helper set" in c)
    dnat = next(c for c in chains if "type nat hook prerouting" in c)
    prio = lambda chain: named[chain.split("priority ")[1].split(";")[0]]  # noqa: E731
    assert "hook prerouting" in helper and f"udp dport {svc.node_port} ct helper set" in helper
    assert -200 < prio(helper) < prio(dnat) == -100


def test_nftables_mode_without_helper_or_endpoints(svc):
    from labkit.kubeproxy import render_nft_cleanup, render_nft_rules

    text = render_nft_rules(svc, [], helper_rule=False)
    assert "ct helper" not in text and "numgen" not in text and "add element" not in text
    assert "chain services {" in text
    assert render_nft_cleanup() == ("table ip kube-proxy\ndelete table ip kube-proxy\n"
                                    "table ip labkit-helper\ndelete table ip labkit-helper\n")


def test_notrack_rule_goes_first_in_raw_prerouting(svc):
    from labkit.kubeproxy import render_notrack_rule

    assert render_notrack_rule(svc) == (
        "*raw\n-I PREROUTING 1 -p udp -m udp --dport 30069 -m comment --comment "
        '"default/tftp-server:tftp nodePort: untracked" -j NOTRACK\nCOMMIT\n')
