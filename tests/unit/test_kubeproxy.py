"""kube-proxy's rules rendered from the Service and the pods, against golden output."""

from pathlib import Path

import pytest

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
