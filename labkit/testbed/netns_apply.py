"""The netns testbed's backend: makes the pieces of a :mod:`~labkit.testbed.topology` on a machine.

:class:`Builder` applies an iteration to a running (or new) netns testbed: the
base (:func:`~labkit.testbed.topology.base`), the served file, the global and
node sysctls, then either the plain server or the pods (:func:`~labkit.testbed.topology.pod`),
kept, added and removed by template and replica count, and the node's rules:
:class:`NodeRules` applies, in order, the rule sets the topology gives for each
change (:func:`~labkit.testbed.topology.node_rule_change`: iptables, nftables,
NOTRACK, the helper rule switch) with :func:`apply_rule_set`, and records what
the tables hold in the run state.  Everything goes through
the testbed's machine (:class:`~labkit.host.Host`: this one, or one over SSH), and
every resource is written to the run's ledger before it is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shlex
import string
import time

from labkit import cgroups
from labkit.exceptions import GlobalSysctlsHeld, TestbedError
from labkit.host import NETNS_DIR
from labkit.manifests import PodTemplate
from labkit.sysctls import GlobalSysctls
from labkit.testbed import topology as topo
from labkit.testbed.runstate import FileRecord, Pod, Server

log = logging.getLogger(__name__)

READY_TIMEOUT = 5.0
_ALPHABET = string.ascii_lowercase + string.digits


def template_hash(template: PodTemplate, file_path: str) -> str:
    """A short hash of what a server was started from: kept while it is the same, replaced otherwise."""
    text = json.dumps([template.args, template.cpu_limit, sorted(template.sysctls.items()),
                       template.track_conntrack, file_path])
    return "".join(_ALPHABET[b % 36] for b in hashlib.sha256(text.encode()).digest()[:10])


class Builder:
    """Applies iterations to one :class:`~labkit.testbed.netns.NetnsTestbed` (its state, ledger, machine)."""

    def __init__(self, testbed):
        self.tb = testbed
        self.machine = testbed.machine
        self.waited = 0.0

    @property
    def state(self):
        return self.tb.state

    def _ip(self, netns: str, *args: str) -> None:
        self.machine.run(["ip", "-n", netns, *args], timeout=30)

    def ns_host(self, netns: str, name: str | None = None):
        return self.machine.netns(netns, host_name=name)

    # --- the pieces of a topology ------------------------------------------------------

    def make(self, part: topo.Topology) -> None:
        """Make the namespaces, links, addresses, routes, namespaced sysctls and rules of ``part``.

        Each resource is recorded in the ledger before any is made.  On this machine the
        commands run one by one (sysctls in process); on another, as one script: one
        round trip instead of one per command.
        """
        ledger, steps, made = self.tb.ledger, [], []
        for ns in part.namespaces:
            made.append((ledger.record("netns", name=ns.name), ns.name))
            steps += [["ip", "netns", "add", ns.name], ["ip", "-n", ns.name, "link", "set", "lo", "up"]]
        for link in part.links:
            if link.kind == "veth":
                self.last_link_id = ledger.record("link", netns=link.netns, name=link.name, peer=link.peer,
                                                  peer_netns=link.peer_netns)
                steps.append(["ip", "-n", link.netns, "link", "add", link.name, "type", "veth", "peer", "name",
                              link.peer, "netns", link.peer_netns])
                if link.master:  # (the others are set up with their address)
                    steps.append(["ip", "-n", link.netns, "link", "set", link.name, "master", link.master, "up"])
            else:
                self.last_link_id = ledger.record("link", netns=link.netns, name=link.name)
                steps.append(["ip", "-n", link.netns, "link", "add", link.name, "type", link.kind])
        for addr in part.addresses:
            steps += [["ip", "-n", addr.netns, "addr", "add", addr.cidr, "dev", addr.dev],
                      ["ip", "-n", addr.netns, "link", "set", addr.dev, "up"]]
        steps += [["ip", "-n", r.netns, "route", "add", r.dest, "via", r.via] for r in part.routes]
        if self.machine.is_local:
            for argv in steps:
                self.machine.run(argv, timeout=30)
            for ns, values in part.sysctls.items():
                host = self.ns_host(ns)
                for name, value in values.items():
                    host.write_sysctl(name, value)
            for rule_set in part.rules:
                apply_rule_set(self.machine, rule_set)
            inodes = [self.machine.netns_inode(name) for _, name in made]
        else:  # a pod's own rules (the node's come from NodeRules) in the script too
            rules = [["ip", "netns", "exec", r.netns, "iptables", "-w", *line.split()]
                     for r in part.rules if r.tool == "iptables" for line in r.text.splitlines() if line.strip()]
            steps += [["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{name}={value}"]
                      for ns, values in part.sysctls.items() for name, value in values.items()] + rules
            steps += [["stat", "-L", "-c", "%i", *(f"{NETNS_DIR}/{name}" for _, name in made)]] if made else []
            script = "set -e\n" + "\n".join(shlex.join(argv) for argv in steps)
            out = self.machine.run(["sh", "-c", script], timeout=120).stdout.split()
            inodes = [int(i) for i in out[-len(made):]] if made else []
            for rule_set in part.rules:  # (the pods' are iptables lines, in the script)
                if rule_set.tool != "iptables":
                    apply_rule_set(self.machine, rule_set)
        for (ident, _), inode in zip(made, inodes):
            ledger.note(ident, inode=inode)

    def build_base(self) -> None:
        """Make the client, the node and the pods' bridge (a fresh run)."""
        self.tb.machine.makedirs(self.tb.run_dir, exist_ok=False)
        self.tb.save()
        self.make(topo.base(self.tb.run_id))

    def ensure_file(self, size: int) -> None:
        """Serve a file of ``size`` random bytes (kept while the size is the same)."""
        current = self.state.file
        if current and current.size == size and self.machine.exists(current.path):
            return
        srv = f"{self.tb.run_dir}/srv"
        if not self.machine.exists(srv):
            self.tb.ledger.record("path", path=srv)
            self.machine.makedirs(srv, 0o755, exist_ok=False)
        name = f"file-{size}.bin"
        data = os.urandom(size)
        self.machine.atomic_write(f"{srv}/{name}", data, mode=0o644)
        self.state.file = FileRecord(name, size, hashlib.sha256(data).hexdigest(), f"{srv}/{name}")

    def apply_globals(self, wanted: dict[str, int]) -> None:
        """Claim and set the global sysctls (waiting up to the testbed's ``global_wait``)."""
        held, ledger = self.state.globals or {}, self.tb.ledger
        entries = [e for e in ledger.entries() if e["kind"] == "global-sysctls"]
        if entries and (not wanted or set(held) - set(wanted)):
            for e in entries:
                ledger.remove(e)  # restores the originals
            entries, self.state.globals = [], {}
            self.tb.save()
        if not wanted:
            return
        gs = GlobalSysctls(f"netns-{self.tb.run_id}", host=self.machine, files=self.machine,
                           directory=self.tb.state_dir)
        if not entries:
            ledger.record("global-sysctls", dir=str(self.tb.state_dir), owner=gs.owner, claim=str(gs.claim_path))
        start = time.monotonic()
        while True:
            try:
                gs.set(wanted)
                break
            except GlobalSysctlsHeld:
                if time.monotonic() >= start + self.tb.global_wait:
                    raise
                self.tb.interrupts.check()
                time.sleep(0.2)
                self.waited = time.monotonic() - start
        self.state.globals = dict(wanted)

    def apply_node_sysctls(self, wanted: dict[str, int]) -> None:
        """Set the node's namespaced sysctls, giving back the defaults of those no longer wanted."""
        node = self.ns_host(self.tb.ns("node"), "node")
        defaults = self.state.node_defaults
        for name, value in defaults.items():
            if name not in wanted:
                node.write_sysctl(name, value)
        for name, value in wanted.items():
            defaults.setdefault(name, node.read_sysctl(name))
            node.write_sysctl(name, value)

    # --- servers -----------------------------------------------------------------------

    def start_server(self, spec: topo.ServerSpec) -> dict:
        """Make the server's cgroup (its CPU budget) and start it there; wait until it serves."""
        root, _ = cgroups.cpu_root(self.machine)
        cgroup = str(root / spec.cgroup)
        self.tb.ledger.record("cgroup", path=cgroup)
        cgroups.make_cgroup(spec.cgroup, spec.cpu_limit, host=self.machine)
        argv = list(spec.argv)
        if "--user" in argv and not self.machine.has_user(argv[argv.index("--user") + 1]):
            argv[argv.index("--user") + 1] = "nobody"
        ident = self.tb.ledger.record("process", netns=spec.netns, name=spec.label, cgroup=cgroup)
        log_path = f"{self.tb.run_dir}/{spec.label}.log"
        pid = self.machine.spawn(["ip", "netns", "exec", spec.netns, *argv], cgroup=cgroup, log=log_path)
        start = self.machine.proc_start_time(pid)
        self.tb.ledger.note(ident, pid=pid, start=start)
        inside = self.ns_host(spec.netns)
        deadline = time.monotonic() + READY_TIMEOUT
        while not topo.udp_port_bound(inside.read_file("/proc/thread-self/net/udp").decode(), topo.TFTP_PORT):
            self.tb.interrupts.check()
            self.machine.reap([pid])
            if self.machine.proc_start_time(pid) != start or time.monotonic() > deadline:
                try:
                    text = self.machine.read_file(log_path).decode(errors="replace").strip()[-500:]
                except OSError:
                    text = ""
                raise TestbedError(f"{spec.label}: in.tftpd did not start in {spec.netns}"
                                   + (f": {text}" if text else " (it exited)"))
            time.sleep(0.005)
        return {"cgroup": cgroup, "pid": pid, "start": start, "ledger_id": ident}

    def apply_plain(self, template: PodTemplate, iteration) -> None:
        """Iteration 1: no pods, no rules, one server on the node."""
        for pod in list(self.state.pods):
            self.remove_pod(pod)
        self.clear_rules()
        tpl = template_hash(template, self.state.file.path)
        server = self.state.server
        if server and server.template == tpl:
            return
        if server:
            self.remove_workload(server)
        spec = topo.plain_server(self.tb.run_id, template, iteration.cpu_limit, self._served_dir())
        self.state.server = Server(template=tpl, ip=spec.ip, cpu_limit=iteration.cpu_limit,
                                   **self.start_server(spec))
        self.tb.save()

    def _served_dir(self) -> str:
        return os.path.dirname(self.state.file.path)

    def apply_pods(self, template: PodTemplate, iteration) -> None:
        """Keep the pods of this template (up to the replicas), add the missing ones, remove the rest."""
        if self.state.server:
            self.remove_workload(self.state.server)
            self.state.server = None
        tpl = template_hash(template, self.state.file.path)
        keep = [p for p in self.state.pods if p.template == tpl][:iteration.replicas]
        old = [p for p in self.state.pods if p not in keep]
        new = []
        while len(keep) + len(new) < iteration.replicas:
            new.append(self.add_pod(template, tpl, iteration))
        self.state.pods = keep + new + old  # old ones still listed until removed
        self.tb.save()
        self.tb.rules.apply(keep + new, old, iteration)
        for pod in old:
            self.remove_pod(pod)

    def _next_ip(self) -> str:
        used = {p.ip for p in self.state.pods}
        for _ in range(253):
            n = self.state.next_ip
            self.state.next_ip = 2 if n >= 254 else n + 1
            if topo.pod_ip(n) not in used:
                return topo.pod_ip(n)
        raise TestbedError("no free pod address left in 10.244.0.0/24")

    def add_pod(self, template: PodTemplate, tpl: str, iteration) -> Pod:
        """Make one pod (namespace, veth, address, route, sysctls, rule) and start its server."""
        serial = self.state.next_serial
        self.state.next_serial = serial + 1
        ip = self._next_ip()
        part = topo.pod(self.tb.run_id, serial, ip, template, iteration.cpu_limit, self._served_dir())
        pod = Pod(template=tpl, ip=ip, cpu_limit=iteration.cpu_limit, serial=serial,
                  name=f"{template.deployment}-{tpl}-{secrets.token_hex(3)[:5]}",
                  netns=part.namespaces[0].name, veth=part.links[0].name, sysctls=dict(template.sysctls),
                  track_conntrack=template.track_conntrack)
        self.state.pods.append(pod)
        self.tb.save()
        self.make(part)
        pod.link_id = self.last_link_id
        started = self.start_server(part.servers[0])
        pod.cgroup, pod.pid, pod.start, pod.ledger_id = (started[k] for k in ("cgroup", "pid", "start",
                                                                              "ledger_id"))
        return pod

    def remove_workload(self, item: Server) -> None:
        """Stop a server (its whole cgroup) and forget its ledger entries."""
        ledger = self.tb.ledger
        entries = {e["id"]: e for e in ledger.entries()}
        if item.ledger_id in entries:
            ledger.remove(entries[item.ledger_id])
        for e in entries.values():
            if e["kind"] == "cgroup" and e["path"] == item.cgroup:
                ledger.remove(e)
        self.machine.reap([item.pid] if item.pid else [])

    def remove_pod(self, pod: Pod) -> None:
        """Stop a pod's server, remove its veth and namespace, and its node conntrack entries."""
        self.remove_workload(pod)
        ledger = self.tb.ledger
        for e in reversed(ledger.entries()):
            if (e["kind"] == "link" and e.get("peer_netns") == pod.netns) or \
                    (e["kind"] == "netns" and e["name"] == pod.netns):
                ledger.remove(e)
        self.state.pods = [p for p in self.state.pods if p.serial != pod.serial]
        self.tb.save()
        self.forget_udp_flows(pod.ip)

    def forget_udp_flows(self, ip: str) -> None:
        """Delete the node's UDP conntrack entries to or from a removed pod, as kube-proxy does.

        Otherwise a client that reuses a source port matches the old request entry
        and is sent to the pod that is gone.
        """
        node = self.ns_host(self.tb.ns("node"))
        for match in ("--reply-src", "--orig-src"):
            res = node.run(["conntrack", "-D", "-p", "udp", match, ip], check=False, timeout=30)
            if not res.ok and "0 flow entries" not in res.stderr:
                res.check()

    def clear_rules(self) -> None:
        """Empty the node's tables (iteration 1, or before another kind of rules)."""
        self.tb.rules.clear()


def apply_rule_set(machine, rules: topo.RuleSet) -> None:
    """Load one :class:`~labkit.testbed.topology.RuleSet` through its tool in its namespace of ``machine``.

    Raises:
        TestbedError: ``nft`` is not installed (for an ``nft`` set), or the tool refused the rules.
    """
    inside = machine.netns(rules.netns)
    if rules.tool == "iptables-restore":
        inside.run(["iptables-restore", "-w", *([] if rules.flush else ["--noflush"])], input=rules.text)
    elif rules.tool == "nft":
        if not machine.which("nft"):
            raise TestbedError("iteration needs nft for kube-proxy's nftables mode: install the Debian "
                               "package nftables (make lab does)")
        inside.run(["nft", "-f", "-"], input=rules.text)
    elif rules.tool == "iptables":
        for line in rules.text.splitlines():
            if line.strip():
                inside.run(["iptables", "-w", *line.split()], timeout=30)
    else:
        raise TestbedError(f"{rules.purpose}: no way to load rules with {rules.tool!r}")


class NodeRules:
    """The node's kube-proxy rules of a running testbed: each change's rule sets
    (:func:`~labkit.testbed.topology.node_rule_change`) applied in order, and recorded in the run state."""

    def __init__(self, testbed):
        self.tb = testbed

    def apply(self, current: list[Pod], stale: list[Pod], iteration=None) -> None:
        """Load the rules for the ``current`` pods, dropping the chains of the ``stale`` ones."""
        state = self.tb.state
        mode = getattr(iteration, "proxy_mode", "iptables")
        notrack = bool(getattr(iteration, "node_notrack", False))
        change = topo.node_rule_change(
            self.tb.manifests, self.tb.ns("node"), [p.ip for p in current], stale_ips=[p.ip for p in stale],
            proxy_mode=mode, notrack=notrack, helper_rule=state.helper_rule,
            loaded=(state.proxy_mode, state.notrack) if state.rules_applied else None,
            helper_option=self.tb.helper_option)
        for rules in change.sets:
            apply_rule_set(self.tb.machine, rules)
        state.proxy_mode, state.notrack, state.helper_rule = mode, notrack, change.helper_rule
        state.rules_applied, state.endpoints = True, change.endpoints
        self.tb.save()

    def clear(self) -> None:
        """Empty the node's tables (nftables' tables too); nothing to do when none are loaded."""
        state = self.tb.state
        if not state.rules_applied:
            return
        for rules in topo.clear_node_rules(self.tb.ns("node"), state.proxy_mode):
            apply_rule_set(self.tb.machine, rules)
        state.rules_applied, state.endpoints = False, []
        self.tb.save()
