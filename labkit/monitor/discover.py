"""Which network namespaces the exporter samples, and what it calls them.

A *source* is a function that returns the namespaces to sample right now, as
``{inode: Found}``; the exporter calls it again every few seconds and starts or
stops samplers for what came or went.  Three sources:

- :func:`all_netns`: every namespace of a plain Linux node: the one labkit runs
  in (``init``), the named ones under ``/run/netns`` (``ip netns add``, CNI
  plugins), and those of running processes (``/proc/PID/ns/net``), deduplicated
  by inode.  A namespace that belongs to a Kubernetes pod is called
  ``namespace/name``, as the container runtime's own records say (containerd,
  CRI-O, Docker with cri-dockerd: :func:`runtime_pods`); a named one by its
  name; any other ``netns:<inode>``, the number the kernel's ``table full in
  netns N`` lines print.
- :func:`testbed_source`: the running lab testbed's ``init``, ``node`` and ``pod-N``.
- :func:`static_source`: namespaces given by name (``--netns ROLE=NAME``).

Everything here reads files only (no process is started) and takes its roots
as arguments, so the unit tests run it on a fake ``/proc`` and runtime tree.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from labkit.exceptions import MonitorError

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
PROC = "/proc"
#: Where container runtimes keep each container's or sandbox's record, by runtime.
CONTAINERD_TASKS = "/run/containerd/io.containerd.runtime.v2.task"
CRIO_CONTAINERS = "/run/containers/storage/overlay-containers"
DOCKER_CONTAINERS = "/var/lib/docker/containers"
RUNTIME_ROOTS = (CONTAINERD_TASKS, CRIO_CONTAINERS, DOCKER_CONTAINERS)

_NET_LINK = re.compile(r"^net:\[(\d+)\]$")


@dataclass(frozen=True)
class Found:
    """A namespace to sample.

    Attributes:
        inode: its inode (what the kernel log names it by; the key for deduplication).
        label: the ``netns`` label of its metrics.
        path: a file to join it by (``/run/netns/NAME``, ``/proc/PID/ns/net``), or
            None for the namespace the exporter runs in.
        source: how it was found: ``init``, ``testbed``, ``named``, ``pod`` or ``process``.
    """

    inode: int
    label: str
    path: str | None
    source: str


Source = Callable[[], "dict[int, Found]"]


def own_inode() -> int:
    """The inode of the network namespace this process runs in."""
    return os.stat("/proc/self/ns/net").st_ino


def named_netns(netns_dir: str = NETNS_DIR) -> dict[int, tuple[str, str]]:
    """The named namespaces: ``{inode: (name, path)}`` (the first name of an inode wins).

    A missing directory means none.  A name whose file vanished while listing is skipped.
    """
    try:
        names = sorted(os.listdir(netns_dir))
    except FileNotFoundError:
        return {}
    out: dict[int, tuple[str, str]] = {}
    for name in names:
        path = os.path.join(netns_dir, name)
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            continue
        out.setdefault(inode, (name, path))
    return out


def process_netns(proc: str = PROC) -> dict[int, tuple[int, str]]:
    """The namespaces of running processes: ``{inode: (lowest pid, /proc/PID/ns/net)}``.

    Reads the ``net:[INODE]`` link of each process (no ``stat`` of the namespace);
    processes that exit while listing, and kernel threads' unreadable links, are skipped.
    """
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        path = f"{proc}/{entry}/ns/net"
        try:
            match = _NET_LINK.match(os.readlink(path))
        except OSError:
            continue
        if match:
            inode, pid = int(match.group(1)), int(entry)
            if inode not in out or pid < out[inode][0]:
                out[inode] = (pid, path)
    return out


def _pod_of(record: Mapping) -> tuple[str, str] | None:
    """``(pod namespace, pod name)`` from an OCI config's annotations or Docker's labels."""
    notes = record.get("annotations") or (record.get("Config") or {}).get("Labels") or {}
    for ns_key, name_key in (("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.cri.sandbox-name"),
                             ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name")):
        if notes.get(ns_key) and notes.get(name_key):
            return str(notes[ns_key]), str(notes[name_key])
    return None


def _netns_part(record: Mapping) -> dict:
    """What :func:`_netns_inode_of` needs of a runtime record (kept instead of the whole record)."""
    if "Config" in record:
        return {"Config": {}, "HostConfig": {"NetworkMode": (record.get("HostConfig") or {}).get("NetworkMode")},
                "State": {"Pid": (record.get("State") or {}).get("Pid")}}
    return {"linux": {"namespaces": [s for s in ((record.get("linux") or {}).get("namespaces") or [])
                                     if s.get("type") == "network"]}}


def _netns_inode_of(record: Mapping, folder: str, proc: str) -> int | None:
    """The network namespace a runtime record's container runs in, or None (host network, gone)."""
    if "Config" in record:   # Docker: config.v2.json
        if (record.get("HostConfig") or {}).get("NetworkMode") == "host":
            return None
        pid = (record.get("State") or {}).get("Pid") or 0
        paths = [f"{proc}/{pid}/ns/net"] if pid else []
    else:                     # an OCI bundle (containerd, CRI-O)
        spaces = ((record.get("linux") or {}).get("namespaces")) or []
        net = next((s for s in spaces if s.get("type") == "network"), None)
        if net is None:
            return None       # no network namespace of its own: host network
        paths = [net["path"]] if net.get("path") else []
        for pidfile in ("init.pid", "pidfile"):
            try:
                with open(os.path.join(folder, pidfile)) as f:
                    paths.append(f"{proc}/{int(f.read().strip())}/ns/net")
            except (OSError, ValueError):
                continue
    for path in paths:
        inode = netns_file_inode(path)
        if inode is not None:
            return inode
    return None


def netns_file_inode(path: str) -> int | None:
    """The inode of the namespace a file stands for, or None when it is gone.

    ``/proc/PID/ns/net`` is read as its link text (``net:[INODE]``); other files
    (``/run/netns/NAME``, bind mounts) are ``stat``-ed.
    """
    try:
        match = _NET_LINK.match(os.readlink(path))
        if match:
            return int(match.group(1))
    except OSError:
        pass          # not a link: a bind mount or a plain file
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class RuntimePods:
    """Pod names of namespaces, from the container runtimes' records on this node.

    Each record (containerd's and CRI-O's OCI ``config.json``, Docker's
    ``config.v2.json``) is parsed once and remembered by its modification time,
    so calling this every few seconds costs a directory listing per runtime.

    Args:
        roots: the runtimes' record folders (missing ones are skipped).
        proc: the proc file system (for pid files).
    """

    def __init__(self, roots: Iterable[str] = RUNTIME_ROOTS, proc: str = PROC):
        self.roots = tuple(roots)
        self.proc = proc
        self._cache: dict[str, tuple[int, tuple[str, str] | None, dict]] = {}
        self._malformed: set[str] = set()

    def _records(self) -> list[tuple[str, str]]:
        found = []
        for root in self.roots:
            if not os.path.isdir(root):
                continue
            if root.rstrip("/").endswith(".task"):      # containerd: <root>/<namespace>/<id>/
                folders = [os.path.join(root, ns, cid) for ns in _listdir(root)
                           for cid in _listdir(os.path.join(root, ns))]
                names = ("config.json",)
            else:
                folders = [os.path.join(root, cid) for cid in _listdir(root)]
                names = ("config.v2.json", os.path.join("userdata", "config.json"))
            for folder in folders:
                for name in names:
                    path = os.path.join(folder, name)
                    if os.path.isfile(path):
                        found.append((path, os.path.dirname(path)))
        return found

    def __call__(self) -> dict[int, str]:
        """``{netns inode: "namespace/name"}`` of the pods whose containers run now."""
        out: dict[int, str] = {}
        seen = set()
        for path, folder in self._records():
            seen.add(path)
            try:
                mtime = os.stat(path).st_mtime_ns
                cached = self._cache.get(path)
                if cached is None or cached[0] != mtime:
                    with open(path) as f:
                        record = json.load(f)
                    cached = (mtime, _pod_of(record), _netns_part(record))
                    self._cache[path] = cached
            except OSError:
                continue      # the container went away while listing
            except ValueError as exc:
                if path not in self._malformed:   # its namespace keeps its other name
                    log.warning("container runtime record %s is not JSON (%s): its pod is not named", path, exc)
                    self._malformed.add(path)
                continue
            _, pod, part = cached
            if pod is None:
                continue
            inode = _netns_inode_of(part, folder, self.proc)  # pid files change: read each time
            if inode is not None:
                out.setdefault(inode, f"{pod[0]}/{pod[1]}")
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return out


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def all_netns(netns_dir: str = NETNS_DIR, proc: str = PROC,
              pods: Callable[[], Mapping[int, str]] | None = None,
              own: int | None = None) -> Source:
    """The source of ``--all-netns``: every network namespace of this node, named.

    Args:
        netns_dir: the named namespaces' folder.
        proc: the proc file system.
        pods: ``{inode: "namespace/name"}`` of pods (default: :class:`RuntimePods`).
        own: the exporter's own namespace inode (default: this process's).

    Returns:
        A function giving ``{inode: Found}`` each time it is called.
    """
    pods = pods if pods is not None else RuntimePods(proc=proc)
    own = own if own is not None else own_inode()

    def discover() -> dict[int, Found]:
        named = named_netns(netns_dir)
        procs = process_netns(proc)
        pod_names = pods()
        found = {own: Found(own, "init", None, "init")}
        for inode in sorted(set(named) | set(procs)):
            if inode == own:
                continue
            path = named[inode][1] if inode in named else procs[inode][1]
            if inode in pod_names:
                found[inode] = Found(inode, pod_names[inode], path, "pod")
            elif inode in named:
                found[inode] = Found(inode, named[inode][0], path, "named")
            else:
                found[inode] = Found(inode, f"netns:{inode}", path, "process")
        return _unique_labels(found)

    return discover


def _unique_labels(found: dict[int, Found]) -> dict[int, Found]:
    """Give a label that two namespaces share (a pod's old and new sandbox) an ``@inode`` suffix."""
    counts: dict[str, int] = {}
    for f in found.values():
        counts[f.label] = counts.get(f.label, 0) + 1
    return {i: f if counts[f.label] == 1 else Found(i, f"{f.label}@{i}", f.path, f.source)
            for i, f in found.items()}


def static_source(targets: Mapping[str, str | None]) -> Source:
    """Namespaces given by name: ``{label: netns name, or None for the own namespace}``.

    One that does not exist (yet, or any more) is left out until it does.

    Raises:
        MonitorError: no targets.
    """
    if not targets:
        raise MonitorError("nothing to monitor: no namespaces given")
    own = own_inode()

    def discover() -> dict[int, Found]:
        found: dict[int, Found] = {}
        for label, name in targets.items():
            if name is None:
                found.setdefault(own, Found(own, label, None, "init"))
                continue
            path = os.path.join(NETNS_DIR, name)
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                continue
            found.setdefault(inode, Found(inode, label, None if inode == own else path, "named"))
        return found

    return discover


def testbed_source(name: str = "netns") -> Source:
    """The running lab testbed's namespaces by role (``init``, ``node``, ``pod-N``), or ``init`` alone.

    Follows the testbed as it comes, goes and changes (replicas); its state file
    is re-read only when it changed.

    Raises:
        MonitorError: the testbed's namespaces are not on this machine (a cluster
            testbed: run the exporter on its node, with ``--all-netns``).
    """
    from labkit.host import LocalHost, NetnsHost
    from labkit.sysctls import state_dir
    from labkit.testbed import get_testbed

    own = own_inode()
    memo: dict[str, object] = {"key": None, "targets": {}}

    def state_key() -> tuple:
        # the testbed's state files, by inode and mtime: it is re-read only when they change
        # (not its logs: in.tftpd writes to them while it serves)
        stamps = []
        for root, _, files in os.walk(str(state_dir())):
            for f in (f for f in files if f.endswith(".json")):
                try:
                    st = os.stat(os.path.join(root, f))
                except FileNotFoundError:
                    continue
                stamps.append((root, f, st.st_ino, st.st_mtime_ns))
        return tuple(sorted(stamps))

    def discover() -> dict[int, Found]:
        key = state_key()
        if key != memo["key"]:
            testbed = get_testbed(name)
            memo["targets"] = dict(testbed.monitor_targets()) if testbed.is_up else {}
            memo["key"] = key
        targets = memo["targets"]
        found = {own: Found(own, "init", None, "init")}
        for role, host in targets.items():
            if isinstance(host, LocalHost):
                found[own] = Found(own, role, None, "init")
            elif isinstance(host, NetnsHost):
                path = os.path.join(NETNS_DIR, host.netns)
                try:
                    inode = os.stat(path).st_ino
                except FileNotFoundError:
                    continue
                found[inode] = Found(inode, role, path, "testbed")
            else:
                raise MonitorError(
                    f"the {name} testbed's {role} is not on this machine: run `labkit monitor "
                    "--serve PORT --all-netns` on its node instead")
        return found

    return discover
