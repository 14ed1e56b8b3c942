"""One TFTP read in flight, and the rare packets of its state machine.

:class:`Transfer` is the per-transfer state the engine's loop updates inline
for every in-order DATA packet (the hot path stays in
:mod:`labkit.loadgen.engine`).  :class:`TransferProtocol` handles the rest of
RFC 1350/2347/7440 for a reader: OACK negotiation, ERROR, a DATA 1 when the
server ignored our options, stray ACKs, malformed or unexpected packets, and
ending a transfer on our side with an ERROR to the server; and the timers that
resend the last packet or end a transfer (timeout, deadline).
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import logging
from typing import Callable

from labkit.exceptions import MalformedPacket
from labkit.loadgen import packet
from labkit.loadgen.spec import LoadSpec
from labkit.loadgen.tally import OK

log = logging.getLogger(__name__)

# send errors that no resend can cure: the transfer ends as local_error
FATAL_SEND = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL,
              errno.EACCES, errno.EBADF}


class Transfer:
    """One transfer in flight (slots: millions are made in a long run)."""

    __slots__ = ("id", "sock", "fd", "start", "last", "tid", "block", "nbytes", "tries", "pkt",
                 "hasher", "blksize", "window", "unacked", "gap", "negotiated", "retransmits",
                 "buf")

    def __init__(self, ident: int, sock, now: float, rrq: bytes, hashing: bool, capture: bool,
                 negotiate: bool) -> None:
        self.id = ident
        self.sock = sock
        self.fd = sock.fileno()
        self.start = self.last = now
        self.tid = None
        self.block = 1
        self.nbytes = 0
        self.tries = 0
        self.pkt = rrq
        self.hasher = hashlib.sha256() if hashing else None
        self.buf = bytearray() if capture else None
        self.blksize = packet.DEFAULT_BLKSIZE
        self.window = 1
        self.unacked = 0
        self.gap = False
        self.negotiated = not negotiate
        self.retransmits = 0


class TransferProtocol:
    """The reader's side of a transfer for every packet but an expected DATA, and its timers.

    Args:
        spec: the load (its options, expected size).
        capture: keep the bytes of transfers (``Transfer.buf``).
        counts: the engine's counters (``ignored`` and ``duplicates`` are counted here).
        finish: records exactly one outcome for a transfer and releases it:
            ``finish(transfer, outcome, now)``.
    """

    def __init__(self, spec: LoadSpec, capture: bool, counts: dict,
                 finish: Callable[[Transfer, str, float], None]) -> None:
        self.spec = spec
        self.capture = capture
        self.counts = counts
        self.finish = finish
        self.timeout = float(spec.timeout)
        self.deadline = float(spec.deadline)
        self.retries = spec.retries
        self.server = (spec.host, spec.port)

    def expire(self, timers: list, now: float) -> None:
        """Act on every timer of the heap ``timers`` due by ``now``: resend, or end its transfer.

        A timer is ``(when, key, transfer)``; one of an ended transfer is dropped,
        one of a transfer past its deadline or out of resends ends it, one of a
        transfer that heard from the server since comes back for its new due time.
        """
        heappush, heappop = heapq.heappush, heapq.heappop
        counts = self.counts
        timeout = self.timeout
        deadline = self.deadline
        while timers and timers[0][0] <= now:
            _exp, key, t = heappop(timers)
            if t.sock is None:
                continue
            end = t.start + deadline
            if now >= end:
                self.abandon(t, "deadline", now)
                continue
            due = t.last + timeout
            if now >= due:
                if t.tries >= self.retries:
                    self.abandon(t, "timeout", now)
                    continue
                t.tries += 1
                t.retransmits += 1
                counts["retransmits"] += 1
                t.last = now
                due = now + timeout
                try:
                    t.sock.sendto(t.pkt, t.tid or self.server)
                except OSError as exc:
                    if exc.errno in FATAL_SEND:
                        self.finish(t, "local_error", now)
                        continue
            heappush(timers, (min(due, end), key, t))

    def handle_other(self, t: Transfer, data: bytes, addr, now: float) -> None:
        """Everything but an in-order-or-duplicate DATA packet once options are settled."""
        try:
            pkt = packet.parse_packet(data)
        except MalformedPacket as exc:
            log.debug("transfer %d: %s", t.id, exc.reason)
            self.abandon(t, "malformed", now)
            return
        if isinstance(pkt, packet.Error):
            self.finish(t, f"error_{pkt.code}", now)
        elif isinstance(pkt, packet.Ack):
            self.counts["ignored"] += 1      # a reader has nothing to resend for an ACK
        elif isinstance(pkt, packet.OAck) and self.spec.options and t.block == 1:
            if t.negotiated:                 # the OACK again: our ACK 0 was lost
                self.counts["duplicates"] += 1
                send(t, t.pkt, addr)
                return
            try:
                agreed = packet.check_oack(self.spec.options, pkt.options)
            except MalformedPacket as exc:
                log.debug("transfer %d: %s", t.id, exc.reason)
                send(t, packet.build_error(packet.OPTION_REFUSED, exc.reason), addr)
                self.finish(t, "protocol", now)
                return
            t.blksize = agreed["blksize"]
            t.window = agreed["windowsize"]
            t.negotiated = True
            t.pkt = packet.build_ack(0)
            t.last = now
            t.tries = 0
            send(t, t.pkt, addr)
        elif isinstance(pkt, packet.Data) and not t.negotiated and pkt.block == 1:
            # the server ignored our options (RFC 2347 allows it): plain transfer
            t.negotiated = True
            self.take_first_data(t, data, addr, now)
        elif isinstance(pkt, packet.Data):
            self.counts["ignored"] += 1
        else:
            self.abandon(t, "protocol", now)

    def take_first_data(self, t: Transfer, data: bytes, addr, now: float) -> None:
        """DATA 1 when options were asked for and the server ignored them: a plain transfer."""
        size = len(data) - 4
        t.nbytes += size
        if size > t.blksize or t.nbytes > (self.spec.expected_size or t.nbytes):
            self.abandon(t, "oversized", now)
            return
        if t.hasher is not None:
            t.hasher.update(data[4:])
            if self.capture:
                t.buf += data[4:]
        t.pkt = packet.build_ack(1)
        t.block = 2
        t.last = now
        t.tries = 0
        t.unacked = 0
        send(t, t.pkt, addr)
        if size < t.blksize:
            self.finish(t, OK, now)

    def abandon(self, t: Transfer, reason: str, now: float) -> None:
        """End a transfer on our side and tell the server (never for a timeout's silence)."""
        if t.tid is not None and reason not in ("timeout", "deadline"):
            send(t, packet.build_error(packet.ILLEGAL_OPERATION
                                       if reason in ("malformed", "protocol") else 0,
                                       f"labkit loadgen: {reason}"), t.tid)
        self.finish(t, reason, now)


def send(t: Transfer, data: bytes, addr) -> None:
    """Send ``data`` from ``t``'s socket; a failure is a lost packet (its timer resends)."""
    try:
        t.sock.sendto(data, addr)
    except OSError:
        pass


def bind_next(sock, address: str, port: int, low: int, high: int) -> int:
    """Bind to the next free port of low..high from ``port`` on; return the one after it.

    Raises:
        OSError: every port of the range is taken (EADDRINUSE).
    """
    for _ in range(high - low + 1):
        try:
            sock.bind((address, port))
            return port + 1 if port < high else low
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            port = port + 1 if port < high else low
    raise OSError(errno.EADDRINUSE, f"every client port {low}-{high} is in use")
