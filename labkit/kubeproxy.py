"""kube-proxy's iptables rules for the NodePort service, rendered (pure functions).

:func:`render_rules` turns the Service's port and its endpoints into the text
that kube-proxy (iptables mode) loads with ``iptables-restore --noflush``:
``KUBE-SERVICES -> KUBE-NODEPORTS -> KUBE-EXT-* -> KUBE-SVC-* -> KUBE-SEP-*``
(DNAT), ``statistic --mode random`` probabilities across endpoints,
``KUBE-MARK-MASQ`` and the ``KUBE-POSTROUTING`` masquerade, the
``KUBE-FORWARD`` filter rules, and the explicit TFTP conntrack helper rule that
kernels since 6.0 need (``-t raw ... -j CT --helper tftp``).  Chain names are
kube-proxy's own: a base32 SHA-256 hash of the service port name and protocol
(and the endpoint, for KUBE-SEP chains).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

from labkit.manifests import ServicePort

MASQ_MARK = "0x4000/0x4000"
HELPER = "tftp"


@dataclass(frozen=True)
class Endpoint:
    """One ready pod behind the service."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


def _hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def svc_chain(svc: ServicePort) -> str:
    """kube-proxy's KUBE-SVC-* chain name for a service port."""
    return "KUBE-SVC-" + _hash(svc.service_port_name + svc.protocol.lower())


def ext_chain(svc: ServicePort) -> str:
    """kube-proxy's KUBE-EXT-* chain name (external traffic: NodePorts)."""
    return "KUBE-EXT-" + _hash(svc.service_port_name + svc.protocol.lower())


def sep_chain(svc: ServicePort, endpoint: Endpoint) -> str:
    """kube-proxy's KUBE-SEP-* chain name for one endpoint."""
    return "KUBE-SEP-" + _hash(svc.service_port_name + svc.protocol.lower() + str(endpoint))


def probability(i: int, n: int) -> str:
    """The ``statistic --mode random`` probability of endpoint ``i`` of ``n`` (kube-proxy's format)."""
    return f"{1.0 / (n - i):0.10f}"


def render_helper_rule(svc: ServicePort) -> str:
    """The raw-table rule that attaches the TFTP helper to requests for the nodePort.

    Kernels since 6.0 never attach helpers on their own: without it the server's
    reply, which comes from a new port, matches no expectation and is dropped.
    """
    proto = svc.protocol.lower()
    return ("*raw\n"
            f"-A PREROUTING -p {proto} -m {proto} --dport {svc.node_port} "
            f'-m comment --comment "{svc.service_port_name} nodePort: conntrack helper {HELPER}" '
            f"-j CT --helper {HELPER}\nCOMMIT\n")


def render_rules(svc: ServicePort, endpoints: Sequence[Endpoint], *, cluster_ip: str | None = None,
                 helper_rule: bool = True, jumps: bool = True,
                 stale_endpoints: Iterable[Endpoint] = ()) -> str:
    """Render the rules for ``iptables-restore --noflush``.

    Args:
        svc: the Service's port.
        endpoints: the ready pods, in order (at least one for traffic to flow).
        cluster_ip: the Service's cluster IP, for the cluster-IP rule (none when None).
        helper_rule: add ``-t raw -A PREROUTING -p udp --dport <nodePort> -j CT --helper tftp``.
        jumps: add the jumps from the built-in chains (and the helper rule): the
            first time only; later calls redefine (and so flush) the KUBE-* chains.
        stale_endpoints: endpoints gone since the last call: their chains are deleted.

    Returns:
        The text, one table after the other, each ending in COMMIT.
    """
    proto = svc.protocol.lower()
    name = svc.service_port_name
    svc_c, ext_c = svc_chain(svc), ext_chain(svc)
    seps = [(ep, sep_chain(svc, ep)) for ep in endpoints]
    current = {c for _, c in seps}
    stale = sorted({sep_chain(svc, ep) for ep in stale_endpoints} - current)
    out: list[str] = []

    if jumps and helper_rule:
        out.append(render_helper_rule(svc).rstrip("\n"))

    out += ["*filter", ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]"]
    if jumps:
        out += [
            '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible '
            'service portals" -j KUBE-EXTERNAL-SERVICES',
            '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        ]
    if not endpoints:
        out.append(f'-A KUBE-EXTERNAL-SERVICES -m comment --comment "{name} has no endpoints" '
                   f"-m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {svc.node_port} "
                   "-j REJECT --reject-with icmp-port-unreachable")
    out += [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]

    out += ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
            ":KUBE-MARK-MASQ - [0:0]", f":{svc_c} - [0:0]", f":{ext_c} - [0:0]"]
    out += [f":{c} - [0:0]" for _, c in seps] + [f":{c} - [0:0]" for c in stale]
    if jumps:
        out += [
            '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        ]
    out += [
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    if seps:
        out.append(f'-A KUBE-NODEPORTS -m comment --comment "{name}" -m {proto} -p {proto} '
                   f"--dport {svc.node_port} -j {ext_c}")
        out += [
            f'-A {ext_c} -m comment --comment "masquerade traffic for {name} external destinations" '
            "-j KUBE-MARK-MASQ",
            f"-A {ext_c} -j {svc_c}",
        ]
        if cluster_ip:
            out += [
                f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" -m {proto} -p {proto} '
                f"-d {cluster_ip}/32 --dport {svc.port} -j {svc_c}",
            ]
        for i, (ep, chain) in enumerate(seps):
            stat = "" if i == len(seps) - 1 else \
                f" -m statistic --mode random --probability {probability(i, len(seps))}"
            out.append(f'-A {svc_c} -m comment --comment "{name} -> {ep}"{stat} -j {chain}')
        for ep, chain in seps:
            out += [
                f'-A {chain} -m comment --comment "{name}" -s {ep.ip}/32 -j KUBE-MARK-MASQ',
                f'-A {chain} -m comment --comment "{name}" -m {proto} -p {proto} '
                f"-j DNAT --to-destination {ep}",
            ]
    out += [
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
        'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
    ]
    out += [f"-X {c}" for c in stale]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


# --- iteration 11: NOTRACK on the node -------------------------------------------------------

def render_notrack_rule(svc: ServicePort) -> str:
    """A raw-table rule that leaves the NodePort's requests untracked (iteration 11).

    Inserted first in raw PREROUTING, before the helper rule: the requests never get a
    conntrack entry, so the nat table never sees them and kube-proxy's DNAT never happens.
    """
    proto = svc.protocol.lower()
    return ("*raw\n"
            f"-I PREROUTING 1 -p {proto} -m {proto} --dport {svc.node_port} "
            f'-m comment --comment "{svc.service_port_name} nodePort: untracked" -j NOTRACK\nCOMMIT\n')


# --- iteration 12: kube-proxy's nftables mode --------------------------------------------------

NFT_TABLE = "kube-proxy"
NFT_HELPER_TABLE = "labkit-helper"  # the lab's own TFTP helper rule, not kube-proxy's
# The helper chain's priority: after conntrack (-200), which made the entry that
# ``ct helper set`` attaches to (an unconfirmed one: the rule does nothing without it),
# and before the nat chain at dstnat (-100), which rewrites the nodePort to the pod's
# port 69: at "filter" (0) the rule's ``udp dport <nodePort>`` matched no packet, no entry
# got the helper, the server's reply from its new port matched no expectation and no
# transfer completed.  iptables' ``-t raw ... -j CT`` runs at -300 and attaches a template
# the conntrack hook takes up, so it sees the nodePort too.
NFT_HELPER_PRIORITY = "mangle"  # -150


def _nft_base(svc: ServicePort) -> str:
    """kube-proxy's nftables chain suffix: ``<hash>-<namespace>/<name>/<protocol>/<port name>``."""
    digest = _hash(svc.service_port_name + svc.protocol.lower())[:8].lower()
    return f"{digest}-{svc.namespace}/{svc.name}/{svc.protocol.lower()}/{svc.port_name}"


def render_nft_rules(svc: ServicePort, endpoints: Sequence[Endpoint], *, cluster_ip: str | None = None,
                     pod_cidr: str = "10.244.0.0/16", helper_rule: bool = True) -> str:
    """Render the node's rules as kube-proxy's nftables mode does, for ``nft -f -``.

    One ``ip kube-proxy`` table: base chains hooked at nat prerouting/output/postrouting
    that jump to ``services``; verdict maps ``service-ips`` (cluster IP . protocol . port)
    and ``service-nodeports`` (protocol . port) to the service's chains;
    ``numgen random mod N`` across ``endpoint-*`` chains that DNAT; the 0x4000 masquerade
    mark.  The lab's TFTP helper (kernels since 6.0 never attach one on their own) goes in
    a table of its own, ``ip labkit-helper``, hooked between conntrack and the DNAT
    (:data:`NFT_HELPER_PRIORITY`), where the request still has the nodePort.  The text first deletes both tables, so
    loading it again replaces the rules (the endpoints changed).

    Returns:
        The ruleset text.
    """
    proto = svc.protocol.lower()
    base = _nft_base(svc)
    svc_c, ext_c = f"service-{base}", f"external-{base}"
    eps = [(ep, f"endpoint-{_hash(svc.service_port_name + proto + str(ep))[:8].lower()}-{base}__{ep.ip}/{ep.port}")
           for ep in endpoints]
    q = lambda name: name  # noqa: E731  (nft identifiers may hold '/', as kube-proxy's do)
    out = [f"table ip {NFT_TABLE}", f"delete table ip {NFT_TABLE}", f"table ip {NFT_HELPER_TABLE}",
           f"delete table ip {NFT_HELPER_TABLE}"]
    if helper_rule:
        out += [f"table ip {NFT_HELPER_TABLE} {{",
                f'\tct helper {HELPER} {{ type "{HELPER}" protocol {proto}; l3proto ip; }}',
                "\tchain prerouting {",
                f"\t\ttype filter hook prerouting priority {NFT_HELPER_PRIORITY}; policy accept;",
                f'\t\t{proto} dport {svc.node_port} ct helper set "{HELPER}" comment "{svc.service_port_name} '
                f'nodePort: conntrack helper {HELPER}"',
                "\t}", "}"]
    out += [f"table ip {NFT_TABLE} {{", '\tcomment "rules for kube-proxy"',
            "\tchain nat-prerouting {", "\t\ttype nat hook prerouting priority dstnat; policy accept;",
            "\t\tjump services", "\t}",
            "\tchain nat-output {", "\t\ttype nat hook output priority -100; policy accept;",
            "\t\tjump services", "\t}",
            "\tchain nat-postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            "\t\tjump masquerading", "\t}",
            "\tchain filter-forward {", "\t\ttype filter hook forward priority -110; policy accept;",
            "\t\tct state invalid drop", "\t}",
            "\tchain mark-for-masquerade {", "\t\tmeta mark set meta mark or 0x4000", "\t}",
            "\tchain masquerading {", "\t\tmeta mark & 0x4000 == 0 return",
            "\t\tmeta mark set meta mark xor 0x4000", "\t\tmasquerade fully-random", "\t}",
            "\tmap service-ips {", "\t\ttype ipv4_addr . inet_proto . inet_service : verdict",
            '\t\tcomment "ClusterIP, ExternalIP and LoadBalancer IP traffic"', "\t}",
            "\tmap service-nodeports {", "\t\ttype inet_proto . inet_service : verdict",
            '\t\tcomment "NodePort traffic"', "\t}",
            "\tchain services {",
            "\t\tip daddr . meta l4proto . th dport vmap @service-ips",
            "\t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
            "\t}"]
    if eps:
        spread = ", ".join(f"{i} : goto {q(c)}" for i, (_, c) in enumerate(eps))
        out += [f"\tchain {q(svc_c)} {{"]
        if cluster_ip:
            out.append(f"\t\tip daddr {cluster_ip} {proto} dport {svc.port} ip saddr != {pod_cidr} "
                       "jump mark-for-masquerade")
        out += [f"\t\tnumgen random mod {len(eps)} vmap {{ {spread} }}", "\t}",
                f"\tchain {q(ext_c)} {{", "\t\tjump mark-for-masquerade", f"\t\tgoto {q(svc_c)}", "\t}"]
        for ep, chain in eps:
            out += [f"\tchain {q(chain)} {{", f"\t\tip saddr {ep.ip} jump mark-for-masquerade",
                    f"\t\tmeta l4proto {proto} dnat to {ep.ip}:{ep.port}", "\t}"]
    out.append("}")
    if eps:
        if cluster_ip:
            out.append(f"add element ip {NFT_TABLE} service-ips {{ {cluster_ip} . {proto} . {svc.port} : "
                       f"goto {q(svc_c)} }}")
        out.append(f"add element ip {NFT_TABLE} service-nodeports {{ {proto} . {svc.node_port} : goto {q(ext_c)} }}")
    return "\n".join(out) + "\n"


def render_nft_cleanup() -> str:
    """``nft -f -`` text that removes the nftables-mode tables (idempotent)."""
    return "\n".join(f"table ip {t}\ndelete table ip {t}" for t in (NFT_TABLE, NFT_HELPER_TABLE)) + "\n"
