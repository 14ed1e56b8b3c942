"""Pure parsers for what the kernel tells about conntrack: stat tables and log lines.

No I/O here: every function takes text and returns data, so each is tested on
captured real output (``tests/data/``).  This module uses the standard library
only, because the remote agent (:mod:`labkit.monitor.agent`) ships it to nodes
that have no pandas.

The stat table (``/proc/net/stat/nf_conntrack``) has one row per CPU, in hex.
Its ``entries`` column is not per CPU: the kernel prints the namespace's count
on every row, so it is taken once, not summed.  The columns ``new``, ``ignore``
and ``delete`` are always 0 on current kernels (kept: the issue wants every
column).

Kernel log lines of interest, as the kernel versions print them::

    nf_conntrack: nf_conntrack: table full in netns 4026532246, dropping packet   (6.18, not init_net)
    nf_conntrack: nf_conntrack: table full, dropping packet                       (init_net; every netns on 6.1)
    nf_conntrack: table full, dropping packet                                     (3.x, the article's)
    nf_conntrack: table full, dropping packet.                                    (2.6)
    nf_conntrack: expectation table full
    net_ratelimit: 2653 callbacks suppressed                                      (the rate limiter)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from labkit.exceptions import MonitorError

#: Event kinds, as the ``kind`` column of the events table spells them.
TABLE_FULL = "table_full"
EXPECT_TABLE_FULL = "expect_table_full"
SUPPRESSED = "suppressed"
KINDS = (TABLE_FULL, EXPECT_TABLE_FULL, SUPPRESSED)

_U32 = 1 << 32

_TABLE_FULL = re.compile(
    r"(?:nf|ip)_conntrack: (?:nf_conntrack: )?table full"
    r"(?: in netns (?P<inum>\d+))?, dropping packet\.?\s*$")
_EXPECT_FULL = re.compile(r"nf_conntrack: (?:nf_conntrack: )?expectation table full\.?\s*$")
_SUPPRESSED = re.compile(
    r"^(?P<func>net_ratelimit|printk): (?P<n>\d+) (?:callbacks|messages) suppressed\.?\s*$")


def parse_conntrack_stats(text: str, *, source: str = "nf_conntrack stat") -> dict[str, int]:
    """Parse ``/proc/net/stat/nf_conntrack``: each column summed over the CPU rows.

    Args:
        text: the file's content (a header line, then one hex row per CPU).
        source: where the text came from, for error messages.

    Returns:
        ``{column: value}`` for every column of the header, in header order;
        ``entries`` is the namespace's count (printed on every row, not summed).

    Raises:
        MonitorError: no header, no CPU row, or a row with the wrong number of
            fields or a field that is not hex (the message names the line).
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise MonitorError(f"{source}: empty, expected a header and one row per CPU")
    header = lines[0].split()
    if not header or not header[0].isidentifier():
        raise MonitorError(f"{source}: line 1: expected column names, got {lines[0]!r}")
    if len(lines) < 2:
        raise MonitorError(f"{source}: no CPU rows after the header")
    totals = dict.fromkeys(header, 0)
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) != len(header):
            raise MonitorError(f"{source}: line {number}: {len(fields)} fields, "
                               f"the header has {len(header)}: {line!r}")
        try:
            values = [int(f, 16) for f in fields]
        except ValueError:
            raise MonitorError(f"{source}: line {number}: not hex numbers: {line!r}") from None
        for name, value in zip(header, values):
            totals[name] += value
    if "entries" in totals:
        totals["entries"] = int(lines[1].split()[header.index("entries")], 16)
    return totals


def expect_count(stats: dict[str, int]) -> int:
    """The namespace's current number of expectations, from its stat counters.

    Every expectation inserted counts ``expect_create`` and every one removed
    (used, timed out, or killed with its master) ``expect_delete``; the
    difference is what ``conntrack -L expect`` lists, at no cost.  The per-CPU
    counters are 32-bit and wrap, so the difference is taken modulo 2**32.

    Raises:
        MonitorError: the stats lack the ``expect_create``/``expect_delete`` columns.
    """
    try:
        return (stats["expect_create"] - stats["expect_delete"]) % _U32
    except KeyError as exc:
        raise MonitorError(f"conntrack stats have no {exc.args[0]} column: "
                           "cannot derive the expectation count") from None


def parse_conntrack_S(text: str) -> dict[str, int]:
    """Parse ``conntrack -S`` output: each ``key=value`` summed over the ``cpu=N`` lines.

    Used to check the monitor against the reference tool.

    Raises:
        MonitorError: a line without ``cpu=``, or a value that is not a number.
    """
    totals: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        pairs = [p.split("=", 1) for p in line.split() if "=" in p]
        if not pairs:
            continue
        if pairs[0][0] != "cpu":
            raise MonitorError(f"conntrack -S: line {number}: expected cpu=N first: {line!r}")
        for key, value in pairs[1:]:
            try:
                totals[key] = totals.get(key, 0) + int(value)
            except ValueError:
                raise MonitorError(f"conntrack -S: line {number}: {key}={value!r} is not a number") from None
    return totals


@dataclass(frozen=True)
class KmsgRecord:
    """One ``/dev/kmsg`` record: ``priority,seq,usec,flags[,...];message``.

    Attributes:
        priority: syslog priority and facility (``facility * 8 + level``).
        seq: the record's sequence number (a gap means records were lost).
        usec: CLOCK_MONOTONIC microseconds when it was logged.
        message: the text after ``;`` (continuation lines dropped).
    """

    priority: int
    seq: int
    usec: int
    message: str


@dataclass(frozen=True)
class KernelEvent:
    """A kernel log line about conntrack, recognised.

    Attributes:
        kind: ``table_full``, ``expect_table_full`` or ``suppressed``.
        message: the raw text of the line (as the kernel printed it).
        netns_inode: the namespace inode the line names (``table full in netns N``),
            or None when it names none.
        suppressed: for ``suppressed`` lines, how many messages the limiter dropped.
        seq, usec: from the ``/dev/kmsg`` record (None for lines of other sources).
    """

    kind: str
    message: str
    netns_inode: int | None = None
    suppressed: int | None = None
    seq: int | None = None
    usec: int | None = None


def split_kmsg_record(line: str) -> KmsgRecord:
    """Split one ``/dev/kmsg`` record into its fields.

    Args:
        line: a record as read from ``/dev/kmsg`` (one ``read`` returns one);
            continuation lines (starting with a space: ``KEY=value``) are dropped.

    Raises:
        MonitorError: the prefix is not ``priority,seq,usec,flags;``.
    """
    first = line.split("\n", 1)[0]
    prefix, sep, message = first.partition(";")
    fields = prefix.split(",")
    if not sep or len(fields) < 4:
        raise MonitorError(f"/dev/kmsg: not a record (want 'priority,seq,usec,flags;message'): {first[:120]!r}")
    try:
        return KmsgRecord(int(fields[0]), int(fields[1]), int(fields[2]), _unescape(message))
    except ValueError:
        raise MonitorError(f"/dev/kmsg: priority, seq and usec must be numbers: {first[:120]!r}") from None


def _unescape(message: str) -> str:
    # /dev/kmsg escapes non-printable bytes as \xNN
    if "\\x" not in message:
        return message
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), message)


def classify_kernel_message(message: str) -> KernelEvent | None:
    """Recognise a kernel log message about conntrack, from any source.

    Args:
        message: the message text alone (no timestamp or syslog prefix).

    Returns:
        A :class:`KernelEvent` (without seq/usec), or None for any other message.
    """
    text = message.strip()
    match = _TABLE_FULL.search(text)
    if match:
        inum = match.group("inum")
        return KernelEvent(TABLE_FULL, text, netns_inode=int(inum) if inum else None)
    if _EXPECT_FULL.search(text):
        return KernelEvent(EXPECT_TABLE_FULL, text)
    match = _SUPPRESSED.match(text)
    if match:
        return KernelEvent(SUPPRESSED, text, suppressed=int(match.group("n")))
    return None


def parse_kmsg_line(line: str) -> KernelEvent | None:
    """Parse one ``/dev/kmsg`` record into a conntrack event, or None for other lines.

    Raises:
        MonitorError: the record itself is malformed (see :func:`split_kmsg_record`).
    """
    record = split_kmsg_record(line)
    event = classify_kernel_message(record.message)
    if event is None:
        return None
    return KernelEvent(event.kind, event.message, event.netns_inode, event.suppressed,
                       seq=record.seq, usec=record.usec)


_SYSLOG = re.compile(r"^\w{3}\s+\d{1,2} [\d:]{8} \S+ kernel: (?:\[\s*\d+\.\d+\] )?(?P<msg>.*)$")
_DMESG = re.compile(r"^(?:<\d+>)?\[\s*(?P<sec>\d+)\.(?P<frac>\d{6})\] (?P<msg>.*)$")


def parse_syslog_line(line: str) -> KernelEvent | None:
    """Parse a ``/var/log/messages`` kernel line (as the article tailed) into an event.

    Returns:
        The event, or None for a line that is not a conntrack kernel message.
    """
    match = _SYSLOG.match(line.rstrip("\n"))
    return classify_kernel_message(match.group("msg")) if match else None


def parse_dmesg_line(line: str) -> KernelEvent | None:
    """Parse a ``dmesg`` / ``dmesg -r`` line (``[  428.208791] message``) into an event.

    The bracketed time is kept as ``usec`` (the same clock as ``/dev/kmsg``), so
    lines can be matched one to one against the monitor's events.

    Returns:
        The event, or None for a line that is not a conntrack kernel message.
    """
    match = _DMESG.match(line.rstrip("\n"))
    if not match:
        return None
    event = classify_kernel_message(match.group("msg"))
    if event is None:
        return None
    usec = int(match.group("sec")) * 1_000_000 + int(match.group("frac"))
    return KernelEvent(event.kind, event.message, event.netns_inode, event.suppressed, usec=usec)


# --- /proc/slabinfo -------------------------------------------------------------------

PAGE_SIZE = 4096  # the page size slabinfo's pagesperslab counts in (x86-64, arm64 4K)


@dataclass(frozen=True)
class SlabCache:
    """One line of ``/proc/slabinfo``.

    Attributes:
        name: the cache (``nf_conntrack``).
        active_objs: objects in use.
        num_objs: objects the cache's slabs hold (in use or free).
        objsize: bytes per object, padding included.
        objperslab, pagesperslab: how objects pack into slabs.
    """

    name: str
    active_objs: int
    num_objs: int
    objsize: int
    objperslab: int
    pagesperslab: int

    @property
    def bytes_per_object(self) -> float:
        """Memory one object costs, the slab's unused tail shared out."""
        return self.pagesperslab * PAGE_SIZE / self.objperslab

    @property
    def active_bytes(self) -> float:
        """Memory of the objects in use."""
        return self.active_objs * self.bytes_per_object

    @property
    def total_bytes(self) -> int:
        """Memory the cache's slabs hold."""
        return int(self.num_objs * self.bytes_per_object)


def parse_slabinfo(text: str, source: str = "/proc/slabinfo") -> dict[str, SlabCache]:
    """Parse ``/proc/slabinfo`` (version 2.x) into ``{name: SlabCache}`` (pure).

    Raises:
        MonitorError: the text is not slabinfo 2.x, or a line is malformed (its number named).
    """
    lines = text.splitlines()
    if not lines or not lines[0].startswith("slabinfo - version: 2."):
        raise MonitorError(f"{source}: not /proc/slabinfo version 2.x (first line {lines[:1]!r})")
    caches = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip() or line.startswith("#"):
            continue
        head = line.split(":", 1)[0].split()
        try:
            name, active, total, size, per_slab, pages = head[0], *map(int, head[1:6])
        except (ValueError, IndexError):
            raise MonitorError(f"{source}: line {number} is not a slab cache line: {line!r}") from None
        if per_slab <= 0 or pages <= 0:
            raise MonitorError(f"{source}: line {number}: objperslab and pagesperslab must be > 0")
        caches[name] = SlabCache(name, active, total, size, per_slab, pages)
    return caches
