"""k8s-manifests/ against the Kubernetes object model, and against what the VMs build.

The Deployment and the Service (as written, and as labkit sizes them for every
iteration of every profile, and as the driver's JSON patch leaves them) are
checked field by field against the official Python client's models, which are
generated from the Kubernetes OpenAPI spec: every field must exist in its type
(a typo is not silently dropped, as the API server would), every value must
have the field's type (a sysctl value must be a string), and what a type
requires must be there.  The kubelet and kube-proxy pieces are component
configurations, absent from that spec; they are checked against their
``v1beta1``/``v1alpha1`` Go types' JSON fields for the fields the lab uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubernetes.client import ApiClient, models

from labkit.manifests import Manifests
from labkit.scenario import load_scenario
from labkit.testbed.kubeadm import KubeadmDriver
from tests.kubeadm_fake import _json_patch

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "k8s-manifests"
# the client writes container types as list[X] / dict(str, X) or List[X] / Dict[str, X]
_LIST = re.compile(r"^[lL]ist\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")


def check(value: Any, kind: str, where: str) -> list[str]:
    """Every problem of ``value`` as the OpenAPI type ``kind`` (a model name or a primitive)."""
    if m := _LIST.match(kind):
        if not isinstance(value, list):
            return [f"{where}: must be a list of {m.group(1)}, got {value!r}"]
        return [p for i, v in enumerate(value) for p in check(v, m.group(1), f"{where}[{i}]")]
    if m := _DICT.match(kind):
        if not isinstance(value, dict):
            return [f"{where}: must be a mapping, got {value!r}"]
        inner = m.group(1) or m.group(2)
        return [p for k, v in value.items() for p in check(v, inner, f"{where}.{k}")]
    primitive = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
                 "object": (str, int, dict, list, bool), "datetime": (str,), "bytes": (str,)}
    if kind in primitive:
        ok = isinstance(value, primitive[kind]) and not (kind == "int" and isinstance(value, bool))
        return [] if ok else [f"{where}: must be {kind}, got {value!r}"]
    model = getattr(models, kind)
    if not isinstance(value, dict):
        return [f"{where}: must be a {kind} mapping, got {value!r}"]
    by_json = {j: a for a, j in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in by_json:
            problems.append(f"{where}.{key}: no such field in {kind} "
                            f"(fields: {', '.join(sorted(by_json))})")
        else:
            problems += check(item, model.openapi_types[by_json[key]], f"{where}.{key}")
    return problems


def validate(doc: dict, kind: str) -> None:
    """Refuse ``doc`` unless it is a valid ``kind`` (e.g. V1Deployment)."""
    problems = check(doc, kind, kind)
    assert not problems, "\n".join(problems)
    try:  # the models' own checks: required fields, enums the client knows
        ApiClient()._ApiClient__deserialize(json.loads(json.dumps(doc)), kind)
    except ValueError as exc:
        raise AssertionError(f"{kind}: {exc}") from None


def _doc(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_the_checker_catches_typos_wrong_types_and_missing_fields():
    good = _doc("tftp-server-deployment.yaml")
    typo = json.loads(json.dumps(good))
    typo["spec"]["template"]["spec"]["securityContex"] = {}
    with pytest.raises(AssertionError, match=r"V1Deployment.spec.template.spec.securityContex: no such field"):
        validate(typo, "V1Deployment")
    wrong = json.loads(json.dumps(good))
    wrong["spec"]["template"]["spec"]["securityContext"]["sysctls"] = [
        {"name": "net.netfilter.nf_conntrack_udp_timeout", "value": 10}]
    with pytest.raises(AssertionError, match=r"sysctls\[0\].value: must be str, got 10"):
        validate(wrong, "V1Deployment")
    missing = json.loads(json.dumps(good))
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(AssertionError, match="name"):
        validate(missing, "V1Deployment")


def test_deployment_and_service_files_are_valid_objects():
    deployment, service = _doc("tftp-server-deployment.yaml"), _doc("tftp-server-service.yaml")
    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    validate(deployment, "V1Deployment")
    validate(service, "V1Service")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("profile", ["article", "lab", "quick"])
def test_what_labkit_applies_for_every_iteration_is_valid(profile, tmp_path):
    scenario = load_scenario()
    driver = KubeadmDriver(None, None, node_name="worker-1", node_ip="192.168.56.11",
                           state_path=tmp_path / "s.json")
    patched = driver.deployment_doc(scenario.iteration(2, profile))
    for n in scenario.numbers:
        it = scenario.iteration(n, profile)
        validate(driver.deployment_doc(it), "V1Deployment")  # first apply
        for op in driver.patch_ops(it):  # and every later one, by patch
            _json_patch(patched, op)
        validate(patched, "V1Deployment")
        assert patched == driver.deployment_doc(it)  # the patch reaches the same object


def test_component_config_pieces_use_real_fields():
    kubelet, proxy = _doc("kubelet-config.yaml"), _doc("kube-proxy-config.yaml")
    # k8s.io/kubelet/config/v1beta1 KubeletConfiguration, json tags
    assert (kubelet["apiVersion"], kubelet["kind"]) == ("kubelet.config.k8s.io/v1beta1", "KubeletConfiguration")
    assert set(kubelet) <= {"apiVersion", "kind", "allowedUnsafeSysctls"}
    assert isinstance(kubelet["allowedUnsafeSysctls"], list)
    # k8s.io/kube-proxy/config/v1alpha1 KubeProxyConfiguration / KubeProxyConntrackConfiguration
    assert (proxy["apiVersion"], proxy["kind"]) == ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
    assert set(proxy) <= {"apiVersion", "kind", "mode", "conntrack"}
    assert proxy["mode"] in ("iptables", "ipvs", "nftables")
    assert set(proxy["conntrack"]) <= {"maxPerCore", "min", "tcpEstablishedTimeout", "tcpCloseWaitTimeout",
                                       "udpTimeout", "udpStreamTimeout"}
    assert all(isinstance(v, int) and v >= 0 for v in proxy["conntrack"].values())
    Manifests(MANIFESTS)  # and labkit's own reading of all four


def test_the_image_the_deployment_runs_is_the_one_the_worker_builds():
    container = _doc("tftp-server-deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    worker = (ROOT / "vagrant" / "provision" / "worker.sh").read_text()
    built = re.search(r"^image=(\S+)$", worker, re.M).group(1)
    assert container["image"] == built
    assert container.get("imagePullPolicy") in ("IfNotPresent", "Never")  # the VMs build, never pull
    recipe = (MANIFESTS / "image" / "Containerfile").read_text()
    instructions = [ln.split()[0] for ln in recipe.splitlines() if ln.strip() and not ln.startswith("#")
                    and not ln.startswith((" ", "\t"))]
    assert instructions[0] == "FROM" and {"ENTRYPOINT", "CMD"} <= set(instructions)
    for arg in ("FILE_SIZE", "FILE_NAME"):
        assert f"ARG {arg}" in recipe and f"{arg}=" in worker
    entry = re.search(r"^ENTRYPOINT (.+)$", recipe, re.M).group(1)
    assert json.loads(entry) == ["/usr/local/bin/entrypoint.sh"]
