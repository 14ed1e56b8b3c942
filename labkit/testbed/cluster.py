"""A kubeadm cluster reached over SSH, described by an inventory, as a labkit Testbed.

The ``ssh`` testbed reads the inventory from a file (:func:`load_inventory`); the
``vagrant`` testbed makes the same :class:`Inventory` from ``vagrant ssh-config``.
Both then use :class:`ClusterTestbed`: the :class:`~labkit.testbed.kubeadm.KubeadmDriver`
applies iterations, and roles map to hosts: ``node`` (and ``init``, the node's
own namespace on a real node) is the node under test, ``pod-N`` a pod's network
namespace on that node (``nsenter -t PID -n``), ``client`` the load machine.

Inventory file (YAML)::

    known_hosts: ~/.config/labkit/known_hosts    # the lab's own; default as shown
    trust_on_first_use: false                    # pin unknown host keys on first contact
    kubectl: control                             # the host that runs kubectl
    node: worker-1                               # the node under test (pods run there)
    client: client                               # the load machine
    hosts:
      control: {address: 10.0.0.10, user: admin, key: ~/.ssh/lab, sudo: true}
      worker-1: {address: 10.0.0.11, user: admin, key: ~/.ssh/lab, sudo: true,
                 node_name: worker-1, node_ip: 10.0.0.11}
      client: {address: 10.0.0.20, user: admin, key: ~/.ssh/lab}
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from labkit.exceptions import ScenarioError, TestbedError
from labkit.host import Host
from labkit.manifests import Manifests
from labkit.hostkeys import DEFAULT_KNOWN_HOSTS
from labkit.remote import SSHHost
from labkit.testbed.base import ServedFile, Testbed
from labkit.testbed.kubeadm import KubeadmDriver

log = logging.getLogger(__name__)

HOST_FIELDS = {"address", "port", "user", "key", "sudo", "node_name", "node_ip"}
TOP_FIELDS = {"known_hosts", "trust_on_first_use", "kubectl", "node", "client", "hosts",
              "ready_timeout", "rollout_timeout"}


@dataclass(frozen=True)
class InventoryHost:
    """One machine of the inventory.

    Attributes:
        name: its name in the inventory (and in messages).
        address, port, user: where and as whom to log in.
        keys: private key files (empty: the SSH agent and default keys).
        sudo: run privileged commands through ``sudo -n``.
        node_name: its Kubernetes node name (default ``name``).
        node_ip: the address clients use (default ``address``).
    """

    name: str
    address: str
    port: int = 22
    user: str | None = None
    keys: tuple[str, ...] = ()
    sudo: bool = False
    node_name: str | None = None
    node_ip: str | None = None


@dataclass
class Inventory:
    """The machines of a cluster and their roles.

    ``via_netns``: connect from inside this network namespace of the local machine
    (VMs of the lab's own libvirt, :mod:`labkit.vm.libvirtd`, are reachable only there).
    """

    hosts: dict[str, InventoryHost]
    kubectl: str
    node: str
    client: str
    known_hosts: Path = DEFAULT_KNOWN_HOSTS
    trust_on_first_use: bool = False
    ready_timeout: float = 120.0
    rollout_timeout: float = 180.0
    source: str = "inventory"
    via_netns: str | None = None
    _ssh: dict[str, SSHHost] = field(default_factory=dict, repr=False)

    def ssh(self, name: str) -> SSHHost:
        """The (one, shared) :class:`SSHHost` of inventory host ``name``."""
        if name not in self._ssh:
            h = self.hosts[name]
            self._ssh[name] = SSHHost(
                h.address, port=h.port, username=h.user, key_filename=list(h.keys) or None,
                known_hosts=self.known_hosts, trust_on_first_use=self.trust_on_first_use,
                name=name, sudo=h.sudo, via_netns=self.via_netns)
        return self._ssh[name]

    def close(self) -> None:
        """Close every SSH connection."""
        for host in self._ssh.values():
            host.close()


def _failer(source: str):
    def fail(where: str, message: str) -> ScenarioError:
        return ScenarioError(message, path=source, field=where)
    return fail


def parse_hosts(doc: Any, source: str = "inventory") -> tuple[dict[str, InventoryHost], dict[str, Any]]:
    """Check an inventory document's ``hosts`` and its host-key settings (the roles may be absent).

    Returns:
        ``(hosts, settings)``: the :class:`InventoryHost` of each name, and
        ``{"known_hosts": Path, "trust_on_first_use": bool}``.

    Raises:
        ScenarioError: naming the file (``source``), the field, and what is allowed.
    """
    fail = _failer(source)
    if not isinstance(doc, dict):
        raise fail("(top)", "must be a mapping with hosts, kubectl, node, client")
    unknown = sorted(set(doc) - TOP_FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field; allowed: {', '.join(sorted(TOP_FIELDS))}")
    raw_hosts = doc.get("hosts")
    if not isinstance(raw_hosts, dict) or not raw_hosts:
        raise fail("hosts", "must map host names to {address, user, key, ...}")
    hosts = {}
    for name, spec in raw_hosts.items():
        where = f"hosts.{name}"
        if not isinstance(spec, dict):
            raise fail(where, "must be a mapping with at least address")
        bad = sorted(set(spec) - HOST_FIELDS)
        if bad:
            raise fail(f"{where}.{bad[0]}", f"unknown field; allowed: {', '.join(sorted(HOST_FIELDS))}")
        address = spec.get("address")
        if not isinstance(address, str) or not address.strip():
            raise fail(f"{where}.address", "missing: the host name or IP address to connect to")
        port = spec.get("port", 22)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise fail(f"{where}.port", f"must be a port number 1-65535, got {port!r}")
        user = spec.get("user")
        if user is not None and (not isinstance(user, str) or not user):
            raise fail(f"{where}.user", f"must be a user name, got {user!r}")
        keys = spec.get("key", [])
        keys = [keys] if isinstance(keys, str) else keys
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise fail(f"{where}.key", "must be a private key file or a list of them")
        keys = [os.path.expanduser(k) for k in keys]
        for k in keys:
            if not os.path.isfile(k):
                raise fail(f"{where}.key", f"no such key file: {k}")
        sudo = spec.get("sudo", False)
        if not isinstance(sudo, bool):
            raise fail(f"{where}.sudo", f"must be true or false, got {sudo!r}")
        for opt in ("node_name", "node_ip"):
            if opt in spec and (not isinstance(spec[opt], str) or not spec[opt]):
                raise fail(f"{where}.{opt}", f"must be text, got {spec[opt]!r}")
        hosts[str(name)] = InventoryHost(str(name), address.strip(), port, user, tuple(keys), sudo,
                                         spec.get("node_name"), spec.get("node_ip"))
    tofu = doc.get("trust_on_first_use", False)
    if not isinstance(tofu, bool):
        raise fail("trust_on_first_use", f"must be true or false, got {tofu!r}")
    known = doc.get("known_hosts")
    if known is not None and (not isinstance(known, str) or not known):
        raise fail("known_hosts", f"must be a file path, got {known!r}")
    return hosts, {"known_hosts": Path(os.path.expanduser(known)) if known else DEFAULT_KNOWN_HOSTS,
                   "trust_on_first_use": tofu}


def load_machines(path: str | os.PathLike) -> tuple[dict[str, InventoryHost], dict[str, Any]]:
    """The hosts of an inventory file and its host-key settings (see :func:`parse_hosts`).

    Raises:
        ScenarioError: unreadable, not YAML, or a field is wrong (named).
    """
    return parse_hosts(_read_yaml(path), str(path))


def parse_inventory(doc: Any, source: str = "inventory") -> Inventory:
    """Check an inventory document and return the :class:`Inventory`.

    Raises:
        ScenarioError: naming the file (``source``), the field, and what is allowed.
    """
    fail = _failer(source)
    hosts, keys = parse_hosts(doc, source)
    roles = {}
    for role in ("kubectl", "node", "client"):
        value = doc.get(role)
        if value not in hosts:
            raise fail(role, f"must name one of the hosts ({', '.join(hosts)}), got {value!r}")
        roles[role] = value
    timeouts = {}
    for name in ("ready_timeout", "rollout_timeout"):
        value = doc.get(name, 120.0 if name == "ready_timeout" else 180.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail(name, f"must be a positive number of seconds, got {value!r}")
        timeouts[name] = float(value)
    return Inventory(hosts, known_hosts=keys["known_hosts"], trust_on_first_use=keys["trust_on_first_use"],
                     source=source, **roles, **timeouts)


def _read_yaml(path: str | os.PathLike) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", path=str(path)) from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"not valid YAML: {exc}", path=str(path)) from None


def load_inventory(path: str | os.PathLike) -> Inventory:
    """Read and check an inventory file.

    Raises:
        ScenarioError: unreadable, not YAML, or a field is wrong (named).
    """
    return parse_inventory(_read_yaml(path), str(path))


class ClusterTestbed(Testbed):
    """A Testbed on a kubeadm cluster given by an :class:`Inventory`.

    Args:
        inventory: the machines and their roles.
        state_path: where the driver remembers what it changed.
        manifests: the ``k8s-manifests/`` to apply.
    """

    name = "cluster"

    def __init__(self, inventory: Inventory | Callable[[], Inventory], *,
                 state_path: str | os.PathLike, manifests: Manifests | None = None,
                 **driver_options: Any):
        self._inventory = inventory if isinstance(inventory, Inventory) else None
        self._make_inventory = None if isinstance(inventory, Inventory) else inventory
        self.state_path = Path(state_path)
        self.manifests = manifests
        self.driver_options = driver_options
        self._driver: KubeadmDriver | None = None

    @property
    def inventory(self) -> Inventory:
        """The machines (made on first use, e.g. from ``vagrant ssh-config``)."""
        if self._inventory is None:
            self._inventory = self._make_inventory()
        return self._inventory

    @property
    def node_ip(self) -> str:
        """The node's address that clients send to."""
        node = self.inventory.hosts[self.inventory.node]
        return node.node_ip or node.address

    @property
    def driver(self) -> KubeadmDriver:
        """The driver applying iterations to the node under test."""
        if self._driver is None:
            inv = self.inventory
            node = inv.hosts[inv.node]
            self._driver = KubeadmDriver(
                inv.ssh(inv.node), inv.ssh(inv.kubectl), node_name=node.node_name or node.name,
                node_ip=self.node_ip, state_path=self.state_path, manifests=self.manifests,
                ready_timeout=inv.ready_timeout, rollout_timeout=inv.rollout_timeout,
                **self.driver_options)
        return self._driver

    def up(self, iteration) -> None:
        """Apply ``iteration`` to the cluster (see :class:`KubeadmDriver`).

        Raises:
            TestbedError: the iteration needs what the driver does not do yet (iterations
                11 and 12: a NOTRACK rule, kube-proxy's nftables mode).
        """
        if getattr(iteration, "node_notrack", False) or getattr(iteration, "proxy_mode", "iptables") != "iptables":
            raise TestbedError(f"iteration {iteration.number} ({iteration.title}) runs on the netns testbed "
                               "only for now: the kubeadm driver does not yet add a NOTRACK rule or switch "
                               "kube-proxy to nftables mode")
        self.driver.apply(iteration)

    def down(self) -> None:
        """Undo every change the driver recorded; the cluster itself stays."""
        if not self.state_path.exists():
            return
        self.driver.restore()
        self.inventory.close()

    def _require(self) -> dict[str, Any]:
        if not self.state_path.exists():
            raise TestbedError(f"the {self.name} testbed is not up; run `labkit up --testbed {self.name}`")
        state = self.driver.state
        if not state.get("iteration"):
            raise TestbedError(f"the {self.name} testbed is not up; run `labkit up --testbed {self.name}`")
        return state

    def roles(self) -> list[str]:
        """``node``, ``pod-1``.. and ``client`` (the node's namespace is also ``init``)."""
        if not self.state_path.exists() or not self.driver.state.get("iteration"):
            return []
        return ["node", *(f"pod-{i}" for i in range(1, len(self.driver.pods) + 1)), "client"]

    def host(self, role: str) -> Host:
        """The host of ``role``; ``init`` is the node itself (a real node's own namespace).

        Raises:
            TestbedError: not up, or no such role.
        """
        self._require()
        if role in ("node", "init"):
            return self.inventory.ssh(self.inventory.node)
        if role == "client":
            return self.inventory.ssh(self.inventory.client)
        pods = self.driver.pods
        if role.startswith("pod-") and role[4:].isdigit() and 1 <= int(role[4:]) <= len(pods):
            pod = pods[int(role[4:]) - 1]
            return self.inventory.ssh(self.inventory.node).netns(pid=pod["pid"], host_name=role)
        raise TestbedError(f"no role {role!r} on this testbed; roles: {', '.join(self.roles())}")

    @property
    def service(self) -> tuple[str, int]:
        """The node's address and the NodePort (port 69 of the plain server in iteration 1)."""
        state = self._require()
        if state.get("plain"):
            return self.node_ip, self.driver.template.container_port
        return self.node_ip, self.driver.port.node_port

    @property
    def file(self) -> ServedFile:
        """The served file, as read on the node or in the first pod."""
        self._require()
        return self.driver.file

    def status(self) -> dict[str, Any]:
        """The ``labkit status --json`` document."""
        state = self.driver.state
        it = state.get("iteration") or {}
        client = self.inventory.hosts[self.inventory.client]
        node = self.inventory.hosts[self.inventory.node]
        hosts = [{"role": "client", "name": "client", "ip": client.address, "host": client.name},
                 {"role": "node", "name": "node", "ip": self.node_ip, "host": node.node_name or node.name}]
        for i, pod in enumerate(self.driver.pods, 1):
            hosts.append({"role": "pod", "name": f"pod-{i}", "pod": pod["name"], "ip": pod.get("ip"),
                          "pid": pod.get("pid")})
        f = state.get("file") or {}
        up = bool(it)
        port = (self.driver.template.container_port if state.get("plain") else self.driver.port.node_port)
        return {
            "testbed": self.name, "state": "up" if up else "down", "inventory": self.inventory.source,
            "iteration": it.get("number"), "profile": it.get("profile"), "setup": it.get("setup"),
            "service": {"node_ip": self.node_ip, "node_port": port, "protocol": "udp"},
            "file": {"name": f.get("name"), "size": f.get("size"), "sha256": f.get("sha256")},
            "hosts": hosts if up else [], "replicas": len(self.driver.pods),
            "node_sysctls": it.get("node_sysctls", {}), "pod_sysctls": it.get("pod_sysctls", {}),
            "allowed_unsafe_sysctls": it.get("allowed_unsafe_sysctls", []),
            "helper_rule": state.get("helper_rule", False),
        }
