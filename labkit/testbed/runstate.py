"""The netns testbed's run state, typed: what ``state.json`` holds, as dataclasses.

:class:`RunState` is one run (its namespaces' id, what it serves, the rules it
loaded, the global and node sysctls it changed); :class:`Pod` and
:class:`Server` are its TFTP servers; :class:`FileRecord` is the served file.
:meth:`RunState.to_dict` writes the same JSON keys labkit has always written,
so ``labkit clean``, the load guard and ``labkit status --json`` read old and
new files alike; :func:`read_state` loads a file written by any labkit since
the keys were introduced and refuses anything else naming the file.
Runs live in ``netns-<id>/`` folders of the state directory (:func:`run_dirs`),
whose changes :func:`state_lock` serializes.
"""

from __future__ import annotations

import json
import secrets
import string
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from labkit.exceptions import StateCorrupt
from labkit.host import NETNS_DIR, Host, LocalHost
from labkit.sysctls import state_dir as default_state_dir

RUN_DIR_PREFIX = "netns-"
STATE_NAME = "state.json"
_ALPHABET = string.ascii_lowercase + string.digits
_here = LocalHost("init")


@dataclass
class FileRecord:
    """The served file: its name, size, sha256 and where it lives on the machine."""

    name: str
    size: int
    sha256: str
    path: str


@dataclass
class Server:
    """An ``in.tftpd`` the run started: the plain server of iteration 1 (on the node) or a pod's.

    Attributes:
        template: the hash of the pod template (and served file) it was started from.
        cgroup: its cgroup (its CPU budget) on the machine.
        ip: the address it serves on.
        cpu_limit: cores (None: no limit).
        pid, start: its process and the process's start time (clock ticks since boot).
        ledger_id: its ``process`` entry in the run's ledger.
    """

    template: str
    ip: str
    cpu_limit: float | None = None
    cgroup: str | None = None
    pid: int | None = None
    start: int | None = None
    ledger_id: int | None = None


@dataclass
class Pod(Server):
    """A pod replica: a :class:`Server` in a namespace of its own behind the node's bridge.

    Attributes:
        serial: its number in the run (``lk<run>-pod<serial>``; never reused).
        name: the Kubernetes-style pod name (``<deployment>-<template>-<suffix>``).
        netns: its namespace.
        veth: the node's end of its veth pair.
        sysctls: its namespaced sysctls (from the Deployment's securityContext).
        track_conntrack: whether a stateful rule makes its namespace track connections.
        link_id: its veth's entry in the ledger.
    """

    serial: int = 0
    name: str = ""
    netns: str = ""
    veth: str = ""
    sysctls: dict[str, Any] = field(default_factory=dict)
    track_conntrack: bool = False
    link_id: int | None = None


@dataclass
class RunState:
    """One netns testbed run, as ``state.json`` records it.

    ``state`` is ``building`` while up() changes it and ``up`` once it is done: a run
    left ``building`` was interrupted (``labkit clean`` removes it).
    """

    run_id: str
    state: str = "building"
    created: float = 0.0
    helper_rule: bool = True
    rules_applied: bool = False
    pods: list[Pod] = field(default_factory=list)
    server: Server | None = None
    next_serial: int = 1
    next_ip: int = 2
    globals: dict[str, int] = field(default_factory=dict)
    node_defaults: dict[str, str] = field(default_factory=dict)
    file: FileRecord | None = None
    iteration: dict[str, Any] | None = None
    last_up: dict[str, float] | None = None
    updated: float | None = None
    proxy_mode: str = "iptables"
    notrack: bool = False
    endpoints: list[str] = field(default_factory=list)
    testbed: str = "netns"

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (the keys ``state.json`` has always had)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any, path: str | Path = "state.json") -> "RunState":
        """Read a ``state.json`` document.

        Raises:
            StateCorrupt: it is not a netns testbed state document (names ``path`` and the field).
        """
        if not isinstance(doc, dict) or "state" not in doc or not isinstance(doc.get("pods", []), list):
            raise StateCorrupt(path, "not a netns testbed state document")
        try:
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in doc.items() if k in known}
            values["pods"] = [_record(Pod, p, "pods[]") for p in doc.get("pods") or []]
            values["server"] = _record(Server, doc["server"], "server") if doc.get("server") else None
            values["file"] = _record(FileRecord, doc["file"], "file") if doc.get("file") else None
            values.setdefault("run_id", "")
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise StateCorrupt(path, f"not a netns testbed state document: {exc}") from None


def _record(kind: type, doc: Any, where: str):
    if not isinstance(doc, dict):
        raise ValueError(f"{where} is not a mapping")
    known = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in doc.items() if k in known})


def parse_state(data: bytes, path: str | Path) -> RunState:
    """A run's ``state.json`` from its bytes.

    Raises:
        StateCorrupt: it is not the JSON document labkit wrote (the message names
            ``path`` and says to run ``labkit clean``).
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateCorrupt(path, f"not JSON: {exc}") from None
    return RunState.from_dict(doc, path)


def read_state(path: Path) -> dict[str, Any]:
    """A run's ``state.json`` on this machine, as the dict it holds (validated).

    Raises:
        StateCorrupt: see :func:`parse_state`.
    """
    return parse_state(Path(path).read_bytes(), path).to_dict()


def run_dirs(directory: Path | None = None, host: Host | None = None) -> list[Path]:
    """The netns testbed runs recorded in a state directory (oldest first; background flows' not)."""
    directory = Path(directory or default_state_dir())
    runs = [(mtime, name) for name, is_dir, mtime in (host or _here).entries(directory)
            if is_dir and name.startswith(RUN_DIR_PREFIX) and not name.startswith(f"{RUN_DIR_PREFIX}bg-")]
    return [directory / name for _, name in sorted(runs)]


def new_run_id(host: Host | None = None) -> str:
    """Five random lowercase letters/digits no namespace of the machine uses yet."""
    taken = [name for name, _, _ in (host or _here).entries(NETNS_DIR)]
    while True:
        rid = "".join(secrets.choice(_ALPHABET) for _ in range(5))
        if not any(n.startswith(f"lk{rid}") for n in taken):
            return rid


@contextmanager
def state_lock(directory: Path, host: Host | None = None) -> Iterator[None]:
    """Serialize up/down/clean of one state directory across processes (flock on the directory)."""
    host = host or _here
    host.makedirs(directory)
    with host.lock(directory):
        yield


def status_document(tb: Any) -> dict[str, Any]:
    """The ``labkit status --json`` document of a netns testbed ``tb`` (``state: down`` when nothing
    is up); a namespace or server that should be there and is not makes it ``broken``, named."""
    from labkit.testbed.topology import CLIENT_IP, CLUSTER_IP, NODE_IP

    if tb.state is None:
        return {"testbed": "netns", "state": "down", "state_dir": str(tb.state_dir), "hosts": []}
    s, m = tb.state, tb.machine
    it = s.iteration or {}
    hosts = [{"role": "client", "name": "client", "ip": CLIENT_IP, "netns": tb.ns("client")},
             {"role": "node", "name": "node", "ip": NODE_IP, "netns": tb.ns("node")}]
    problems = [f"namespace {h['netns']} is missing" for h in hosts if m.netns_inode(h["netns"]) is None]
    if s.server:
        hosts[1]["server_pid"] = s.server.pid
        if m.proc_start_time(s.server.pid) != s.server.start:
            problems.append("the plain server is not running")
    for i, p in enumerate(tb.pods(), 1):
        hosts.append({"role": "pod", "name": f"pod-{i}", "pod": p.name, "ip": p.ip, "netns": p.netns,
                      "pid": p.pid, "cgroup": p.cgroup, "cpu_limit": p.cpu_limit, "sysctls": p.sysctls})
        if not p.pid or m.proc_start_time(p.pid) != p.start:
            problems.append(f"pod-{i}: in.tftpd is not running")
    svc = tb.manifests.service_port()
    f = s.file
    return {
        "testbed": "netns", "state": s.state if not problems else "broken", "problems": problems,
        "run_id": s.run_id, "state_dir": str(tb.state_dir), "machine": m.name,
        "iteration": it.get("number"), "profile": it.get("profile"), "setup": it.get("setup"),
        "service": {"node_ip": NODE_IP, "node_port": 69 if s.server else svc.node_port, "protocol": "udp",
                    "name": f"{svc.namespace}/{svc.name}", "cluster_ip": CLUSTER_IP},
        "file": {"name": f and f.name, "size": f and f.size, "sha256": f and f.sha256},
        "hosts": hosts, "replicas": len(s.pods), "cpu_limit": it.get("cpu_limit"),
        "helper_rule": s.helper_rule, "pods_track_conntrack": it.get("pods_track_conntrack"),
        "node_sysctls": it.get("node_sysctls", {}), "pod_sysctls": it.get("pod_sysctls", {}),
        "allowed_unsafe_sysctls": it.get("allowed_unsafe_sysctls", []),
        "endpoints": s.endpoints, "updated": s.updated, "last_up": s.last_up,
    }
