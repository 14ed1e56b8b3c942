"""The Monitor: conntrack figures and kernel drop logs of many namespaces, as tidy tables.

    with Monitor(testbed.monitor_targets(), netns_roles=testbed.netns_roles()) as mon:
        run_load(...)
    mon.samples   # time, host, netns, metric, value
    mon.events    # time, host, netns, kind, message
    mon.write(out_dir)   # samples.csv, events.csv (atomic)

Local targets (:class:`~labkit.host.LocalHost`, :class:`~labkit.host.NetnsHost`)
are sampled in this process, one thread per namespace; remote ones (an SSH
host, or a namespace of one) through one streaming agent per machine
(:mod:`labkit.monitor.agent`).  The kernel log is followed once per machine.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from labkit.exceptions import MonitorError
from labkit.host import NETNS_DIR, Host, LocalHost, NetnsHost
from labkit.monitor.agent import AgentSession, remote_target
from labkit.monitor.parse import EXPECT_TABLE_FULL, TABLE_FULL, KernelEvent
from labkit.monitor.sampler import (
    KmsgFollower, NetnsSampler, NetnsTarget, Tick, event_role,
)
from labkit.util import atomic_write

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["time", "host", "netns", "metric", "value"]
EVENT_COLUMNS = ["time", "host", "netns", "kind", "message"]


def local_target(role: str, host: Host) -> NetnsTarget | None:
    """The in-process sampling target for a local host, or None for a remote one."""
    if isinstance(host, NetnsHost):
        return NetnsTarget(role, os.path.join(NETNS_DIR, host.netns))
    if isinstance(host, LocalHost):
        return NetnsTarget(role, None)
    return None


class _Machine:
    """What the monitor records for one machine: ticks, kernel events, and who is who."""

    def __init__(self, name: str):
        self.name = name
        self.ticks: list[Tick] = []
        self.events: list[tuple[float, KernelEvent]] = []
        self.roles: dict[int, str] = {}
        self.own_inode: int | None = None


class Monitor:
    """Sample conntrack in several namespaces and follow the kernel log.

    Args:
        targets: ``{role: Host}``, e.g. ``testbed.monitor_targets()``; roles are
            what the ``netns`` column says (``init``, ``node``, ``pod-1``, ``client``).
        hz: samples per second and namespace.
        kmsg: follow the kernel log (``/dev/kmsg``) for drop lines.
        netns_roles: extra ``{netns inode: role}`` for attributing log lines
            (``testbed.netns_roles()``); the targets' own inodes are added.
        host_name: the ``host`` column for local targets.
        keep_foreign: keep log lines naming a namespace none of the roles is
            (other labs on the machine); they get ``netns:<inode>``.
        agent: sample local targets through the agent process too (as a remote
            node would); mainly for testing the agent path.

    Raises:
        MonitorError: no targets, or ``hz`` not positive.
    """

    def __init__(self, targets: Mapping[str, Host], *, hz: float = 10.0, kmsg: bool = True,
                 netns_roles: Mapping[int, str] | None = None, host_name: str = "local",
                 keep_foreign: bool = False, agent: bool = False):
        if not targets:
            raise MonitorError("nothing to monitor: no targets given")
        if not hz or hz <= 0 or hz > 1000:
            raise MonitorError(f"hz must be in (0, 1000] samples per second, got {hz!r}")
        self.targets = dict(targets)
        self.hz = float(hz)
        self.kmsg = kmsg
        self.extra_roles = dict(netns_roles or {})
        self.host_name = host_name
        self.keep_foreign = keep_foreign
        self.agent = agent
        self._stop = threading.Event()
        self._threads: list[Any] = []
        self._sessions: list[AgentSession] = []
        self._machines: dict[str, _Machine] = {}
        self.started: float | None = None
        self.stopped: float | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Monitor":
        """Start sampling; return once every namespace was joined and the log is followed.

        Raises:
            MonitorError: already started, a namespace cannot be joined, the kernel
                log cannot be read, or an agent did not start (all is stopped again).
        """
        if self.started is not None:
            raise MonitorError("this Monitor was already started; make a new one")
        self.started = time.time()
        local, remote = self._split()
        try:
            if local:
                self._start_local(local)
            for transport, targets in remote.values():
                self._start_agent(transport, targets)
        except BaseException:
            self._halt()
            raise
        return self

    def _split(self) -> tuple[list[NetnsTarget], dict[Any, tuple[Any, list[NetnsTarget]]]]:
        local: list[NetnsTarget] = []
        remote: dict[Any, tuple[Any, list[NetnsTarget]]] = {}
        for role, host in self.targets.items():
            target = None if self.agent else local_target(role, host)
            if target is not None:
                local.append(target)
                continue
            if self.agent and isinstance(host, (LocalHost, NetnsHost)):
                transport, target = LocalHost(self.host_name), local_target(role, host)
                key = 0
            else:
                transport, target = remote_target(role, host)
                key = getattr(transport, "name", None) or id(transport)   # one agent per machine
            remote.setdefault(key, (transport, []))[1].append(target)
        return local, remote

    def _start_local(self, targets: list[NetnsTarget]) -> None:
        machine = self._machines.setdefault(self.host_name, _Machine(self.host_name))
        machine.own_inode = os.stat("/proc/self/ns/net").st_ino
        machine.roles = {**self.extra_roles, **{t.inode(): t.role for t in targets}}
        if self.kmsg:
            follower = KmsgFollower(lambda wall, ev: machine.events.append((wall, ev)), self._stop)
            follower.start()
            self._threads.append(follower)
        for target in targets:
            sampler = NetnsSampler(target, self.hz, machine.ticks.append, self._stop)
            sampler.start()
            self._threads.append(sampler)
        for thread in self._threads:
            thread.ready.wait(10)
            if thread.error is not None:
                raise MonitorError(f"cannot monitor: {thread.error}")

    def _start_agent(self, transport: Any, targets: list[NetnsTarget]) -> None:
        name = getattr(transport, "name", "remote")
        machine = self._machines.setdefault(name, _Machine(name))

        def on_hello(obj: dict) -> None:
            machine.own_inode = obj.get("own_inode")
            machine.roles = {**self.extra_roles, **{int(v): k for k, v in obj["netns"].items()}}

        def on_tick(obj: dict) -> None:
            machine.ticks.append((obj["t"], obj["role"], obj["values"]))

        def on_event(obj: dict) -> None:
            machine.events.append((obj["t"], KernelEvent(
                obj["kind"], obj["message"], obj.get("inode"), obj.get("suppressed"),
                seq=obj.get("seq"), usec=obj.get("usec"))))

        session = AgentSession(transport, targets, hz=self.hz, kmsg=self.kmsg, on_hello=on_hello,
                               on_tick=on_tick, on_event=on_event)
        session.start()
        self._sessions.append(session)

    def stop(self) -> "Monitor":
        """Stop sampling (one last sample each) and collect what is pending.

        Raises:
            MonitorError: a sampler, the log follower or an agent failed while running.
        """
        if self.started is None or self.stopped is not None:
            return self
        errors = self._halt()
        if errors:
            raise MonitorError("monitoring failed: " + "; ".join(str(e) for e in errors))
        return self

    def _halt(self) -> list[BaseException]:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for session in self._sessions:
            session.stop()
        self.stopped = time.time()
        errors = [t.error for t in self._threads if t.error is not None]
        errors += [s.error for s in self._sessions if s.error is not None]
        return errors

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.stop()
        else:
            self._halt()

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self.started is not None and self.stopped is None

    @property
    def lost_kernel_records(self) -> int:
        """Kernel log records missed by the local follower (overwritten before read)."""
        return sum(getattr(t, "lost", 0) for t in self._threads if isinstance(t, KmsgFollower)) + \
            sum((s.end or {}).get("lost", 0) for s in self._sessions)

    def latest(self) -> dict[tuple[str, str], tuple[float, dict[str, int]]]:
        """The newest sample of each namespace: ``{(host, role): (time, {metric: value})}``."""
        out: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        for machine in list(self._machines.values()):
            for t, role, values in reversed(machine.ticks[-4 * len(self.targets) - 4:]):
                out.setdefault((machine.name, role), (t, values))
        return out

    def new_events(self, since: int = 0) -> list[tuple[str, float, KernelEvent]]:
        """Kernel events recorded after the first ``since`` ones (all machines, arrival order)."""
        events = [(m.name, wall, ev) for m in list(self._machines.values()) for wall, ev in list(m.events)]
        return events[since:]

    # -- tables ------------------------------------------------------------------------

    @property
    def samples(self) -> pd.DataFrame:
        """Long table ``time, host, netns, metric, value`` (time: UTC timestamps), by time.

        Built afresh on each access (also while running): keep the frame you use.
        """
        rows = []
        for machine in list(self._machines.values()):
            for t, role, values in list(machine.ticks):
                rows.extend((t, machine.name, role, metric, value) for metric, value in values.items())
        frame = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
        frame["value"] = frame["value"].astype("int64")
        return frame.sort_values(["time", "host", "netns"], kind="stable").reset_index(drop=True)

    @property
    def events(self) -> pd.DataFrame:
        """Long table ``time, host, netns, kind, message`` of the kernel's conntrack lines.

        ``netns`` is the role the line belongs to: named in the line (``table full
        in netns N``); for a table-full line that names none (kernel 6.1 names
        none at all), the one namespace whose table was full then if exactly one
        was, else the initial namespace; and for ``expectation table full`` (which names none) the one
        namespace whose expectation count was at its max then, if exactly one
        was; else empty.  ``suppressed`` lines (the machine-wide rate limiter)
        have an empty ``netns``.
        """
        rows = []
        at_max = table_full = None
        for machine in list(self._machines.values()):
            for wall, event in list(machine.events):
                role = event_role(event, machine.roles, machine.own_inode)
                if role is None:
                    if not self.keep_foreign:
                        continue
                    role = f"netns:{event.netns_inode}"
                if event.kind == EXPECT_TABLE_FULL:
                    if at_max is None:
                        at_max = self._full_windows("expect_count", "nf_conntrack_expect_max")
                    role = _role_at_max(at_max, machine.name, wall)
                elif event.kind == TABLE_FULL and event.netns_inode is None:
                    # kernel 6.1 names no namespace in any table-full line
                    if table_full is None:
                        table_full = self._full_windows("nf_conntrack_count", "nf_conntrack_max")
                    role = _role_at_max(table_full, machine.name, wall) or role
                rows.append((wall, machine.name, role, event.kind, event.message))
        frame = pd.DataFrame(rows, columns=EVENT_COLUMNS)
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
        return frame.sort_values("time", kind="stable").reset_index(drop=True)

    def _full_windows(self, count: str, limit: str) -> dict[str, list[tuple[float, str]]]:
        """Per machine, the (time, role) of ticks whose ``count`` was at its ``limit``."""
        out: dict[str, list[tuple[float, str]]] = {}
        for machine in self._machines.values():
            out[machine.name] = [
                (t, role) for t, role, v in list(machine.ticks)
                if v.get(limit) and v.get(count, 0) >= v[limit]
            ]
        return out

    def write(self, directory: str | os.PathLike, *, compress: bool = False) -> dict[str, Path]:
        """Write ``samples.csv`` and ``events.csv`` into ``directory``, atomically.

        Args:
            directory: created if missing.
            compress: write ``samples.csv.gz`` / ``events.csv.gz`` instead (about
                a tenth of the size; pandas reads them as they are).

        Returns:
            ``{"samples": path, "events": path}``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, frame in (("samples", self.samples), ("events", self.events)):
            path = directory / (f"{name}.csv.gz" if compress else f"{name}.csv")
            text = frame.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ").encode()
            # mtime=0: the same rows give the same bytes
            atomic_write(path, gzip.compress(text, mtime=0) if compress else text)
            paths[name] = path
        return paths


def _role_at_max(windows: dict[str, list[tuple[float, str]]], host: str, wall: float,
                 slack: float = 1.0) -> str:
    """The one role whose count was at its max within ``slack`` s of ``wall`` ("" if none or several)."""
    roles = {role for t, role in windows.get(host, ()) if abs(t - wall) <= slack}
    return roles.pop() if len(roles) == 1 else ""


def read_samples(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``samples.csv`` (or ``.csv.gz``) back, with ``time`` as UTC timestamps."""
    frame = pd.read_csv(path)
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    return frame


def read_events(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ``events.csv`` (or ``.csv.gz``) back, with ``time`` as UTC timestamps."""
    frame = pd.read_csv(path, keep_default_na=False, dtype={"netns": str, "message": str})
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    return frame
