"""What a load is: :class:`LoadSpec`, validated at the door, and its command-line form.

A spec names the server and file, the load mode (closed loop: ``concurrency``
transfers in flight; open loop: ``rate`` starts per second, at most
``max_in_flight`` in flight), when to stop (``duration`` seconds or ``count``
transfers), per-transfer timing (packet ``timeout``, ``retries``, ``deadline``),
verification (``expected_size``, ``sha256``), RFC 2347 options (all off by
default: a default run is the plain 512-byte transfer) and ``workers``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass

from labkit.exceptions import LoadgenError
from labkit.loadgen import packet

DEFAULT_CONCURRENCY = 16
DEFAULT_DURATION = 10.0
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class LoadSpec:
    """One load: who to ask for what, how hard, for how long, and how to judge it.

    Attributes:
        host: the server's IPv4 address (as seen from where the load runs).
        port: its UDP port (69, or a NodePort).
        filename: the file to read.
        expected_size: its size in bytes; every transfer is checked against it.
            None: the first transfer of the run learns it (and its SHA-256).
        sha256: hex SHA-256 every transfer must match (None: size only).
        concurrency: closed loop: transfers kept in flight.
        rate: open loop: transfers started per second.
        max_in_flight: open loop: starts due while this many are in flight are
            skipped (and counted as ``skipped``).
        duration: seconds during which transfers are started.
        count: number of transfers to start (instead of ``duration``).
        timeout: seconds to wait for a packet before resending the last one.
        retries: resends of one packet before the transfer fails with ``timeout``.
        deadline: seconds a transfer may take in all before it fails with ``deadline``.
        workers: processes to spread the load over (results are merged).
        blksize, windowsize, option_timeout: RFC 2348 / 7440 / 2349 options to
            request (None: not requested).
        tsize: request the RFC 2349 transfer size option.
        bind: source IPv4 address (None: the kernel's choice).
        ports: (low, high) client ports to take in turn, one per transfer, so a
            port comes back only after all the others (None: the kernel picks a
            random free ephemeral port each time).  Workers share the range out.
    """

    host: str
    port: int = 69
    filename: str = ""
    expected_size: int | None = None
    sha256: str | None = None
    concurrency: int | None = None
    rate: float | None = None
    max_in_flight: int = 1000
    duration: float | None = None
    count: int | None = None
    timeout: float = 1.0
    retries: int = 3
    deadline: float = 10.0
    workers: int = 1
    blksize: int | None = None
    windowsize: int | None = None
    option_timeout: int | None = None
    tsize: bool = False
    bind: str | None = None
    ports: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            object.__setattr__(self, "concurrency", DEFAULT_CONCURRENCY)
        if self.duration is None and self.count is None:
            object.__setattr__(self, "duration", DEFAULT_DURATION)
        self.validate()

    def validate(self) -> None:
        """Refuse a spec that cannot run, naming the field and what is allowed.

        Raises:
            LoadgenError: a field is out of range or two exclusive fields are set.
        """
        def bad(field: str, message: str) -> LoadgenError:
            return LoadgenError(f"load spec field {field!r}: {message} (got {getattr(self, field)!r})")

        for field in ("host", "bind"):
            value = getattr(self, field)
            if value is None and field == "bind":
                continue
            try:
                ipaddress.IPv4Address(value)
            except (ipaddress.AddressValueError, ValueError):
                raise bad(field, "must be an IPv4 address such as 10.0.0.1") from None
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise bad("port", "must be a UDP port 1-65535")
        if not self.filename or "\0" in self.filename:
            raise bad("filename", "must be a non-empty file name without NUL")
        if (self.concurrency is None) == (self.rate is None):
            raise LoadgenError("load spec: give exactly one of 'concurrency' (closed loop) "
                               f"and 'rate' (open loop), got concurrency={self.concurrency!r} "
                               f"rate={self.rate!r}")
        if (self.duration is None) == (self.count is None):
            raise LoadgenError("load spec: give exactly one of 'duration' and 'count', got "
                               f"duration={self.duration!r} count={self.count!r}")
        positive_ints = ["workers", "max_in_flight"]
        positive = ["timeout", "deadline"]
        if self.concurrency is not None:
            positive_ints.append("concurrency")
        if self.rate is not None:
            positive.append("rate")
        if self.duration is not None:
            positive.append("duration")
        if self.count is not None:
            positive_ints.append("count")
        for field in positive_ints:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(field, "must be a whole number >= 1")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise bad(field, "must be a number > 0")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise bad("retries", "must be a whole number >= 0")
        if self.expected_size is not None and (not isinstance(self.expected_size, int)
                                               or self.expected_size < 0):
            raise bad("expected_size", "must be a size in bytes >= 0")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise bad("sha256", "must be 64 hex digits")
        ranges = {"blksize": (packet.MIN_BLKSIZE, packet.MAX_BLKSIZE),
                  "windowsize": (packet.MIN_WINDOWSIZE, packet.MAX_WINDOWSIZE),
                  "option_timeout": (packet.MIN_TIMEOUT, packet.MAX_TIMEOUT)}
        for field, (low, high) in ranges.items():
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or not low <= value <= high):
                raise bad(field, f"must be a whole number {low}-{high} or None")
        if self.ports is not None:
            if (not isinstance(self.ports, (tuple, list)) or len(self.ports) != 2
                    or not all(isinstance(p, int) for p in self.ports)
                    or not 1 <= self.ports[0] <= self.ports[1] <= 65535):
                raise bad("ports", "must be (low, high) with 1 <= low <= high <= 65535")
            object.__setattr__(self, "ports", tuple(self.ports))
            if self.ports[1] - self.ports[0] + 1 < (self.concurrency or self.max_in_flight):
                raise bad("ports", "needs at least one port per transfer in flight")
        if self.concurrency is not None and self.concurrency < self.workers:
            raise bad("concurrency", f"must be at least 'workers' ({self.workers})")
        if self.count is not None and self.count < self.workers:
            raise bad("count", f"must be at least 'workers' ({self.workers})")

    @property
    def options(self) -> dict:
        """The RFC 2347 options to request, in request order (empty by default)."""
        opts: dict = {}
        if self.blksize is not None:
            opts["blksize"] = self.blksize
        if self.tsize:
            opts["tsize"] = 0
        if self.option_timeout is not None:
            opts["timeout"] = self.option_timeout
        if self.windowsize is not None:
            opts["windowsize"] = self.windowsize
        return opts

    @property
    def mode(self) -> str:
        """``closed`` (concurrency) or ``open`` (rate)."""
        return "closed" if self.concurrency is not None else "open"

    def replace(self, **changes) -> "LoadSpec":
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def split(self) -> list["LoadSpec"]:
        """Divide this load over ``workers`` specs of one worker each.

        Concurrency, count, rate and max_in_flight are shared out so that the
        parts add up to the whole.
        """
        n = self.workers
        parts = []
        for i in range(n):
            changes: dict = {"workers": 1}
            if self.concurrency is not None:
                changes["concurrency"] = _share(self.concurrency, n, i)
            if self.count is not None:
                changes["count"] = _share(self.count, n, i)
            if self.rate is not None:
                changes["rate"] = self.rate / n
                changes["max_in_flight"] = max(1, _share(self.max_in_flight, n, i))
            if self.ports is not None:
                low, high = self.ports
                size = high - low + 1
                first = low + sum(_share(size, n, j) for j in range(i))
                changes["ports"] = (first, first + _share(size, n, i) - 1)
            parts.append(self.replace(**changes))
        return parts

    def to_argv(self) -> list[str]:
        """Return the ``labkit loadgen`` arguments that describe this spec."""
        argv = [self.host, str(self.port), self.filename]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        else:
            argv += ["--rate", repr(float(self.rate)), "--max-in-flight", str(self.max_in_flight)]
        if self.duration is not None:
            argv += ["--duration", repr(float(self.duration))]
        else:
            argv += ["--count", str(self.count)]
        argv += ["--timeout", repr(float(self.timeout)), "--retries", str(self.retries),
                 "--deadline", repr(float(self.deadline)), "--workers", str(self.workers)]
        if self.expected_size is not None:
            argv += ["--size", str(self.expected_size)]
        if self.sha256:
            argv += ["--sha256", self.sha256]
        for field, flag in (("blksize", "--blksize"), ("windowsize", "--windowsize"),
                            ("option_timeout", "--option-timeout"), ("bind", "--bind")):
            value = getattr(self, field)
            if value is not None:
                argv += [flag, str(value)]
        if self.ports is not None:
            argv += ["--ports", f"{self.ports[0]}-{self.ports[1]}"]
        if self.tsize:
            argv.append("--tsize")
        return argv


def _share(total: int, parts: int, index: int) -> int:
    """The ``index``-th of ``parts`` near-equal whole shares of ``total``."""
    return total // parts + (1 if index < total % parts else 0)
