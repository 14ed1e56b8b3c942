"""The Kubernetes manifests in ``k8s-manifests/``, read and sized for an iteration.

The same files are what the Vagrant testbed applies with kubectl and what the
netns testbed reads: the Deployment (replicas, ``resources.limits.cpu``,
``securityContext.sysctls``, the server's arguments), the NodePort Service, and
the kubelet configuration piece (``allowedUnsafeSysctls``).

Pod sysctls are admitted the way the kubelet admits them: the safe set always,
an unsafe sysctl only when an ``allowedUnsafeSysctls`` entry (a name or a
``prefix*`` pattern) matches it; a sysctl the kernel keeps global (not
namespaced) is refused.  A refused pod raises
:class:`~labkit.exceptions.PodRejected` with the kubelet's reason
``SysctlForbidden`` and the sysctl's name, as ``kubectl describe pod`` shows it.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from labkit.exceptions import LabkitError, PodRejected, ScenarioError, TestbedError
from labkit.host import sysctl_name

MANIFEST_DIR = Path(__file__).resolve().parent.parent / "k8s-manifests"
DEPLOYMENT_FILE = "tftp-server-deployment.yaml"
SERVICE_FILE = "tftp-server-service.yaml"
KUBELET_FILE = "kubelet-config.yaml"
KUBE_PROXY_FILE = "kube-proxy-config.yaml"
SYSCTL_FORBIDDEN = "SysctlForbidden"

# The kubelet's safe set (Kubernetes 1.32): always allowed, no allowlist needed.
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
})
# What the kubelet knows to be namespaced (component-helpers' sysctl namespaces).
_NAMESPACED_NAMES = frozenset({"kernel.sem", "kernel.domainname", "kernel.hostname"})
_NAMESPACED_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.", "net.")
# Under net.* but global in the kernel (writable only in the initial namespace since 5.13).
GLOBAL_NET_SYSCTLS = frozenset({
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_expect_max",
    "net.nf_conntrack_max",
    "net.netfilter.nf_conntrack_buckets",
})


def is_namespaced(name: str) -> bool:
    """True when a pod may set ``name`` in its own namespaces (kubelet's view + the kernel's globals)."""
    name = sysctl_name(name)
    if name in GLOBAL_NET_SYSCTLS:
        return False
    return name in _NAMESPACED_NAMES or name.startswith(_NAMESPACED_PREFIXES)


def _pattern_namespaced(pattern: str) -> bool:
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return prefix in _NAMESPACED_NAMES or any(prefix.startswith(p) for p in _NAMESPACED_PREFIXES)
    return is_namespaced(pattern)


def check_allowlist(patterns: Iterable[str]) -> tuple[str, ...]:
    """Check a kubelet ``allowedUnsafeSysctls`` list as the kubelet does at start-up.

    Raises:
        TestbedError: a pattern is malformed or names sysctls not known to be
            namespaced (the kubelet would refuse to start).
    """
    out = []
    for p in patterns:
        if not isinstance(p, str) or not p or "*" in p[:-1]:
            raise TestbedError(f"kubelet: invalid allowedUnsafeSysctls entry {p!r}: "
                               "a sysctl name or a prefix ending in '*'")
        if not _pattern_namespaced(p):
            raise TestbedError(f"kubelet: the sysctls {p!r} are not known to be namespaced; "
                               "allowedUnsafeSysctls may only name namespaced sysctls")
        out.append(p)
    return tuple(out)


def admit_sysctls(pod: str, sysctls: Mapping[str, Any], allowed_unsafe: Iterable[str]) -> None:
    """Admit a pod's ``securityContext.sysctls`` as the kubelet does.

    Args:
        pod: the pod's name (for the message).
        sysctls: name -> value.
        allowed_unsafe: the kubelet's ``allowedUnsafeSysctls``.

    Raises:
        PodRejected: reason ``SysctlForbidden``, naming the first sysctl refused.
    """
    patterns = tuple(allowed_unsafe)
    for raw in sysctls:
        try:
            name = sysctl_name(raw)
        except LabkitError:
            raise PodRejected(pod, SYSCTL_FORBIDDEN, f"forbidden sysctl: {raw!r}: not a valid sysctl name") from None
        if not is_namespaced(name):
            raise PodRejected(pod, SYSCTL_FORBIDDEN,
                              f"forbidden sysctl: {name!r} is not namespaced: the kernel keeps it global "
                              "to the node; set it on the node, not in a pod")
        if name in SAFE_SYSCTLS:
            continue
        if any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns):
            continue
        raise PodRejected(pod, SYSCTL_FORBIDDEN,
                          f"forbidden sysctl: {name!r} not allowlisted (unsafe; add it to the kubelet's "
                          "allowedUnsafeSysctls)")


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


def parse_cpu(quantity: Any) -> float:
    """Turn a Kubernetes CPU quantity (``350m``, ``0.35``, ``1``) into cores.

    Raises:
        ScenarioError: not a CPU quantity.
    """
    m = _CPU.match(str(quantity).strip())
    if not m or float(m.group(1)) <= 0:
        raise ScenarioError(f"not a CPU quantity: {quantity!r} (e.g. 350m or 0.5)")
    value = float(m.group(1))
    return value / 1000 if m.group(2) else value


def format_cpu(cores: float) -> str:
    """Cores as a Kubernetes quantity in millicores (0.35 -> ``350m``)."""
    return f"{round(cores * 1000)}m"


@dataclass(frozen=True)
class ServicePort:
    """The Service's one port, as kube-proxy sees it."""

    namespace: str
    name: str
    port_name: str
    protocol: str
    port: int
    target_port: int
    node_port: int

    @property
    def service_port_name(self) -> str:
        """``namespace/name:port`` as kube-proxy names it in chain hashes and comments."""
        return f"{self.namespace}/{self.name}:{self.port_name}" if self.port_name else f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodTemplate:
    """What the netns testbed needs of the Deployment's pod template."""

    deployment: str
    namespace: str
    replicas: int
    args: tuple[str, ...]
    container_port: int
    cpu_limit: float | None
    sysctls: Mapping[str, str]
    track_conntrack: bool


class Manifests:
    """The manifests of one directory, checked on load.

    The directory is ``directory``, else $LABKIT_MANIFEST_DIR, else the repository's
    ``k8s-manifests/``.

    Attributes:
        directory: where they came from.
        deployment, service, kubelet_config, kube_proxy_config: the parsed documents.
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory or os.environ.get("LABKIT_MANIFEST_DIR") or MANIFEST_DIR)
        self.deployment = self._load(DEPLOYMENT_FILE, "Deployment")
        self.service = self._load(SERVICE_FILE, "Service")
        self.kubelet_config = self._load(KUBELET_FILE, "KubeletConfiguration")
        self.kube_proxy_config = self._load(KUBE_PROXY_FILE, "KubeProxyConfiguration")
        self.service_port()  # check now, not at first use
        self.pod_template()

    def _load(self, name: str, kind: str) -> dict:
        path = self.directory / name
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ScenarioError(f"cannot read: {exc.strerror}", path=str(path)) from None
        except yaml.YAMLError as exc:
            raise ScenarioError(f"not valid YAML: {exc}", path=str(path)) from None
        if not isinstance(doc, dict) or doc.get("kind") != kind:
            raise ScenarioError(f"must be one {kind} document", path=str(path), field="kind")
        return doc

    def _get(self, doc: dict, file: str, dotted: str, default: Any = KeyError) -> Any:
        node: Any = doc
        for part in dotted.split("."):
            if isinstance(node, list):
                node = node[int(part)] if part.isdigit() and int(part) < len(node) else KeyError
            elif isinstance(node, dict):
                node = node.get(part, KeyError)
            else:
                node = KeyError
            if node is KeyError:
                if default is KeyError:
                    raise ScenarioError("missing", path=str(self.directory / file), field=dotted)
                return default
        return node

    def service_port(self) -> ServicePort:
        """The Service's port (UDP 69 -> nodePort), checked.

        Raises:
            ScenarioError: not a NodePort service with one UDP port and a fixed nodePort.
        """
        f, s = SERVICE_FILE, self.service
        where = str(self.directory / f)
        if self._get(s, f, "spec.type") != "NodePort":
            raise ScenarioError("must be NodePort", path=where, field="spec.type")
        port = self._get(s, f, "spec.ports.0")
        node_port = port.get("nodePort")
        if not isinstance(node_port, int) or not 30000 <= node_port <= 32767:
            raise ScenarioError(f"must be a fixed port in 30000-32767, got {node_port!r}", path=where,
                                field="spec.ports[0].nodePort")
        protocol = str(port.get("protocol", "TCP"))
        if protocol != "UDP":
            raise ScenarioError(f"TFTP needs UDP, got {protocol!r}", path=where, field="spec.ports[0].protocol")
        target = port.get("targetPort", port.get("port"))
        if not isinstance(target, int):
            raise ScenarioError("must be a port number", path=where, field="spec.ports[0].targetPort")
        return ServicePort(
            namespace=self._get(s, f, "metadata.namespace", "default"),
            name=self._get(s, f, "metadata.name"), port_name=str(port.get("name", "")),
            protocol=protocol, port=int(self._get(s, f, "spec.ports.0.port")),
            target_port=target, node_port=node_port)

    def pod_template(self, deployment: dict | None = None) -> PodTemplate:
        """The Deployment's pod template as the netns testbed runs it.

        Args:
            deployment: a sized copy of the Deployment (the file's own by default).

        Raises:
            ScenarioError: a field the testbed needs is missing or wrong.
        """
        f, d = DEPLOYMENT_FILE, deployment or self.deployment
        where = str(self.directory / f)
        spec = self._get(d, f, "spec.template.spec")
        container = self._get(d, f, "spec.template.spec.containers.0")
        args = tuple(str(a) for a in (container.get("command") or []) + (container.get("args") or []))
        if not args or not args[0].endswith("in.tftpd"):
            raise ScenarioError("must run in.tftpd (args[0])", path=where,
                                field="spec.template.spec.containers[0].args")
        ports = [p for p in container.get("ports", []) if p.get("protocol") == "UDP"]
        if not ports:
            raise ScenarioError("needs a UDP containerPort", path=where, field="spec.template.spec.containers[0].ports")
        limit = (container.get("resources") or {}).get("limits", {}).get("cpu")
        try:
            cpu = parse_cpu(limit) if limit is not None else None
        except ScenarioError as exc:
            raise ScenarioError(str(exc), path=where,
                                field="spec.template.spec.containers[0].resources.limits.cpu") from None
        sysctls = {}
        for i, item in enumerate((spec.get("securityContext") or {}).get("sysctls") or []):
            if not isinstance(item, dict) or "name" not in item or "value" not in item:
                raise ScenarioError("must be {name, value}", path=where,
                                    field=f"spec.template.spec.securityContext.sysctls[{i}]")
            sysctls[str(item["name"])] = str(item["value"])
        env = {e.get("name"): str(e.get("value")) for e in container.get("env") or []}
        return PodTemplate(
            deployment=self._get(d, f, "metadata.name"),
            namespace=self._get(d, f, "metadata.namespace", "default"),
            replicas=int(self._get(d, f, "spec.replicas", 1)), args=args,
            container_port=int(ports[0]["containerPort"]), cpu_limit=cpu, sysctls=sysctls,
            track_conntrack=env.get("TRACK_CONNTRACK", "1") == "1")

    def allowed_unsafe_sysctls(self) -> tuple[str, ...]:
        """The kubelet piece's ``allowedUnsafeSysctls`` (checked as the kubelet checks it)."""
        return check_allowlist(self.kubelet_config.get("allowedUnsafeSysctls") or [])

    # --- sized for an iteration: what a user would edit in the files ----------------

    def deployment_for(self, iteration) -> dict:
        """The Deployment with the iteration's replicas, CPU limit, pod sysctls and tracking."""
        doc = copy.deepcopy(self.deployment)
        doc["spec"]["replicas"] = iteration.replicas
        pod = doc["spec"]["template"]["spec"]
        pod.setdefault("securityContext", {})["sysctls"] = [
            {"name": k, "value": str(v)} for k, v in iteration.pod_sysctls.items()]
        container = pod["containers"][0]
        resources = container.setdefault("resources", {})
        if iteration.cpu_limit is None:
            for part in ("limits", "requests"):
                (resources.get(part) or {}).pop("cpu", None)
        else:
            resources.setdefault("limits", {})["cpu"] = format_cpu(iteration.cpu_limit)
            resources.setdefault("requests", {})["cpu"] = format_cpu(iteration.cpu_limit)
        env = [e for e in container.get("env") or [] if e.get("name") != "TRACK_CONNTRACK"]
        env.append({"name": "TRACK_CONNTRACK", "value": "1" if iteration.pods_track_conntrack else "0"})
        container["env"] = env
        return doc

    def pod_template_for(self, iteration) -> PodTemplate:
        """The pod template the netns testbed runs for ``iteration``: read from the sized Deployment."""
        return self.pod_template(self.deployment_for(iteration))


def dump_yaml(doc: Mapping) -> str:
    """A manifest as YAML text, keys in their order (for kubectl apply -f -)."""
    return yaml.safe_dump(dict(doc), sort_keys=False)
