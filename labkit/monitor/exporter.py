"""The monitor as a Prometheus exporter: per-namespace conntrack metrics, node_exporter's names.

:class:`ConntrackExporter` keeps one :class:`~labkit.monitor.sampler.NetnsSampler`
thread per namespace (the same sampler as the monitor's: it joins the namespace
once and re-reads its files with ``pread``, no process per sample) and only the
newest sample of each, so it can run for months.  It asks its *source*
(:mod:`labkit.monitor.discover`) every ``rescan`` seconds which namespaces
exist and starts or stops samplers for what came or went.  The kernel's
``table full`` / ``expectation table full`` lines from ``/dev/kmsg``
(:class:`~labkit.monitor.sampler.KmsgFollower`) are counted by namespace.

:class:`ConntrackCollector` is the ``prometheus_client`` collector that turns
the newest samples into metric families at each scrape; :func:`serve` puts it
behind an HTTP endpoint.  Metric names (``node_nf_conntrack_entries``,
``node_nf_conntrack_stat_drop``, ...) are node_exporter's, with a ``netns``
label; node_exporter exposes its stat counters as gauges, and so does this, so
that its dashboards and rules work unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from labkit.exceptions import MonitorError
from labkit.monitor.discover import Found, Source, own_inode
from labkit.monitor.parse import EXPECT_TABLE_FULL, SUPPRESSED, TABLE_FULL, KernelEvent
from labkit.monitor.sampler import INIT_NET_INODE, KmsgFollower, NetnsSampler, NetnsTarget

log = logging.getLogger(__name__)

DEFAULT_HZ = 1.0
DEFAULT_RESCAN_S = 5.0

#: stat column -> what it counts (node_exporter describes the first eight the same way).
STAT_HELP = {
    "entries": "Entries in the table (the kernel prints the count on every CPU row; not summed).",
    "searched": "Table lookups (always 0 on current kernels).",
    "found": "Lookups that found an entry.",
    "new": "Entries added unconfirmed (always 0 on current kernels).",
    "invalid": "Packets that could not be tracked.",
    "ignore": "Packets already tracked (always 0 on current kernels).",
    "delete": "Entries deleted (always 0 on current kernels).",
    "delete_list": "Entries removed from the unconfirmed list (always 0 on current kernels).",
    "insert": "Entries inserted into the table.",
    "insert_failed": "Insertions that failed (the same entry already present: a race between CPUs).",
    "drop": "Packets dropped because no entry could be made (table full, or a helper dropped it).",
    "early_drop": "Entries evicted to make room for new ones while the table was full.",
    "icmp_error": "Packets that were ICMP errors about an untracked flow.",
    "expect_new": "Expectations added after the master entry was confirmed.",
    "expect_create": "Expectations created.",
    "expect_delete": "Expectations removed (used, timed out, or gone with their master).",
    "search_restart": "Table lookups restarted because the hash table was resized.",
    "clashres": "Insertion clashes resolved (UDP races, since Linux 5.x).",
    "chainlength": "Insertions refused because a hash chain was too long (since Linux 5.15).",
}


@dataclass
class _Watch:
    """One namespace being sampled: its sampler, newest sample and kernel-line counters."""

    found: Found
    sampler: NetnsSampler
    stop: threading.Event
    latest: tuple[float, dict[str, int]] | None = None
    at_expect_max: float | None = None   # last sample time with expectations at the max
    at_table_max: float | None = None    # last sample time with the connection table full
    table_full: int = 0
    expect_full: int = 0


@dataclass(frozen=True)
class NetnsState:
    """What a scrape shows of one namespace.

    Attributes:
        found: the namespace (inode, label, how it was found).
        time: when ``values`` were read (Unix time).
        values: ``{metric: value}`` as :class:`~labkit.monitor.sampler.NetnsSampler` reads them.
        table_full, expect_full: kernel lines attributed to it since the exporter started.
    """

    found: Found
    time: float
    values: dict[str, int]
    table_full: int
    expect_full: int


@dataclass
class Snapshot:
    """Everything one scrape shows: namespaces, and kernel lines that fit none of them."""

    namespaces: list[NetnsState]
    orphan_lines: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, label) -> lines
    suppressed: int = 0
    lost_records: int = 0


class ConntrackExporter:
    """Sample conntrack in every namespace a source names, following it as it changes.

    Args:
        source: a function giving ``{inode: Found}`` (see :mod:`labkit.monitor.discover`).
        hz: samples per second and namespace.
        rescan: seconds between calls of ``source`` (namespaces that came or went).
        kmsg: count the kernel's conntrack lines (``/dev/kmsg``, needs root).
        keep_foreign: count a ``table full in netns N`` line of a namespace the
            source does not name (after asking it once more) as ``netns:N``;
            otherwise such lines (another lab's) are not counted.
        on_change: called with ``(added, removed)`` lists of :class:`Found`
            after each rescan that changed something.

    Raises:
        MonitorError: ``hz`` or ``rescan`` not positive.
    """

    def __init__(self, source: Source, *, hz: float = DEFAULT_HZ, rescan: float = DEFAULT_RESCAN_S,
                 kmsg: bool = True, keep_foreign: bool = False,
                 on_change: Callable[[list[Found], list[Found]], None] | None = None):
        if not hz or not 0 < hz <= 1000:
            raise MonitorError(f"hz must be in (0, 1000] samples per second, got {hz!r}")
        if not rescan or rescan <= 0:
            raise MonitorError(f"rescan must be a positive number of seconds, got {rescan!r}")
        self.source = source
        self.hz = float(hz)
        self.rescan_s = float(rescan)
        self.kmsg = kmsg
        self.keep_foreign = keep_foreign
        self.on_change = on_change
        self.own = own_inode()
        self.error: BaseException | None = None
        self._watch: dict[int, _Watch] = {}
        self._orphans: dict[tuple[str, str], int] = {}
        self._suppressed = 0
        self._lock = threading.Lock()
        self._rescan_lock = threading.Lock()
        self._stop = threading.Event()
        self._retired: list[NetnsSampler] = []
        self._follower: KmsgFollower | None = None
        self._rescanner: threading.Thread | None = None
        self.started = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "ConntrackExporter":
        """Find the namespaces, start their samplers, follow the kernel log.

        Returns once every namespace has its first sample.

        Raises:
            MonitorError: the source failed, a namespace could not be sampled, or
                the kernel log cannot be read (all is stopped again).
        """
        if self.started:
            raise MonitorError("this exporter was already started")
        self.started = True
        try:
            if self.kmsg:
                self._follower = KmsgFollower(self._on_event, self._stop)
                self._follower.start()
            self.rescan()
            for watch in list(self._watch.values()):
                watch.sampler.ready.wait(10)
            self.rescan()        # collects samplers that failed at once
            self.check()
        except BaseException:
            self.stop(raise_errors=False)
            raise
        self._rescanner = threading.Thread(target=self._rescan_loop, name="lk-exporter-rescan", daemon=True)
        self._rescanner.start()
        return self

    def stop(self, raise_errors: bool = True) -> None:
        """Stop every thread.

        Raises:
            MonitorError: (with ``raise_errors``) a sampler, the log follower or a
                rescan failed while running.
        """
        self._stop.set()
        with self._lock:
            watches = list(self._watch.values())
        for watch in watches:
            watch.stop.set()
        for thread in [w.sampler for w in watches] + self._retired + [self._follower, self._rescanner]:
            if thread is not None and thread.is_alive():
                thread.join(10)
        if self._follower is not None and self._follower.error is not None and self.error is None:
            self.error = self._follower.error
        if raise_errors:
            self.check()

    def check(self) -> None:
        """Raise the first error a thread met, if any.

        Raises:
            MonitorError: what failed.
        """
        if self._follower is not None and self._follower.error is not None and self.error is None:
            self.error = self._follower.error
        if self.error is not None:
            if isinstance(self.error, MonitorError):
                raise self.error
            raise MonitorError(f"the exporter failed: {self.error!r}") from self.error

    def _rescan_loop(self) -> None:
        while not self._stop.wait(self.rescan_s):
            try:
                self.rescan()
            except BaseException as exc:   # handed to the serving loop, which stops and raises it
                self.error = exc
                return

    # -- namespaces --------------------------------------------------------------------

    def rescan(self) -> tuple[list[Found], list[Found]]:
        """Ask the source now; start samplers for new namespaces, stop those of gone ones.

        A sampler that could not join its namespace because the file it was
        found by is gone (the process exited) is dropped: the next rescan finds
        the namespace again by another file, if it still exists.  Any other
        sampler failure is the exporter's :attr:`error`.

        Returns:
            ``(added, removed)``.

        Raises:
            MonitorError: the source failed, or a sampler failed as above.
        """
        with self._rescan_lock:
            found = self.source()
            added, removed = [], []
            with self._lock:
                for inode, watch in list(self._watch.items()):
                    dead = not watch.sampler.is_alive() and watch.sampler.error is not None
                    if dead:
                        self._judge_failure(watch)
                    if dead or inode not in found:
                        watch.stop.set()
                        self._retired.append(watch.sampler)
                        del self._watch[inode]
                        removed.append(watch.found)
                    elif found[inode].label != watch.found.label:
                        watch.found = found[inode]     # e.g. the runtime named the pod since
                for inode, new in found.items():
                    if inode not in self._watch and not self._stop.is_set():
                        self._watch[inode] = self._sample(new)
                        added.append(new)
                self._retired = [t for t in self._retired if t.is_alive()]
            restarted = {f.inode for f in added} & {f.inode for f in removed}  # joined by another file
            added = [f for f in added if f.inode not in restarted]
            removed = [f for f in removed if f.inode not in restarted]
        if (added or removed) and self.on_change is not None:
            self.on_change(added, removed)
        self.check()
        return added, removed

    def _sample(self, found: Found) -> _Watch:
        stop = threading.Event()
        holder: list[_Watch] = []

        def emit(tick) -> None:
            t, _, values = tick
            watch = holder[0]
            watch.latest = (t, values)
            emax = values.get("nf_conntrack_expect_max")
            if emax and values.get("expect_count", 0) >= emax:
                watch.at_expect_max = t
            cmax = values.get("nf_conntrack_max")
            if cmax and values.get("nf_conntrack_count", 0) >= cmax:
                watch.at_table_max = t

        sampler = NetnsSampler(NetnsTarget(found.label, found.path), self.hz, emit, stop)
        holder.append(_Watch(found, sampler, stop))
        sampler.start()
        return holder[0]

    def _judge_failure(self, watch: _Watch) -> None:
        """A namespace gone before it could be joined is churn; anything else is an error."""
        gone = watch.sampler.ticks == 0 and watch.found.path is not None and not os.path.exists(watch.found.path)
        if gone:
            log.debug("%s: gone before it could be sampled (%s)", watch.found.label, watch.sampler.error)
        elif self.error is None:
            self.error = MonitorError(f"netns {watch.found.label} ({watch.found.path or 'own'}): "
                                      f"{watch.sampler.error}")

    # -- kernel lines ------------------------------------------------------------------

    def _on_event(self, wall: float, event: KernelEvent) -> None:
        if event.kind == SUPPRESSED:
            with self._lock:
                self._suppressed += event.suppressed or 0
            return
        if event.kind == TABLE_FULL and self.keep_foreign and event.netns_inode is not None \
                and event.netns_inode not in self._watch:
            try:
                self.rescan()     # a namespace newer than the last rescan
            except MonitorError as exc:
                self.error = self.error or exc
        with self._lock:
            at_max = {inode: w.at_expect_max for inode, w in self._watch.items()}
            full = {inode: w.at_table_max for inode, w in self._watch.items()}
            inode = attribute_line(event, wall, at_max, self.hz, at_table_max=full)
            watch = self._watch.get(inode) if inode is not None else None
            if watch is not None:
                if event.kind == TABLE_FULL:
                    watch.table_full += 1
                else:
                    watch.expect_full += 1
                return
            if event.kind == EXPECT_TABLE_FULL:
                key = (EXPECT_TABLE_FULL, "")
            elif self.keep_foreign:
                key = (TABLE_FULL, f"netns:{inode}")
            else:
                return        # another lab's namespace, not one of ours
            self._orphans[key] = self._orphans.get(key, 0) + 1


    # -- reading -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The newest sample of each namespace and the kernel-line counts, as one consistent view."""
        with self._lock:
            states = [NetnsState(w.found, w.latest[0], w.latest[1], w.table_full, w.expect_full)
                      for w in self._watch.values() if w.latest is not None]
            orphans = dict(self._orphans)
            suppressed = self._suppressed
        lost = self._follower.lost if self._follower is not None else 0
        states.sort(key=lambda s: s.found.label)
        return Snapshot(states, orphans, suppressed, lost)

    @property
    def labels(self) -> list[str]:
        """The labels of the namespaces sampled now, sorted."""
        with self._lock:
            return sorted(w.found.label for w in self._watch.values())


def attribute_line(event: KernelEvent, wall: float, at_expect_max: dict[int, float | None],
                   hz: float, *, at_table_max: dict[int, float | None] | None = None) -> int | None:
    """The namespace (inode) a kernel conntrack line belongs to.

    ``table full in netns N`` belongs to N.  A ``table full`` line that names no
    namespace comes from the initial one on current kernels (they name every
    other), but older ones (6.1) name none at all: it goes to the one namespace
    whose table was full within two sampling periods (at least 1.5 s) of the line,
    if exactly one was, else to the initial one.  An ``expectation table full`` line
    names none: it goes to the one namespace whose expectations were at the limit
    then, if exactly one was.

    Args:
        event: a ``table_full`` or ``expect_table_full`` event.
        wall: when the kernel logged it (Unix time).
        at_expect_max: ``{inode: last sample time with expectations at the limit, or None}``.
        hz: the sampling rate.
        at_table_max: ``{inode: last sample time with the table full (count at the max), or None}``.

    Returns:
        The inode, or None for an expectation line no one namespace can be given.
    """
    slack = max(1.5, 2.0 / hz)

    def one_near(times: dict[int, float | None]) -> int | None:
        near = [inode for inode, t in times.items() if t is not None and abs(t - wall) <= slack]
        return near[0] if len(near) == 1 else None

    if event.kind == TABLE_FULL:
        if event.netns_inode is not None:
            return event.netns_inode
        full = one_near(at_table_max or {})
        return full if full is not None else INIT_NET_INODE
    return one_near(at_expect_max)


class ConntrackCollector:
    """A ``prometheus_client`` collector over a :class:`ConntrackExporter`'s newest samples.

    Metrics, each with a ``netns`` label: node_exporter's ``node_nf_conntrack_entries``,
    ``node_nf_conntrack_entries_limit`` and ``node_nf_conntrack_stat_<column>``
    for every column of ``/proc/net/stat/nf_conntrack`` (gauges, as node_exporter
    has them); ``node_nf_conntrack_expect_entries`` and ``..._expect_entries_limit``
    (node_exporter has none); the UDP timeouts in force; counters of the kernel's
    ``table full`` and ``expectation table full`` lines; and ``labkit_netns_info``
    (the inode and how the namespace was found).
    """

    def __init__(self, exporter: ConntrackExporter):
        self.exporter = exporter

    def describe(self) -> list:
        """Nothing up front: the families depend on what the kernel prints (registry checks skipped)."""
        return []

    def collect(self) -> Iterator:
        """Yield the metric families of this moment (called at each scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.exporter.snapshot()
        lab = ["netns"]

        def gauge(name: str, help_text: str, key: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=lab)
            for ns in snap.namespaces:
                if key in ns.values:
                    family.add_metric([ns.found.label], float(ns.values[key]))
            return family

        yield gauge("node_nf_conntrack_entries", "Entries in the namespace's conntrack table.",
                    "nf_conntrack_count")
        yield gauge("node_nf_conntrack_entries_limit",
                    "Size limit of the conntrack table (nf_conntrack_max; global, every namespace is held to it).",
                    "nf_conntrack_max")
        yield gauge("node_nf_conntrack_expect_entries",
                    "Expectations in the namespace's table (expect_create - expect_delete).", "expect_count")
        yield gauge("node_nf_conntrack_expect_entries_limit",
                    "Size limit of the expectation table (nf_conntrack_expect_max; global).",
                    "nf_conntrack_expect_max")
        columns = sorted({k[5:] for ns in snap.namespaces for k in ns.values if k.startswith("stat_")})
        for column in columns:
            text = STAT_HELP.get(column, f"The {column} column of /proc/net/stat/nf_conntrack, summed over CPUs.")
            yield gauge(f"node_nf_conntrack_stat_{column}",
                        text if column == "entries" else text + " Cumulative: use rate().", f"stat_{column}")
        yield gauge("labkit_nf_conntrack_udp_timeout_seconds",
                    "nf_conntrack_udp_timeout in force in the namespace.", "udp_timeout")
        yield gauge("labkit_nf_conntrack_udp_timeout_stream_seconds",
                    "nf_conntrack_udp_timeout_stream in force in the namespace.", "udp_timeout_stream")

        for kind, attr, name, text in (
                (TABLE_FULL, "table_full", "labkit_kernel_conntrack_table_full_lines",
                 "Kernel 'nf_conntrack: table full, dropping packet' lines of the namespace "
                 "(rate-limited by the kernel: node_nf_conntrack_stat_drop counts every drop)."),
                (EXPECT_TABLE_FULL, "expect_full", "labkit_kernel_conntrack_expect_table_full_lines",
                 "Kernel 'nf_conntrack: expectation table full' lines, given to the namespace whose "
                 "expectations were at the limit then (netns=\"\" when none or several were).")):
            family = CounterMetricFamily(name, text, labels=lab)
            for ns in snap.namespaces:
                family.add_metric([ns.found.label], float(getattr(ns, attr)))
            for (k, label), n in sorted(snap.orphan_lines.items()):
                if k == kind:
                    family.add_metric([label], float(n))
            yield family
        yield CounterMetricFamily("labkit_kernel_log_suppressed_messages",
                                  "Messages the kernel's log rate limiter suppressed (machine-wide).",
                                  value=float(snap.suppressed))
        yield CounterMetricFamily("labkit_kernel_log_records_lost",
                                  "Kernel log records overwritten before the exporter read them.",
                                  value=float(snap.lost_records))
        info = GaugeMetricFamily("labkit_netns_info", "A sampled namespace: its inode (as kernel lines "
                                 "name it) and how it was found (init, testbed, named, pod, process).",
                                 labels=["netns", "inode", "source"])
        stamp = GaugeMetricFamily("labkit_netns_sample_timestamp_seconds",
                                  "When the namespace's figures were read (Unix time).", labels=lab)
        for ns in snap.namespaces:
            info.add_metric([ns.found.label, str(ns.found.inode), ns.found.source], 1.0)
            stamp.add_metric([ns.found.label], ns.time)
        yield info
        yield stamp


# -- the HTTP endpoint -----------------------------------------------------------------

_LISTEN = re.compile(r"^(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):)?(?P<port>\d+)$")


def parse_listen(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``[ADDR:]PORT`` (``9101``, ``0.0.0.0:9101``, ``[::1]:9101``, ``localhost:9101``).

    Port 0 asks the kernel for a free port.

    Raises:
        ValueError: not that form, or a port outside 0-65535 (the message says which).
    """
    match = _LISTEN.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not [ADDR:]PORT, e.g. 9101, 127.0.0.1:9101 or [::1]:9101")
    port = int(match.group("port"))
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    host = (match.group("host") or default_host).strip("[]")
    return host, port


def serve(registry, host: str, port: int, *, flag: str = "--serve"):
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Returns:
        ``(server, thread, port)``: stop it with ``server.shutdown(); server.server_close()``;
        ``port`` is the one bound (the kernel's choice for 0).

    Raises:
        MonitorError: the port is in use, the address is not one of this
            machine's, the name does not resolve, or binding failed otherwise;
            the message names ``flag`` and the address.
    """
    from prometheus_client import start_http_server

    where = f"{flag} {host}:{port}" if ":" not in host else f"{flag} [{host}]:{port}"
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except socket.gaierror as exc:
        raise MonitorError(f"{where}: cannot resolve {host!r}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MonitorError(f"{where}: port {port} is already in use on {host} (another exporter? "
                               f"`ss -ltnp 'sport = :{port}'` shows which process)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise MonitorError(f"{where}: {host} is not an address of this machine "
                               "(`ip -brief address` lists them; 0.0.0.0 listens on all)") from None
        if exc.errno == errno.EACCES:
            raise MonitorError(f"{where}: permission denied (ports below 1024 need root)") from None
        raise MonitorError(f"{where}: cannot listen: {exc.strerror or exc}") from None
    return server, thread, server.server_address[1]


def make_registry(exporter: ConntrackExporter, *, process: bool = True):
    """A registry with the exporter's collector (and the exporter process's own CPU and memory)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConntrackCollector(exporter))
    if process:
        ProcessCollector(registry=registry)
    return registry


def run_until(stop: threading.Event, exporter: ConntrackExporter, deadline: float | None = None) -> None:
    """Wait until ``stop`` is set or ``deadline`` (monotonic) passes; raise when the exporter fails.

    Raises:
        MonitorError: a sampler, the log follower or a rescan failed.
    """
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            return
        stop.wait(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())))
        exporter.check()
