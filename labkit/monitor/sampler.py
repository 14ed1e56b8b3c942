"""Samplers that read conntrack figures in a namespace, and a ``/dev/kmsg`` follower.

No process per sample: each namespace gets one long-lived thread that joins the
namespace once (``setns`` acts on the calling thread only), opens its files
once, and re-reads them with ``pread`` at the sampling rate.  Files are opened
through ``/proc/thread-self/net`` because ``/proc/self/net`` follows the thread
group leader's namespace, not the sampling thread's.

This module uses the standard library only: the remote agent ships it to nodes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from labkit.exceptions import MonitorError
from labkit.monitor.parse import (
    TABLE_FULL, KernelEvent, classify_kernel_message, expect_count, parse_conntrack_stats,
    parse_slabinfo, split_kmsg_record,
)

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
#: The initial network namespace's inode on current kernels (PROC_NET_INIT_INO).
INIT_NET_INODE = 0xEFFFFFF9
NETFILTER = "/proc/sys/net/netfilter/"
STAT_PATH = "/proc/thread-self/net/stat/nf_conntrack"
KMSG_PATH = "/dev/kmsg"
SLABINFO_PATH = "/proc/slabinfo"  # global: read by the machine's own namespace's sampler only
SLAB_ROLE = "init"
SLAB_PERIOD_S = 1.0

#: metric name -> file read in the namespace (sysctls and the count).
SYSCTL_METRICS = {
    "nf_conntrack_count": NETFILTER + "nf_conntrack_count",
    "nf_conntrack_max": NETFILTER + "nf_conntrack_max",
    "nf_conntrack_expect_max": NETFILTER + "nf_conntrack_expect_max",
    "udp_timeout": NETFILTER + "nf_conntrack_udp_timeout",
    "udp_timeout_stream": NETFILTER + "nf_conntrack_udp_timeout_stream",
}

_libc = ctypes.CDLL(None, use_errno=True)

#: One tick of one namespace: (wall-clock time, role, {metric: value}).
Tick = Tuple[float, str, Dict[str, int]]  # typing forms: nodes may run Python 3.8


@dataclass(frozen=True)
class NetnsTarget:
    """A namespace to sample.

    Attributes:
        role: the name it goes by in the tables (``node``, ``pod-1``, ``init``).
        path: its namespace file (``/run/netns/NAME``, ``/proc/PID/ns/net``), or
            None for the namespace the process runs in.
    """

    role: str
    path: str | None = None

    def inode(self) -> int:
        """The namespace's inode, the number the kernel log names it by.

        Raises:
            MonitorError: the namespace file does not exist or cannot be read.
        """
        path = self.path or "/proc/thread-self/ns/net"
        try:
            return os.stat(path).st_ino
        except OSError as exc:
            raise MonitorError(f"{self.role}: network namespace {path}: {exc.strerror}") from None


def join_netns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``.

    Raises:
        MonitorError: the file cannot be opened or the kernel refused ``setns``.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise MonitorError(f"network namespace {path}: {exc.strerror}") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise MonitorError(f"cannot join network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def pread_all(fd: int) -> bytes:
    """Read a whole /proc file from offset 0 (the kernel regenerates it)."""
    chunks = []
    offset = 0
    while True:
        data = os.pread(fd, 65536, offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
        if len(data) < 65536:
            break
    return b"".join(chunks)


def read_seq(fd: int) -> bytes:
    """Read a whole seq_file (``/proc/slabinfo``): it hands out a page per read, so read to the end."""
    chunks = []
    offset = 0
    while True:
        data = os.pread(fd, 65536, offset)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        offset += len(data)


def slab_metrics(text: str) -> Dict[str, int]:
    """``slab_conntrack_objects`` and ``slab_conntrack_bytes`` (in use) from ``/proc/slabinfo`` text.

    Only the header and the ``nf_conntrack`` line are parsed (the whole file takes 1 ms).
    """
    start = text.find("\nnf_conntrack ")
    end = text.find("\n", start + 1) if start >= 0 else -1
    head = text[:text.find("\n") + 1] if "\n" in text else text
    line = text[start + 1:end if end >= 0 else None] if start >= 0 else ""
    cache = parse_slabinfo(head + line, source=SLABINFO_PATH).get("nf_conntrack")
    if cache is None:
        return {}
    return {"slab_conntrack_objects": cache.active_objs, "slab_conntrack_bytes": int(cache.active_bytes)}


class NetnsSampler(threading.Thread):
    """One namespace, sampled ``hz`` times a second by a thread that lives in it.

    Each tick calls ``emit((time, role, {metric: value}))`` with
    ``nf_conntrack_count``, ``expect_count``, the sysctls in force, and
    ``stat_<column>`` for each column of the stat table (summed over CPUs).

    Args:
        target: the namespace.
        hz: samples per second.
        emit: called from this thread with each tick.
        stop: set it to end the thread (after one last sample).
    """

    def __init__(self, target: NetnsTarget, hz: float, emit: Callable[[Tick], None],
                 stop: threading.Event):
        super().__init__(name=f"lk-sampler-{target.role}", daemon=True)
        if not hz > 0:
            raise MonitorError(f"sampling rate must be > 0 per second, got {hz!r}")
        self.target = target
        self.period = 1.0 / hz
        self.emit = emit
        self.stop_event = stop
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.ticks = 0
        self.late = 0
        self._fds: dict[str, int] = {}
        self._slab_at = -SLAB_PERIOD_S

    def run(self) -> None:
        try:
            if self.target.path:
                join_netns(self.target.path)
            self._open()
            self._loop()
        except BaseException as exc:  # handed to the Monitor, raised by stop()
            self.error = exc
            log.debug("sampler %s failed: %s", self.target.role, exc)
        finally:
            self.ready.set()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _open(self) -> None:
        if self.target.role == SLAB_ROLE:
            try:
                self._fds["slabinfo"] = os.open(SLABINFO_PATH, os.O_RDONLY)
            except OSError as exc:
                log.warning("%s: cannot read %s (%s); slab memory not sampled", self.target.role,
                            SLABINFO_PATH, exc.strerror)
        for metric, path in {**SYSCTL_METRICS, "stat": STAT_PATH}.items():
            try:
                self._fds[metric] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if metric in ("nf_conntrack_count", "stat"):
                    raise MonitorError(
                        f"{self.target.role}: {path} does not exist: is nf_conntrack loaded "
                        "(modprobe nf_conntrack)?") from None
                log.warning("%s: %s does not exist; %s not sampled", self.target.role, path, metric)

    def sample(self) -> dict[str, int]:
        """Read every figure once, now; return ``{metric: value}``.

        Raises:
            MonitorError: a file could not be read or parsed.
        """
        values: dict[str, int] = {}
        for metric, fd in self._fds.items():
            if metric == "slabinfo":
                now = time.monotonic()
                if now - self._slab_at >= SLAB_PERIOD_S:  # 0.3 ms a read: once a second is enough
                    self._slab_at = now
                    values.update(slab_metrics(read_seq(fd).decode()))
            elif metric == "stat":
                stats = parse_conntrack_stats(pread_all(fd).decode(), source=f"{self.target.role}: {STAT_PATH}")
                values["expect_count"] = expect_count(stats)
                for column, value in stats.items():
                    values["stat_" + column] = value
            else:
                values[metric] = int(pread_all(fd))
        return values

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            stopping = self.stop_event.is_set()
            self.emit((time.time(), self.target.role, self.sample()))
            self.ticks += 1
            self.ready.set()    # start() returns once each namespace has its first sample
            if stopping:
                return
            next_tick += self.period
            delay = next_tick - time.monotonic()
            if delay < 0:
                # behind (a busy machine): skip the missed ticks, do not burst
                self.late += 1
                missed = int(-delay / self.period) + 1
                next_tick += missed * self.period
                delay = next_tick - time.monotonic()
            self.stop_event.wait(max(0.0, delay))


class KmsgFollower(threading.Thread):
    """Follow ``/dev/kmsg`` from now on; hand each conntrack line to ``on_event``.

    The file is opened and positioned at its end in the constructor, so every
    line logged after the constructor returns is seen.  Each reader of
    ``/dev/kmsg`` has its own position; when the ring buffer overwrote records
    before they were read the kernel says so (``EPIPE``) and :attr:`lost`
    counts them, as do gaps in the sequence numbers.

    Args:
        on_event: called from this thread with ``(wall_time, event)``.
        stop: set it to end the thread; it reads what is pending first.
        path: the kernel log device.

    Raises:
        MonitorError: the device cannot be opened (not root?).
    """

    def __init__(self, on_event: Callable[[float, KernelEvent], None], stop: threading.Event,
                 path: str = KMSG_PATH):
        super().__init__(name="lk-kmsg", daemon=True)
        self.on_event = on_event
        self.stop_event = stop
        self.error: BaseException | None = None
        self.records = 0
        self.lost = 0
        self._last_seq: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            raise MonitorError(f"cannot follow the kernel log {path}: {exc.strerror} "
                               "(reading it needs root)") from None
        self.ready = threading.Event()
        self.ready.set()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            while not self.stop_event.is_set():
                if poller.poll(100):
                    self._drain()
            self._drain()
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(self._fd)

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 8192)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    # records overwritten before we read them; the next read resumes
                    log.warning("/dev/kmsg: records were overwritten before they were read")
                    self.lost += 1
                    continue
                raise
            if not data:
                return
            self._handle(data.decode("utf-8", "replace"))

    def _handle(self, line: str) -> None:
        record = split_kmsg_record(line)
        self.records += 1
        if self._last_seq is not None and record.seq > self._last_seq + 1:
            self.lost += record.seq - self._last_seq - 1
        self._last_seq = record.seq
        event = classify_kernel_message(record.message)
        if event is None:
            return
        wall = record.usec / 1e6 + (time.time() - time.monotonic())
        self.on_event(wall, KernelEvent(event.kind, event.message, event.netns_inode,
                                        event.suppressed, seq=record.seq, usec=record.usec))


def event_role(event: KernelEvent, roles: dict[int, str], own_inode: int | None) -> str | None:
    """The role a kernel event belongs to, or None when it names a foreign namespace.

    A ``table full in netns N`` line belongs to the role of inode N.  A table-full
    line that names no namespace comes from the initial namespace (current
    kernels print the netns for every other one).  ``expectation table full``
    and the rate limiter's ``suppressed`` lines name no namespace: they get ``""``
    here (the monitor may attribute expectation lines from the samples).

    Args:
        event: the event.
        roles: ``{netns inode: role}``.
        own_inode: the initial namespace's inode on that host, when known.
    """
    if event.kind != TABLE_FULL:
        return ""
    if event.netns_inode is not None:
        return roles.get(event.netns_inode)
    for inode in (own_inode, INIT_NET_INODE):
        if inode is not None and inode in roles:
            return roles[inode]
    return "init"
