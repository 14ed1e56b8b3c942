"""k8s-manifests/: valid Kubernetes objects, sized per iteration, and kubelet-style sysctl admission."""

import pytest
import yaml

from labkit.exceptions import PodRejected, ScenarioError, TestbedError
from labkit.manifests import (MANIFEST_DIR, Manifests, admit_sysctls, check_allowlist, dump_yaml, format_cpu,
                              is_namespaced, parse_cpu)
from labkit.scenario import load_scenario

UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"


@pytest.fixture(scope="module")
def manifests():
    return Manifests()


def test_every_manifest_is_a_kubernetes_object():
    for path in MANIFEST_DIR.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert (doc["apiVersion"], doc["kind"]) in {
            ("apps/v1", "Deployment"), ("v1", "Service"),
            ("kubelet.config.k8s.io/v1beta1", "KubeletConfiguration"),
            ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")}, path
        if doc["kind"] in ("Deployment", "Service"):
            assert doc["metadata"]["name"] == "tftp-server" and doc["spec"], path


def test_deployment_selector_matches_its_pods_and_the_service(manifests):
    d, s = manifests.deployment, manifests.service
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["apiVersion"] == "apps/v1"
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert s["spec"]["selector"].items() <= labels.items()
    container = d["spec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 69, "protocol": "UDP", "name": "tftp"}.items() <= container["ports"][0].items()
    assert "command" not in container  # the image's entrypoint must run (it adds the stateful rule)


def test_service_is_a_udp_nodeport_on_30069(manifests):
    sp = manifests.service_port()
    assert (sp.protocol, sp.port, sp.target_port, sp.node_port) == ("UDP", 69, 69, 30069)
    assert sp.service_port_name == "default/tftp-server:tftp"


def test_deployment_is_sized_for_iteration_8(manifests):
    it = load_scenario().iteration(8, "lab")
    doc = manifests.deployment_for(it)
    pod = doc["spec"]["template"]["spec"]
    assert doc["spec"]["replicas"] == 1
    assert {x["name"]: x["value"] for x in pod["securityContext"]["sysctls"]} == {
        k: str(v) for k, v in it.pod_sysctls.items()}
    assert set(it.pod_sysctls) == {UDP_TIMEOUT, "net.netfilter.nf_conntrack_udp_timeout_stream"}
    assert pod["containers"][0]["resources"]["limits"]["cpu"] == "350m"
    assert yaml.safe_load(dump_yaml(doc)) == doc
    assert manifests.deployment["spec"]["template"]["spec"]["securityContext"]["sysctls"] == []  # not mutated


def test_article_profile_has_no_cpu_limit_and_nine_has_two_replicas(manifests):
    it = load_scenario().iteration(9, "article")
    doc = manifests.deployment_for(it)
    assert doc["spec"]["replicas"] == 2
    assert "cpu" not in doc["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    tpl = manifests.pod_template_for(it)
    assert tpl.cpu_limit is None and tpl.replicas == 2 and tpl.sysctls[UDP_TIMEOUT] == "10"


def test_a_bad_manifest_is_refused_naming_the_field(tmp_path):
    for f in MANIFEST_DIR.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text())
    svc = tmp_path / "tftp-server-service.yaml"
    svc.write_text(svc.read_text().replace("nodePort: 30069", "nodePort: 69"))
    with pytest.raises(ScenarioError) as info:
        Manifests(tmp_path)
    assert "spec.ports[0].nodePort" in str(info.value) and "30000-32767" in str(info.value)


def test_cpu_quantities():
    assert parse_cpu("350m") == pytest.approx(0.35)
    assert parse_cpu("1") == 1.0 and parse_cpu(0.5) == 0.5
    assert format_cpu(0.35) == "350m"
    with pytest.raises(ScenarioError):
        parse_cpu("lots")


def test_safe_sysctls_are_always_admitted():
    admit_sysctls("p", {"net.ipv4.ip_local_port_range": "1024 65000"}, [])


def test_an_unsafe_sysctl_is_refused_unless_allowlisted():
    with pytest.raises(PodRejected) as info:
        admit_sysctls("tftp-server-abc", {UDP_TIMEOUT: 10}, [])
    assert info.value.reason == "SysctlForbidden"
    assert UDP_TIMEOUT in str(info.value) and "tftp-server-abc" in str(info.value)
    admit_sysctls("p", {UDP_TIMEOUT: 10}, [UDP_TIMEOUT])
    admit_sysctls("p", {UDP_TIMEOUT: 10}, ["net.netfilter.*"])
    with pytest.raises(PodRejected):
        admit_sysctls("p", {UDP_TIMEOUT: 10}, ["net.ipv4.*"])


@pytest.mark.parametrize("name", ["net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_expect_max",
                                  "vm.swappiness"])
def test_a_global_sysctl_is_refused_even_when_a_pattern_allows_it(name):
    assert not is_namespaced(name)
    with pytest.raises(PodRejected) as info:
        admit_sysctls("p", {name: 1}, ["net.*", "net.netfilter.*"])
    assert info.value.reason == "SysctlForbidden" and name in str(info.value) and "not namespaced" in str(info.value)


def test_the_kubelet_refuses_an_allowlist_of_non_namespaced_sysctls():
    assert check_allowlist(["net.netfilter.*", "kernel.shm*"]) == ("net.netfilter.*", "kernel.shm*")
    for bad in (["vm.swappiness"], ["kernel.*"], ["net.*.foo"]):
        with pytest.raises(TestbedError):
            check_allowlist(bad)
