"""The netns testbed's topology as data: what an iteration's lab is made of, before anything is made.

:func:`plan` turns an :class:`~labkit.scenario.Iteration` and the manifests
(``k8s-manifests/``, rendered by :mod:`labkit.kubeproxy`) into a
:class:`Topology`: the network namespaces, the links (veth pairs and the pods'
bridge), the addresses and routes, the sysctls of each namespace and the global
ones, the node's rules (kube-proxy's iptables or nftables rules, the TFTP helper
rule, iteration 11's NOTRACK), and the ``in.tftpd`` servers with their CPU
budget.  It is pure (no root, no machine) and prints readably in a notebook
(``print(topology)``, :meth:`Topology.to_frame`).

The backend (:mod:`labkit.testbed.netns_apply`) builds the same pieces from
:func:`base` and :func:`pod`, one fragment at a time, as the running testbed
grows and shrinks; their names and addresses are the ones every run has had.
The node's rules come from one place, :func:`node_rule_change`: the rule sets
that take the node's tables from what they hold to what an iteration needs
(the first load, a change of endpoints, the helper rule switched, another proxy
mode); :func:`plan` shows the first load, the backend applies each change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from labkit.exceptions import TestbedError
from labkit.kubeproxy import (Endpoint, render_helper_rule, render_nft_cleanup, render_nft_rules,
                              render_notrack_rule, render_rules)

NODE_IP = "10.69.0.1"
CLIENT_IP = "10.69.0.2"
LINK_PREFIX = 24
POD_GATEWAY = "10.244.0.1"
POD_NET = "10.244.0."
CLUSTER_IP = "10.96.0.69"
TFTP_PORT = 69


def link_name(run_id: str, what: str) -> str:
    """An interface name of run ``run_id``: ``lk<run><what>``, at most 15 characters.

    ``what`` is ``n0``/``c0`` (node and client ends of their veth), ``br`` (the pods'
    bridge), ``v<k>``/``e<k>`` (node and pod ends of pod k's veth).

    Raises:
        TestbedError: the name would not fit the kernel's 15 characters.
    """
    name = f"lk{run_id}{what}"
    if len(name) > 15:
        raise TestbedError(f"interface name {name!r} is longer than 15 characters")
    return name


def netns_name(run_id: str, what: str) -> str:
    """The namespace of ``client``, ``node`` or ``pod<k>`` in run ``run_id``: ``lk<run>-<what>``."""
    return f"lk{run_id}-{what}"


@dataclass(frozen=True)
class Namespace:
    """A network namespace and the role it plays (``client``, ``node``, ``pod<k>``)."""

    name: str
    role: str


@dataclass(frozen=True)
class Link:
    """An interface made in ``netns``: a bridge, or a veth whose ``peer`` end goes to ``peer_netns``."""

    name: str
    netns: str
    kind: str
    peer: str | None = None
    peer_netns: str | None = None
    master: str | None = None


@dataclass(frozen=True)
class Address:
    """An address (``ip/prefix``) on an interface, which is then set up."""

    netns: str
    dev: str
    cidr: str


@dataclass(frozen=True)
class Route:
    """A route in a namespace (``default via`` the pods' gateway)."""

    netns: str
    dest: str
    via: str


@dataclass(frozen=True)
class RuleSet:
    """Rules loaded in a namespace with ``tool``.

    ``iptables-restore`` loads ``text`` with ``--noflush`` (with ``flush``, the tables it
    names are emptied first); ``nft`` loads it with ``nft -f -``; ``iptables`` adds each
    line of ``text`` as one rule (``iptables -w <line>``).
    """

    netns: str
    tool: str
    purpose: str
    text: str
    flush: bool = False


@dataclass(frozen=True)
class ServerSpec:
    """An ``in.tftpd``: where it runs, its command line, its cgroup (CPU budget) and address.

    ``label`` names its log file and ledger entry (``server``, ``pod<k>``).
    """

    label: str
    netns: str
    argv: tuple[str, ...]
    cgroup: str
    cpu_limit: float | None
    ip: str


@dataclass
class Topology:
    """The pieces of a netns lab (or of a part of one: :func:`base`, :func:`pod`), in build order."""

    run_id: str
    namespaces: list[Namespace] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    sysctls: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_sysctls: dict[str, Any] = field(default_factory=dict)
    rules: list[RuleSet] = field(default_factory=list)
    servers: list[ServerSpec] = field(default_factory=list)

    def __add__(self, other: "Topology") -> "Topology":
        sysctls = {k: dict(v) for k, v in self.sysctls.items()}
        for ns, values in other.sysctls.items():
            sysctls.setdefault(ns, {}).update(values)
        return Topology(self.run_id, self.namespaces + other.namespaces, self.links + other.links,
                        self.addresses + other.addresses, self.routes + other.routes, sysctls,
                        {**self.global_sysctls, **other.global_sysctls}, self.rules + other.rules,
                        self.servers + other.servers)

    def rows(self) -> list[dict[str, str]]:
        """One row per piece: ``kind, netns, name, detail`` (what :meth:`to_frame` shows)."""
        out = [{"kind": "netns", "netns": n.name, "name": n.role, "detail": ""} for n in self.namespaces]
        for link in self.links:
            detail = (f"veth peer {link.peer} in {link.peer_netns}" if link.kind == "veth" else link.kind)
            out.append({"kind": "link", "netns": link.netns, "name": link.name,
                        "detail": detail + (f", master {link.master}" if link.master else "")})
        out += [{"kind": "address", "netns": a.netns, "name": a.dev, "detail": a.cidr} for a in self.addresses]
        out += [{"kind": "route", "netns": r.netns, "name": r.dest, "detail": f"via {r.via}"} for r in self.routes]
        out += [{"kind": "sysctl", "netns": "(global)", "name": k, "detail": str(v)}
                for k, v in self.global_sysctls.items()]
        out += [{"kind": "sysctl", "netns": ns, "name": k, "detail": str(v)}
                for ns, values in self.sysctls.items() for k, v in values.items()]
        out += [{"kind": "rules", "netns": r.netns, "name": r.purpose,
                 "detail": f"{r.tool}, {len(r.text.splitlines())} lines"} for r in self.rules]
        out += [{"kind": "server", "netns": s.netns, "name": s.label,
                 "detail": f"{s.ip}:{TFTP_PORT} cgroup {s.cgroup} cpu {_cpu(s.cpu_limit)}: {' '.join(s.argv)}"}
                for s in self.servers]
        return out

    def to_frame(self):
        """The pieces as a pandas DataFrame (``kind, netns, name, detail``), for a notebook."""
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=["kind", "netns", "name", "detail"])

    def describe(self, rules: bool = False) -> str:
        """A readable listing of the pieces (with ``rules``, the rules' full text too)."""
        lines = [f"netns topology of run {self.run_id}:"]
        width = max((len(r["kind"]) for r in self.rows()), default=4)
        for r in self.rows():
            lines.append(f"  {r['kind']:<{width}}  {r['netns']:<16} {r['name']:<24} {r['detail']}".rstrip())
        if rules:
            for r in self.rules:
                lines += [f"--- {r.purpose} ({r.tool} in {r.netns})", r.text.rstrip()]
        return "\n".join(lines)

    __str__ = describe


def _cpu(limit: float | None) -> str:
    return "unlimited" if limit is None else f"{limit:g}"


def base(run_id: str) -> Topology:
    """The part every run has: client and node namespaces, their veth, the pods' bridge."""
    client, node = netns_name(run_id, "client"), netns_name(run_id, "node")
    n0, c0, br = (link_name(run_id, w) for w in ("n0", "c0", "br"))
    return Topology(
        run_id, [Namespace(client, "client"), Namespace(node, "node")],
        [Link(n0, node, "veth", peer=c0, peer_netns=client), Link(br, node, "bridge")],
        [Address(node, n0, f"{NODE_IP}/{LINK_PREFIX}"), Address(client, c0, f"{CLIENT_IP}/{LINK_PREFIX}"),
         Address(node, br, f"{POD_GATEWAY}/24")],
        sysctls={node: {"net.ipv4.ip_forward": 1}})


def server_argv(args: Sequence[str], served_dir: str, user: str | None = None) -> tuple[str, ...]:
    """The template's ``in.tftpd`` arguments serving ``served_dir`` (as ``user``, if given)."""
    argv = list(args)
    argv[-1] = served_dir
    if user and "--user" in argv:
        argv[argv.index("--user") + 1] = user
    return tuple(argv)


def pod(run_id: str, serial: int, ip: str, template, cpu_limit: float | None, served_dir: str) -> Topology:
    """Pod ``serial``: its namespace, veth to the bridge, address, route, sysctls and server."""
    ns, node = netns_name(run_id, f"pod{serial}"), netns_name(run_id, "node")
    veth, eth = link_name(run_id, f"v{serial}"), link_name(run_id, f"e{serial}")
    rules = []
    if template.track_conntrack:
        # The article's pods tracked connections; a modern kernel needs a stateful rule for it.
        rules.append(RuleSet(ns, "iptables", "pod tracks connections",
                             "-A INPUT -m conntrack --ctstate INVALID -j DROP"))
    return Topology(
        run_id, [Namespace(ns, f"pod{serial}")],
        [Link(veth, node, "veth", peer=eth, peer_netns=ns, master=link_name(run_id, "br"))],
        [Address(ns, eth, f"{ip}/24")], [Route(ns, "default", POD_GATEWAY)],
        sysctls={ns: dict(template.sysctls)} if template.sysctls else {}, rules=rules,
        servers=[ServerSpec(f"pod{serial}", ns, server_argv(template.args, served_dir),
                            netns_name(run_id, f"pod{serial}"), cpu_limit, ip)])


def plain_server(run_id: str, template, cpu_limit: float | None, served_dir: str) -> ServerSpec:
    """Iteration 1's server: a plain process on the node, same CPU budget as a pod."""
    return ServerSpec("server", netns_name(run_id, "node"), server_argv(template.args, served_dir),
                      netns_name(run_id, "server"), cpu_limit, NODE_IP)


@dataclass
class NodeRuleChange:
    """What a change of the node's rules is: the :class:`RuleSet` s to apply, in order, and what
    the node's tables then hold (the helper rule's state, the endpoints)."""

    sets: list[RuleSet]
    helper_rule: bool
    endpoints: list[str]


def clear_node_rules(netns: str, loaded_mode: str = "iptables") -> list[RuleSet]:
    """The rule sets that empty the node's tables of rules loaded in ``loaded_mode`` (nftables' tables too)."""
    out = []
    if loaded_mode == "nftables":
        out.append(RuleSet(netns, "nft", "kube-proxy's nftables tables removed", render_nft_cleanup()))
    out.append(RuleSet(netns, "iptables-restore", "tables emptied",
                       "".join(f"*{t}\nCOMMIT\n" for t in ("raw", "filter", "nat")), flush=True))
    return out


def node_rule_change(manifests, netns: str, pod_ips: Sequence[str], *, stale_ips: Sequence[str] = (),
                     proxy_mode: str = "iptables", notrack: bool = False, helper_rule: bool = True,
                     loaded: tuple[str, bool] | None = None, helper_option: bool | None = None) -> NodeRuleChange:
    """The rule sets that bring the node's tables from what they hold to kube-proxy's rules for ``pod_ips``.

    As kube-proxy does, the first load adds the jumps from the built-in chains (and the
    TFTP helper rule); a later one redefines the ``KUBE-*`` chains, deleting those of the
    ``stale_ips`` endpoints.  Rules of another kind (proxy mode or NOTRACK) are cleared
    first; iteration 11's NOTRACK rule comes with the first load.

    Args:
        manifests: a :class:`~labkit.manifests.Manifests` (the Service and the pods' port).
        netns: the node's namespace.
        pod_ips: the endpoints now, in order.
        stale_ips: endpoints gone since the last change.
        proxy_mode: ``iptables`` or ``nftables``.
        notrack: the NodePort's requests untracked (iteration 11).
        helper_rule: whether the loaded rules have the explicit TFTP helper rule.
        loaded: ``(proxy_mode, notrack)`` of the rules the tables hold, None when none are loaded.
        helper_option: the testbed's helper switch; when it differs from ``helper_rule`` on
            loaded iptables rules, the raw table is emptied and the helper rule added (or not).

    Returns:
        The :class:`NodeRuleChange`.
    """
    svc = manifests.service_port()
    port = manifests.pod_template().container_port
    endpoints = [Endpoint(ip, port) for ip in pod_ips]
    sets: list[RuleSet] = []
    if loaded is not None and tuple(loaded) != (proxy_mode, notrack):
        sets += clear_node_rules(netns, loaded[0])  # another kind of rules: start from empty tables
        loaded = None
    if proxy_mode == "nftables":
        sets.append(RuleSet(netns, "nft", "kube-proxy (nftables mode)",
                            render_nft_rules(svc, endpoints, cluster_ip=CLUSTER_IP, helper_rule=helper_rule)))
        return NodeRuleChange(sets, helper_rule, [str(e) for e in endpoints])
    first = loaded is None
    text = render_rules(svc, endpoints, cluster_ip=CLUSTER_IP, helper_rule=helper_rule, jumps=first,
                        stale_endpoints=[Endpoint(ip, port) for ip in stale_ips])
    if not first and helper_option not in (None, helper_rule):
        # the helper switch changed on a running testbed: the raw table holds only that rule
        sets.append(RuleSet(netns, "iptables-restore", "raw table emptied (helper rule switched)",
                            "*raw\nCOMMIT\n", flush=True))
        if helper_option:
            sets.append(RuleSet(netns, "iptables-restore", "TFTP conntrack helper rule", render_helper_rule(svc)))
        helper_rule = bool(helper_option)
    sets.append(RuleSet(netns, "iptables-restore", "kube-proxy (iptables mode)", text))
    if first and notrack:  # iteration 11: the NodePort's requests untracked, ahead of the helper
        sets.append(RuleSet(netns, "iptables-restore", "NodePort untracked (NOTRACK)", render_notrack_rule(svc)))
    return NodeRuleChange(sets, helper_rule, [str(e) for e in endpoints])


def node_rules(manifests, iteration, pod_ips: Sequence[str], *, helper_rule: bool = True,
               netns: str = "node") -> list[RuleSet]:
    """The node's rules for ``iteration`` with pods at ``pod_ips`` (none for the plain server), as first loaded."""
    if iteration.setup == "plain":
        return []
    return node_rule_change(manifests, netns, pod_ips, proxy_mode=getattr(iteration, "proxy_mode", "iptables"),
                            notrack=bool(getattr(iteration, "node_notrack", False)),
                            helper_rule=helper_rule).sets


def pod_ip(n: int) -> str:
    """The address of the ``n``-th pod address (2..254) in the pods' /24."""
    return f"{POD_NET}{n}"


def plan(iteration, manifests, run_id: str = "xxxxx", *, helper_rule: bool = True,
         served_dir: str = "/run/labkit/netns-xxxxx/srv") -> Topology:
    """The whole lab for ``iteration`` as a fresh run builds it.

    Args:
        iteration: a :class:`~labkit.scenario.Iteration`.
        manifests: a :class:`~labkit.manifests.Manifests`.
        run_id: the run id in the names (five letters/digits).
        helper_rule: the explicit TFTP conntrack helper rule (as the testbed's switch).
        served_dir: where the served file is.

    Returns:
        The :class:`Topology`.
    """
    template = manifests.pod_template_for(iteration)
    top = base(run_id)
    top.global_sysctls = dict(iteration.global_sysctls)
    top.sysctls[netns_name(run_id, "node")].update(iteration.namespaced_node_sysctls)
    if iteration.setup == "plain":
        top.servers.append(plain_server(run_id, template, iteration.cpu_limit, served_dir))
        return top
    ips = [pod_ip(2 + k) for k in range(iteration.replicas)]
    for k, ip in enumerate(ips, 1):
        top = top + pod(run_id, k, ip, template, iteration.cpu_limit, served_dir)
    top.rules = node_rules(manifests, iteration, ips, helper_rule=helper_rule,
                           netns=netns_name(run_id, "node")) + top.rules
    return top


def udp_port_bound(text: str, port: int) -> bool:
    """True when ``/proc/net/udp`` text lists a socket bound to ``port`` (IPv4)."""
    lines = text.splitlines()[1:]
    return any(len(line.split()) > 1 and int(line.split()[1].split(":")[1], 16) == port for line in lines)
