"""The embedded testbed: a Kubernetes-shaped node in network namespaces of this machine.

Namespaces: ``lk<run>-client`` (the measurement tool's host), ``lk<run>-node``,
and ``lk<run>-pod<k>`` per pod replica.  The client reaches the node over its
own veth pair; the pods hang off a bridge in the node, as with a CNI bridge.
Nothing links the lab to the machine's own namespace.  The node gets
kube-proxy's iptables rules rendered from ``k8s-manifests/`` (plus the explicit
TFTP helper rule), each pod runs a real ``in.tftpd`` under its CPU limit
(a cgroup), and the iteration's sysctls are applied the Kubernetes way: global
ones in the machine's namespace through :class:`~labkit.sysctls.GlobalSysctls`,
namespaced node ones in the node, pod ones after kubelet-style admission.

Every resource is written to the run's :class:`~labkit.ledger.Ledger` before it
is made; ``down`` and :func:`clean` undo exactly what the ledgers list.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import string
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from labkit import cgroups
from labkit.cleanup import OWNER_NAME, owner_record
from labkit.exceptions import GlobalSysctlsHeld, StateCorrupt, TestbedError
from labkit.host import NETNS_DIR, Host, LocalHost, NetnsHost, in_netns
from labkit.kubeproxy import (
    Endpoint, render_helper_rule, render_nft_cleanup, render_nft_rules, render_notrack_rule, render_rules,
)
from labkit.ledger import Ledger, netns_inode, proc_start_time
from labkit.manifests import Manifests, PodTemplate, admit_sysctls, check_allowlist
from labkit.signals import noted
from labkit.sysctls import GlobalSysctls
from labkit.sysctls import state_dir as default_state_dir
from labkit.testbed.base import ServedFile, Testbed
from labkit.util import atomic_write

log = logging.getLogger(__name__)

NODE_IP = "10.69.0.1"
CLIENT_IP = "10.69.0.2"
LINK_PREFIX = 24
POD_GATEWAY = "10.244.0.1"
POD_NET = "10.244.0."
CLUSTER_IP = "10.96.0.69"
RUN_DIR_PREFIX = "netns-"
STATE_NAME = "state.json"
READY_TIMEOUT = 5.0
_ALPHABET = string.ascii_lowercase + string.digits


def read_state(path: Path) -> dict[str, Any]:
    """A run's ``state.json``.

    Raises:
        StateCorrupt: it is not the JSON document labkit wrote (the message names it
            and says to run ``labkit clean``).
    """
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateCorrupt(path, f"not JSON: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("pods", []), list) or "state" not in state:
        raise StateCorrupt(path, "not a netns testbed state document")
    return state


def run_dirs(directory: Path | None = None) -> list[Path]:
    """The netns testbed runs recorded in a state directory (oldest first; background flows' not)."""
    directory = Path(directory or default_state_dir())
    if not directory.is_dir():
        return []
    runs = [p for p in directory.glob(f"{RUN_DIR_PREFIX}*") if p.is_dir()
            and not p.name.startswith(f"{RUN_DIR_PREFIX}bg-")]
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def new_run_id() -> str:
    """Five random lowercase letters/digits no namespace of this machine uses yet."""
    while True:
        rid = "".join(secrets.choice(_ALPHABET) for _ in range(5))
        taken = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
        if not any(n.startswith(f"lk{rid}") for n in taken):
            return rid


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


def _template_hash(template: PodTemplate, file_path: str) -> str:
    text = json.dumps([template.args, template.cpu_limit, sorted(template.sysctls.items()),
                       template.track_conntrack, file_path])
    return "".join(_ALPHABET[b % 36] for b in hashlib.sha256(text.encode()).digest()[:10])


def _udp_port_bound(port: int) -> bool:
    """True when a UDP socket of this thread's namespace is bound to ``port`` (IPv4)."""
    with open("/proc/thread-self/net/udp") as f:
        next(f)
        return any(int(line.split()[1].split(":")[1], 16) == port for line in f)


class _Interrupts:
    """SIGINT/SIGTERM/SIGHUP while building are noted, and raised at the next safe point.

    A signal raised at an arbitrary point could land while a child (``ip netns add``)
    is still being started, and the cleanup would run before the child made what
    it makes.  So the handler only notes the signal; :meth:`check` (called before
    each ledger record and in waits) raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")

    @contextmanager
    def deferred(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, frame):
            self.signum = signum
            noted(signum)  # the command's exit code says which signal it was

        old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
            self.check()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.signum = None


def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP off while cleaning up (a second signal must not leave half a lab);
    one that came meanwhile is raised as KeyboardInterrupt once the cleanup is done."""
    return _Interrupts().deferred()


class NetnsTestbed(Testbed):
    """The netns testbed of one state directory (one run at a time).

    Args:
        state_dir: where the run's ledger and state live ($LABKIT_STATE_DIR or /run/labkit).
        manifests_dir: the ``k8s-manifests/`` directory to read.
        helper_rule: add the explicit TFTP conntrack helper rule (a test switch: without
            it, fetches through the NodePort fail on kernels since 6.0).  None keeps the
            running testbed's choice (True for a new one).
        global_wait: seconds to wait while another lab run holds the global sysctls.
    """

    name = "netns"

    def __init__(self, *, state_dir: str | os.PathLike | None = None,
                 manifests_dir: str | os.PathLike | None = None,
                 helper_rule: bool | None = None, global_wait: float = 0.0):
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.manifests = Manifests(manifests_dir)
        self.global_wait = global_wait
        self._helper_option = helper_rule
        self._procs: dict[int, subprocess.Popen] = {}
        self._state: dict[str, Any] | None = None
        self._interrupts = _Interrupts()
        self.run_id: str | None = None
        self._load()

    def _load(self) -> None:
        """Attach to the run recorded in the state directory (the newest), if any."""
        self.run_id, self._state = None, None
        for run in reversed(run_dirs(self.state_dir)):
            if (run / STATE_NAME).exists():
                self.run_id = run.name[len(RUN_DIR_PREFIX):]
                self._state = read_state(run / STATE_NAME)
                break

    # --- names and state ---------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """The run's state directory."""
        if not self.run_id:
            raise TestbedError("the netns testbed is down (no run); `labkit up` first")
        return self.state_dir / f"{RUN_DIR_PREFIX}{self.run_id}"

    @property
    def ledger(self) -> Ledger:
        """The run's ledger (each record is a safe point for a pending SIGINT/SIGTERM)."""
        return Ledger(self.run_dir, before_record=self._interrupts.check)

    def ns(self, what: str) -> str:
        """The namespace name of ``client``, ``node`` or ``pod<k>`` in this run."""
        return f"lk{self.run_id}-{what}"

    def _save(self) -> None:
        assert self._state is not None
        self._state["updated"] = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / STATE_NAME, json.dumps(self._state, indent=1).encode())

    def _ip(self, netns: str, *args: str) -> None:
        LocalHost("init").run(["ip", "-n", netns, *args], timeout=30)

    # --- up ---------------------------------------------------------------------------

    def up(self, iteration) -> None:
        """Build the testbed for ``iteration`` or reconfigure the running one.

        Pod sysctls are admitted first: a refused pod raises
        :class:`~labkit.exceptions.PodRejected` before anything changes.  Any other
        failure, SIGINT or SIGTERM removes everything the run made and re-raises.

        Raises:
            PodRejected: a pod sysctl is forbidden (``SysctlForbidden``).
            TestbedError: the kubelet allowlist is invalid, or building failed.
        """
        template = self.manifests.pod_template_for(iteration)
        check_allowlist(iteration.allowed_unsafe_sysctls)
        if iteration.setup == "nodeport":
            pod_name = f"{template.deployment}-{_template_hash(template, '')[:10]}-xxxxx"
            admit_sysctls(pod_name, template.sysctls, iteration.allowed_unsafe_sysctls)
        from labkit.loadguard import refuse_during_load

        with state_lock(self.state_dir):
            self._load()
            if self._state is not None:
                refuse_during_load(self, "reconfigure the testbed")
            if self._state is not None and self._state.get("state") != "up":
                raise TestbedError(
                    f"netns run {self.run_id} did not finish being built or taken down (a crash?); "
                    "run `labkit clean` first")
            self._up_locked(iteration, template)

    def _up_locked(self, iteration, template: PodTemplate) -> None:
        started = time.monotonic()
        self._waited = 0.0
        fresh = self._state is None
        try:
            with self._interrupts.deferred():
                if fresh:
                    self._build_base()
                if self._helper_option is not None and not self._state["rules_applied"]:
                    self._state["helper_rule"] = self._helper_option
                self._state["state"] = "building"
                self._save()
                self._ensure_file(iteration.file_size)
                self._apply_globals(iteration.global_sysctls)
                self._apply_node_sysctls(iteration.namespaced_node_sysctls)
                if iteration.setup == "plain":
                    self._apply_plain(template, iteration)
                else:
                    self._apply_pods(template, iteration)
                took = time.monotonic() - started
                self._state.update(state="up", iteration=iteration.to_dict(),
                                   last_up={"seconds": round(took, 3),
                                            "waited_for_globals_s": round(self._waited, 3)})
                self._save()
                # the process that configured it last uses it: `labkit clean` leaves it alone while
                # that process lives (a notebook's kernel), and removes it once it is gone
                atomic_write(self.run_dir / OWNER_NAME, json.dumps(owner_record()).encode())
        except GlobalSysctlsHeld:
            if fresh:
                self._down_locked()
            else:  # nothing was changed yet: the running testbed stays as it was
                for e in self.ledger.entries():
                    if e["kind"] == "global-sysctls" and not self._state.get("globals"):
                        self.ledger.remove(e)
                self._state["state"] = "up"
                self._save()
            raise
        except BaseException:
            log.error("up failed; removing what this run made")
            self._down_locked()
            raise
        log.info("netns testbed %s up for iteration %s in %.2f s", self.run_id, iteration.number,
                 time.monotonic() - started)

    def _build_base(self) -> None:
        self.run_id = new_run_id()
        helper = True if self._helper_option is None else self._helper_option
        self._state = {"testbed": "netns", "run_id": self.run_id, "state": "building",
                       "created": time.time(), "helper_rule": helper, "rules_applied": False,
                       "pods": [], "server": None, "next_serial": 1, "next_ip": 2,
                       "globals": {}, "node_defaults": {}, "file": None}
        self.run_dir.mkdir(parents=True, exist_ok=False)
        self._save()
        client, node = self.ns("client"), self.ns("node")
        self._add_netns(client)
        self._add_netns(node)
        n0, c0, br = (link_name(self.run_id, w) for w in ("n0", "c0", "br"))
        self.ledger.record("link", netns=node, name=n0, peer=c0, peer_netns=client)
        self._ip(node, "link", "add", n0, "type", "veth", "peer", "name", c0, "netns", client)
        self._ip(node, "addr", "add", f"{NODE_IP}/{LINK_PREFIX}", "dev", n0)
        self._ip(node, "link", "set", n0, "up")
        self._ip(client, "addr", "add", f"{CLIENT_IP}/{LINK_PREFIX}", "dev", c0)
        self._ip(client, "link", "set", c0, "up")
        NetnsHost(node).write_sysctl("net.ipv4.ip_forward", 1)
        self.ledger.record("link", netns=node, name=br)
        self._ip(node, "link", "add", br, "type", "bridge")
        self._ip(node, "addr", "add", f"{POD_GATEWAY}/24", "dev", br)
        self._ip(node, "link", "set", br, "up")

    def _add_netns(self, name: str) -> None:
        ident = self.ledger.record("netns", name=name)
        LocalHost("init").run(["ip", "netns", "add", name], timeout=30)
        self.ledger.note(ident, inode=netns_inode(name))
        self._ip(name, "link", "set", "lo", "up")

    def _ensure_file(self, size: int) -> None:
        current = self._state.get("file")
        if current and current["size"] == size and Path(current["path"]).exists():
            return
        srv = self.run_dir / "srv"
        if not srv.exists():
            self.ledger.record("path", path=str(srv))
            srv.mkdir(mode=0o755)
            os.chmod(srv, 0o755)
        name = f"file-{size}.bin"
        data = os.urandom(size)
        atomic_write(srv / name, data, mode=0o644)
        self._state["file"] = {"name": name, "size": size, "sha256": hashlib.sha256(data).hexdigest(),
                               "path": str(srv / name)}

    def _apply_globals(self, wanted: dict[str, int]) -> None:
        held = self._state.get("globals") or {}
        entries = [e for e in self.ledger.entries() if e["kind"] == "global-sysctls"]
        if entries and (not wanted or set(held) - set(wanted)):
            for e in entries:
                self.ledger.remove(e)  # restores the originals
            entries, self._state["globals"] = [], {}
            self._save()
        if not wanted:
            return
        gs = GlobalSysctls(f"netns-{self.run_id}", directory=self.state_dir)
        if not entries:
            self.ledger.record("global-sysctls", dir=str(self.state_dir), owner=gs.owner,
                               claim=str(gs.claim_path))
        start = time.monotonic()
        while True:
            try:
                gs.set(wanted)
                break
            except GlobalSysctlsHeld:
                if time.monotonic() >= start + self.global_wait:
                    raise
                self._interrupts.check()
                time.sleep(0.2)
                self._waited = time.monotonic() - start
        self._state["globals"] = dict(wanted)

    def _apply_node_sysctls(self, wanted: dict[str, int]) -> None:
        node = NetnsHost(self.ns("node"), name="node")
        defaults = self._state["node_defaults"]
        for name, value in defaults.items():
            if name not in wanted:
                node.write_sysctl(name, value)
        for name, value in wanted.items():
            defaults.setdefault(name, node.read_sysctl(name))
            node.write_sysctl(name, value)

    # --- workloads ---------------------------------------------------------------------

    def _server_argv(self, template: PodTemplate) -> list[str]:
        args = list(template.args)
        args[-1] = str(Path(self._state["file"]["path"]).parent)  # the served directory
        if "--user" in args:
            i = args.index("--user") + 1
            try:
                pwd.getpwnam(args[i])
            except KeyError:
                args[i] = "nobody"
        return args

    def _spawn(self, netns: str, cgroup: Path, argv: list[str], label: str) -> dict[str, Any]:
        """Start ``argv`` in ``netns`` inside ``cgroup`` (it joins the cgroup before exec)."""
        ident = self.ledger.record("process", netns=netns, name=label, cgroup=str(cgroup))
        log_path = self.run_dir / f"{label}.log"
        with open(log_path, "ab") as err:
            proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"),
                 "ip", "netns", "exec", netns, *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, close_fds=True)
        self._procs[proc.pid] = proc
        start = proc_start_time(proc.pid)
        self.ledger.note(ident, pid=proc.pid, start=start)
        deadline = time.monotonic() + READY_TIMEOUT
        while not in_netns(netns, _udp_port_bound, 69):
            self._interrupts.check()
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log_path.read_text(errors="replace").strip()[-500:]
                raise TestbedError(f"{label}: in.tftpd did not start in {netns}"
                                   + (f": {text}" if text else f" (exit {proc.returncode})"))
            time.sleep(0.005)
        return {"pid": proc.pid, "start": start, "ledger_id": ident}

    def _make_cgroup(self, name: str, cpu_limit: float | None) -> Path:
        root, _ = cgroups.cpu_root()
        self.ledger.record("cgroup", path=str(root / name))
        return cgroups.make_cgroup(name, cpu_limit)

    def _apply_plain(self, template: PodTemplate, iteration) -> None:
        for pod in list(self._state["pods"]):
            self._remove_pod(pod)
        self._clear_rules()
        server = self._state.get("server")
        tpl = _template_hash(template, self._state["file"]["path"])
        if server and server["template"] == tpl:
            return
        if server:
            self._remove_workload(server)
        name = f"lk{self.run_id}-server"
        cgroup = self._make_cgroup(name, iteration.cpu_limit)
        proc = self._spawn(self.ns("node"), cgroup, self._server_argv(template), "server")
        self._state["server"] = {"template": tpl, "cgroup": str(cgroup), "ip": NODE_IP,
                                 "cpu_limit": iteration.cpu_limit, **proc}
        self._save()

    def _apply_pods(self, template: PodTemplate, iteration) -> None:
        if self._state.get("server"):
            self._remove_workload(self._state["server"])
            self._state["server"] = None
        tpl = _template_hash(template, self._state["file"]["path"])
        keep = [p for p in self._state["pods"] if p["template"] == tpl][:iteration.replicas]
        old = [p for p in self._state["pods"] if p not in keep]
        new = []
        while len(keep) + len(new) < iteration.replicas:
            new.append(self._add_pod(template, tpl, iteration))
        self._state["pods"] = keep + new + old  # old ones still listed until removed
        self._save()
        self._apply_rules(keep + new, old, iteration)
        for pod in old:
            self._remove_pod(pod)

    def _next_ip(self) -> str:
        used = {p["ip"] for p in self._state["pods"]}
        for _ in range(253):
            n = self._state["next_ip"]
            self._state["next_ip"] = 2 if n >= 254 else n + 1
            if f"{POD_NET}{n}" not in used:
                return f"{POD_NET}{n}"
        raise TestbedError("no free pod address left in 10.244.0.0/24")

    def _add_pod(self, template: PodTemplate, tpl: str, iteration) -> dict[str, Any]:
        serial = self._state["next_serial"]
        self._state["next_serial"] = serial + 1
        ip = self._next_ip()
        ns, node = self.ns(f"pod{serial}"), self.ns("node")
        veth, eth = link_name(self.run_id, f"v{serial}"), link_name(self.run_id, f"e{serial}")
        pod = {"serial": serial, "name": f"{template.deployment}-{tpl}-{secrets.token_hex(3)[:5]}",
               "netns": ns, "ip": ip, "template": tpl, "veth": veth, "cpu_limit": iteration.cpu_limit,
               "sysctls": dict(template.sysctls), "track_conntrack": template.track_conntrack}
        self._state["pods"].append(pod)
        self._save()
        self._add_netns(ns)
        pod["link_id"] = self.ledger.record("link", netns=node, name=veth, peer=eth, peer_netns=ns)
        self._ip(node, "link", "add", veth, "type", "veth", "peer", "name", eth, "netns", ns)
        self._ip(node, "link", "set", veth, "master", link_name(self.run_id, "br"), "up")
        self._ip(ns, "addr", "add", f"{ip}/24", "dev", eth)
        self._ip(ns, "link", "set", eth, "up")
        self._ip(ns, "route", "add", "default", "via", POD_GATEWAY)
        host = NetnsHost(ns)
        for name, value in template.sysctls.items():
            host.write_sysctl(name, value)
        if template.track_conntrack:
            # The article's pods tracked connections; a modern kernel needs a stateful rule for it.
            host.run(["iptables", "-w", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
        cgroup = self._make_cgroup(f"lk{self.run_id}-pod{serial}", iteration.cpu_limit)
        pod["cgroup"] = str(cgroup)
        pod.update(self._spawn(ns, cgroup, self._server_argv(template), f"pod{serial}"))
        return pod

    def _apply_rules(self, current: list[dict], stale: list[dict], iteration=None) -> None:
        mode = getattr(iteration, "proxy_mode", "iptables")
        notrack = bool(getattr(iteration, "node_notrack", False))
        if self._state["rules_applied"] and (self._state.get("proxy_mode", "iptables"),
                                             self._state.get("notrack", False)) != (mode, notrack):
            self._clear_rules()  # another kind of rules: start from empty tables
        self._state.update(proxy_mode=mode, notrack=notrack)
        if mode == "nftables":
            self._apply_nft_rules(current)
            return
        svc = self.manifests.service_port()
        port = self.manifests.pod_template().container_port
        first = not self._state["rules_applied"]
        text = render_rules(svc, [Endpoint(p["ip"], port) for p in current], cluster_ip=CLUSTER_IP,
                            helper_rule=self._state["helper_rule"], jumps=not self._state["rules_applied"],
                            stale_endpoints=[Endpoint(p["ip"], port) for p in stale])
        node = NetnsHost(self.ns("node"))
        if self._state["rules_applied"] and self._helper_option not in (None, self._state["helper_rule"]):
            # The helper switch changed on a running testbed: the raw table holds only that rule.
            node.run(["iptables-restore", "-w"], input="*raw\nCOMMIT\n")
            if self._helper_option:
                node.run(["iptables-restore", "-w", "--noflush"], input=render_helper_rule(svc))
            self._state["helper_rule"] = self._helper_option
        node.run(["iptables-restore", "-w", "--noflush"], input=text)
        if first and notrack:  # iteration 11: the NodePort's requests untracked, ahead of the helper
            node.run(["iptables-restore", "-w", "--noflush"], input=render_notrack_rule(svc))
        self._state["rules_applied"] = True
        self._state["endpoints"] = [f"{p['ip']}:{port}" for p in current]
        self._save()

    def _apply_nft_rules(self, current: list[dict]) -> None:
        """Iteration 12: the node's rules as kube-proxy's nftables mode renders them, loaded with nft."""
        if not shutil.which("nft", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            raise TestbedError("iteration needs nft for kube-proxy's nftables mode: install the Debian "
                               "package nftables (make lab does)")
        svc = self.manifests.service_port()
        port = self.manifests.pod_template().container_port
        text = render_nft_rules(svc, [Endpoint(p["ip"], port) for p in current], cluster_ip=CLUSTER_IP,
                                helper_rule=self._state["helper_rule"])
        NetnsHost(self.ns("node")).run(["nft", "-f", "-"], input=text)
        self._state["rules_applied"] = True
        self._state["endpoints"] = [f"{p['ip']}:{port}" for p in current]
        self._save()

    def _clear_rules(self) -> None:
        if not self._state.get("rules_applied"):
            return
        if self._state.get("proxy_mode") == "nftables":
            NetnsHost(self.ns("node")).run(["nft", "-f", "-"], input=render_nft_cleanup())
        empty = "".join(f"*{t}\nCOMMIT\n" for t in ("raw", "filter", "nat"))
        NetnsHost(self.ns("node")).run(["iptables-restore", "-w"], input=empty)
        self._state.update(rules_applied=False, endpoints=[])
        self._save()

    def _remove_workload(self, item: dict[str, Any]) -> None:
        """Stop a server (its whole cgroup) and forget its ledger entries."""
        entries = {e["id"]: e for e in self.ledger.entries()}
        if item.get("ledger_id") in entries:
            self.ledger.remove(entries[item["ledger_id"]])
        for e in entries.values():
            if e["kind"] == "cgroup" and e["path"] == item.get("cgroup"):
                self.ledger.remove(e)
        proc = self._procs.pop(item.get("pid", -1), None)
        if proc is not None:
            proc.wait()

    def _remove_pod(self, pod: dict[str, Any]) -> None:
        self._remove_workload(pod)
        for e in reversed(self.ledger.entries()):
            if (e["kind"] == "link" and e.get("peer_netns") == pod["netns"]) or \
                    (e["kind"] == "netns" and e["name"] == pod["netns"]):
                self.ledger.remove(e)
        self._state["pods"] = [p for p in self._state["pods"] if p["serial"] != pod["serial"]]
        self._save()
        self._forget_udp_flows(pod["ip"])

    def _forget_udp_flows(self, ip: str) -> None:
        """Delete the node's UDP conntrack entries to or from a removed pod, as kube-proxy does.

        Otherwise a client that reuses a source port matches the old request entry
        and is sent to the pod that is gone.
        """
        node = NetnsHost(self.ns("node"))
        for match in ("--reply-src", "--orig-src"):
            res = node.run(["conntrack", "-D", "-p", "udp", match, ip], check=False, timeout=30)
            if not res.ok and "0 flow entries" not in res.stderr:
                res.check()

    # --- down, status, hosts -------------------------------------------------------------

    def down(self, *, force: bool = False) -> None:
        """Remove everything the run's ledger lists, in reverse order; restore the globals.

        Idempotent: nothing to do when the testbed is down.

        Args:
            force: stop a load another process runs on the testbed first (its
                iteration then fails); without it such a load makes ``down`` refuse.

        Raises:
            LoadUnderWay: another process runs a load on it (and not ``force``).
            StateCorrupt: the run's ledger is damaged (nothing was removed; `labkit clean` salvages).
            TestbedError: something could not be removed (the rest was; `labkit clean` retries).
        """
        from labkit.loadguard import refuse_during_load

        if not self.state_dir.exists():
            self._state, self.run_id = None, None
            return
        with state_lock(self.state_dir):
            if self.run_id and not (self.run_dir / STATE_NAME).exists():
                self._load()  # taken down by another process meanwhile
            if self.run_id:
                refuse_during_load(self, "take the testbed down", force=force)
            self._down_locked()

    def _down_locked(self) -> None:
        if not self.run_id:
            return
        with signals_deferred():
            try:
                _discard_run(self.run_dir)
            finally:
                for proc in self._procs.values():
                    proc.wait()
                self._procs.clear()
        log.info("netns testbed %s down", self.run_id)
        self._state, self.run_id = None, None

    def _require(self) -> dict[str, Any]:
        if self._state is None or self._state.get("state") != "up":
            raise TestbedError("the netns testbed is not up; run `labkit up` first")
        return self._state

    def roles(self) -> list[str]:
        """``init``, ``node``, ``pod-1``.. and ``client`` (empty when down)."""
        if self._state is None:
            return []
        pods = [f"pod-{i}" for i in range(1, len(self._pods()) + 1)]
        return ["init", "node", *pods, "client"]

    def _pods(self) -> list[dict[str, Any]]:
        return sorted(self._state["pods"], key=lambda p: p["serial"])

    def host(self, role: str) -> Host:
        """The Host of ``role``: ``init`` (this machine), ``node``, ``client``, ``pod-N``.

        Raises:
            TestbedError: down, or no such role.
        """
        self._require()
        if role == "init":
            return LocalHost("init")
        if role in ("node", "client"):
            return NetnsHost(self.ns(role), name=role)
        if role.startswith("pod-") and role[4:].isdigit():
            pods = self._pods()
            i = int(role[4:])
            if 1 <= i <= len(pods):
                return NetnsHost(pods[i - 1]["netns"], name=role)
        raise TestbedError(f"no role {role!r} on this testbed; roles: {', '.join(self.roles())}")

    def netns_roles(self) -> dict[int, str]:
        """Namespace inode -> role, the machine's own namespace included as ``init``."""
        out = {os.stat("/proc/self/ns/net").st_ino: "init"}  # the namespace labkit runs in
        for role in self.roles():
            if role != "init":
                inode = netns_inode(self.host(role).netns)
                if inode:
                    out[inode] = role
        return out

    @property
    def service(self) -> tuple[str, int]:
        """``(node_ip, node_port)``: port 69 of the plain server in iteration 1."""
        state = self._require()
        if state.get("server"):
            return NODE_IP, 69
        return NODE_IP, self.manifests.service_port().node_port

    @property
    def file(self) -> ServedFile:
        """The served file (name, size, sha256)."""
        f = self._require()["file"]
        return ServedFile(f["name"], f["size"], f["sha256"])

    def status(self) -> dict[str, Any]:
        """The ``labkit status --json`` document (``state: down`` when nothing is up)."""
        if self._state is None:
            return {"testbed": "netns", "state": "down", "state_dir": str(self.state_dir), "hosts": []}
        s = self._state
        it = s.get("iteration") or {}
        hosts = [{"role": "client", "name": "client", "ip": CLIENT_IP, "netns": self.ns("client")},
                 {"role": "node", "name": "node", "ip": NODE_IP, "netns": self.ns("node")}]
        problems = [f"namespace {h['netns']} is missing" for h in hosts if netns_inode(h["netns"]) is None]
        if s.get("server"):
            hosts[1]["server_pid"] = s["server"]["pid"]
            if proc_start_time(s["server"]["pid"]) != s["server"]["start"]:
                problems.append("the plain server is not running")
        for i, p in enumerate(self._pods(), 1):
            hosts.append({"role": "pod", "name": f"pod-{i}", "pod": p["name"], "ip": p["ip"],
                          "netns": p["netns"], "pid": p.get("pid"), "cgroup": p.get("cgroup"),
                          "cpu_limit": p["cpu_limit"], "sysctls": p["sysctls"]})
            if not p.get("pid") or proc_start_time(p["pid"]) != p.get("start"):
                problems.append(f"pod-{i}: in.tftpd is not running")
        node_ip, node_port = (NODE_IP, 69) if s.get("server") else \
            (NODE_IP, self.manifests.service_port().node_port)
        svc = self.manifests.service_port()
        f = s.get("file") or {}
        return {
            "testbed": "netns", "state": s["state"] if not problems else "broken", "problems": problems,
            "run_id": s["run_id"], "state_dir": str(self.state_dir),
            "iteration": it.get("number"), "profile": it.get("profile"), "setup": it.get("setup"),
            "service": {"node_ip": node_ip, "node_port": node_port, "protocol": "udp",
                        "name": f"{svc.namespace}/{svc.name}", "cluster_ip": CLUSTER_IP},
            "file": {"name": f.get("name"), "size": f.get("size"), "sha256": f.get("sha256")},
            "hosts": hosts, "replicas": len(self._pods()), "cpu_limit": it.get("cpu_limit"),
            "helper_rule": s["helper_rule"], "pods_track_conntrack": it.get("pods_track_conntrack"),
            "node_sysctls": it.get("node_sysctls", {}), "pod_sysctls": it.get("pod_sysctls", {}),
            "allowed_unsafe_sysctls": it.get("allowed_unsafe_sysctls", []),
            "endpoints": s.get("endpoints", []), "updated": s.get("updated"), "last_up": s.get("last_up"),
        }

    # --- a replay run's testbed (issue 13c: the seam; to be ported into the rewritten class) ---

    is_local = True  # namespaces of this machine's kernel

    @classmethod
    def for_replay(cls, run_id: str, **options: Any) -> "NetnsTestbed":
        """The testbed of the replay run ``run_id``: its state in that run's state folder."""
        from labkit.results import replay_state_dir

        return super().for_replay(run_id, state_dir=replay_state_dir(run_id), **options)

    def teardown(self) -> list[str]:
        """Outside a replay, :meth:`down`; in a replay run, undo every testbed run its state folder
        records (one a dead kernel left too), restore the global sysctls and remove the emptied folders.

        Raises:
            TestbedError: something could not be removed (named; the rest was).
        """
        if self.replay_run_id is None:
            return super().teardown()
        if not self.state_dir.exists():
            return []
        removed = clean(self.state_dir)
        for folder in sorted(self.state_dir.glob("*"), reverse=True) + [self.state_dir]:
            try:  # what clean() emptied; anything still holding files stays
                folder.rmdir()
            except OSError:
                pass
        self._state, self.run_id = None, None
        return removed


def clean(directory: str | os.PathLike | None = None) -> list[str]:
    """Undo every run recorded in a state directory (also crashed ones); restore the globals.

    See :func:`labkit.cleanup.clean` (replays, background flows, damaged records).
    Only what the runs' records name is removed; look-alike resources made by others stay.

    Returns:
        A line per resource removed.

    Raises:
        TestbedError: something could not be removed (named in the message).
    """
    from labkit.cleanup import clean as clean_all

    report = clean_all(directory)
    if report.problems:
        raise TestbedError("clean: " + "; ".join(report.problems))
    return report.removed


def _discard_run(run: Path) -> list[dict[str, Any]]:
    """Undo a run's ledger, then remove its folder (state, logs, stale temporary files)."""
    ledger = Ledger(run)
    done = ledger.undo()
    shutil.rmtree(run, ignore_errors=True)
    return done


@contextmanager
def state_lock(directory: Path) -> Iterator[None]:
    """Serialize up/down/clean of one state directory across processes (flock on the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
