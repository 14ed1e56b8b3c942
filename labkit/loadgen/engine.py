"""The load engine: one thread, one epoll loop, many non-blocking UDP sockets.

Each transfer is a TFTP read (RFC 1350) from a fresh socket, so from a fresh
ephemeral client port and a fresh conntrack flow.  The loop starts transfers
(closed loop: keep ``concurrency`` in flight; open loop: ``rate`` per second,
at most ``max_in_flight``), answers DATA with ACKs, resends the last packet
when a packet timeout passes, and ends every transfer with exactly one outcome:
``ok`` (size and, if given, SHA-256 verified) or a failure reason (see
:data:`FAILURE_REASONS`).  :func:`run_engine` returns a plain, JSON-able record
that :mod:`labkit.loadgen.result` turns into tables and merges across workers.

The per-packet path is written for speed: DATA, the packet that makes up
almost all of the traffic, is decoded inline (by the same rules as
:func:`~labkit.loadgen.packet.parse_packet`, which handles every other packet).
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import resource
import select
import socket
import time

import _socket
from typing import Callable

from labkit.exceptions import LoadgenError
from labkit.loadgen import packet
from labkit.loadgen.spec import LoadSpec
from labkit.loadgen.tally import HIST_SCALE, OK, TRANSFER_COLUMNS, Tally  # noqa: F401 (re-exported)
from labkit.loadgen.transfer_state import FATAL_SEND, Transfer, TransferProtocol, bind_next

log = logging.getLogger(__name__)

# Every way a transfer can end other than ok.  ``error_<code>`` for an ERROR packet.
FAILURE_REASONS = {
    "timeout": "no answer after the last resend",
    "deadline": "the transfer took longer than its deadline",
    "error_<code>": "the server sent an ERROR packet with this code",
    "malformed": "the server sent bytes that are not a TFTP packet",
    "protocol": "the server sent a well-formed packet that is wrong at this point",
    "short": "the transfer ended with fewer bytes than expected",
    "oversized": "more bytes than expected, or a DATA packet longer than the block size",
    "checksum": "the right size but the wrong SHA-256",
    "local_error": "the client could not open a socket or send (e.g. too many open files)",
    "aborted": "the run was interrupted while the transfer was in flight",
}


def run_engine(spec: LoadSpec, *, t0: float | None = None, worker: int = 0,
               transfers_path: str | None = None, capture: bool = False,
               progress: Callable[[dict], None] | None = None) -> dict:
    """Run one worker's share of a load in this thread and return what it counted.

    Args:
        spec: the load (``workers`` is ignored: this is one worker).
        t0: ``time.monotonic()`` at which the run starts (shared by workers so
            their per-second bins line up); default now.
        worker: this worker's index, written in the per-transfer table.
        transfers_path: write one CSV row per transfer there (None: no table).
        capture: keep the bytes of the first ok transfer (``record["content"]``);
            with ``spec.expected_size`` None the size is not checked.
        progress: called about once a second with the running counters.

    Returns:
        A JSON-able record: counters, per-second series, latency histogram,
        timing, CPU and memory use (see :mod:`labkit.loadgen.result`).

    Raises:
        LoadgenError: the spec needs more open files than this process may have.
    """
    engine = _Engine(spec, t0, worker, transfers_path, capture, progress)
    return engine.run()


class _Engine:
    """One worker's run: the epoll loop over the transfers in flight and their timers.

    The loop keeps the per-DATA path inline; :class:`~labkit.loadgen.transfer_state.TransferProtocol`
    takes every other packet, :class:`~labkit.loadgen.tally.Tally` counts what ends.
    """

    def __init__(self, spec, t0, worker, transfers_path, capture, progress):
        if spec.expected_size is None and not capture:
            raise LoadgenError("load spec: expected_size is needed to verify transfers "
                               "(run_load learns it with a first transfer)")
        self.spec = spec
        self.t0 = time.monotonic() if t0 is None else t0
        self.worker = worker
        self.transfers_path = transfers_path
        self.capture = capture
        self.progress = progress
        _raise_file_limit(spec.concurrency or spec.max_in_flight)

    def run(self) -> dict:
        """Run the load to its end (or an interrupt) and return the worker's record."""
        spec = self.spec
        self.stop_at = self.t0 + spec.duration if spec.duration is not None else math.inf
        self.interrupted = False
        self.table: dict[int, Transfer] = {}
        self.timers: list = []
        self.ep = select.epoll()
        self.tally = tally = Tally(self.t0, self.worker, self.stop_at, self.capture,
                                   self.transfers_path)
        self.protocol = TransferProtocol(spec, self.capture, tally.counts, self.finish)
        usage = _usage()
        wall = time.time() - (time.monotonic() - self.t0)
        try:
            early = self.t0 - time.monotonic()
            if early > 0:       # workers start together at the t0 their parent chose
                time.sleep(early)
            self._loop()
        except KeyboardInterrupt:
            self.interrupted = True
            log.info("worker %d interrupted with %d transfers in flight", self.worker, len(self.table))
        finally:
            now = time.monotonic()
            for t in list(self.table.values()):
                self.finish(t, "aborted", now)
            self.ep.close()
            tally.close(now)
        used = _usage()
        end = tally.end if tally.end is not None else time.monotonic()
        return {
            "worker": self.worker,
            "spec": _spec_dict(spec),
            "t0_wall": wall,
            "duration_s": max(end - self.t0, 1e-9),
            **tally.record_parts(),
            "cpu_user_s": used[0] - usage[0],
            "cpu_sys_s": used[1] - usage[1],
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "interrupted": self.interrupted,
            "content": tally.content,
        }

    # -- the loop ---------------------------------------------------------------

    def _loop(self) -> None:  # noqa: C901 - the hot path stays in one frame on purpose
        spec = self.spec
        mono = time.monotonic
        t0 = self.t0
        table = self.table
        timers = self.timers
        tally = self.tally
        counts = tally.counts
        ep = self.ep
        poll = ep.poll
        series_started = tally.series["started"]
        heappush = heapq.heappush
        acks = packet._ACKS
        build_ack = packet.build_ack
        finish = self.finish
        handle_other = self.protocol.handle_other
        abandon = self.protocol.abandon
        expire = self.protocol.expire
        negotiate = bool(spec.options)
        hashing = spec.sha256 is not None or self.capture
        capture = self.capture
        expected = spec.expected_size if spec.expected_size is not None else float("inf")
        timeout = float(spec.timeout)
        server = (spec.host, spec.port)
        rrq = packet.build_rrq(spec.filename, "octet", spec.options)
        bufsize = max(spec.blksize or 0, packet.DEFAULT_BLKSIZE) + 5   # +1: see an oversized packet
        err5 = packet.build_error(packet.UNKNOWN_TID)
        closed = spec.concurrency is not None
        limit = spec.concurrency if closed else spec.max_in_flight
        rate = spec.rate
        remaining = spec.count if spec.count is not None else math.inf
        stop_at = self.stop_at
        offered = 0                 # open loop: starts due so far (started + skipped)
        last_offer = math.ceil(spec.duration * rate - 1e-9) if rate and spec.duration else 0
        starting = True
        next_tick = t0 + 1.0
        # the C socket type without socket.socket's Python-level wrapper: a few us per transfer
        new_socket = _socket.socket
        family, kind = socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
        epollin = select.EPOLLIN
        bind = spec.bind
        port_low, port_high = spec.ports or (0, 0)
        port = port_low
        next_id = 0
        sec = 0

        while True:
            now = mono()
            if now >= next_tick:
                sec = self._tick(now)
                next_tick = t0 + sec + 1.0
            if starting:
                if remaining <= 0 or (closed and now >= stop_at):
                    starting = False
                else:
                    if closed:
                        n = min(limit - len(table), remaining)
                    else:
                        # starts fall at t0 + k / rate; a late wake catches up, also at the end
                        if now >= stop_at:
                            starting = False
                            target = last_offer
                        else:
                            target = int((now - t0) * rate) + 1
                        due = min(target, remaining + offered) - offered
                        n = min(due, limit - len(table))
                        if n < due:
                            counts["skipped"] += due - n
                            remaining -= due - n
                        offered += due
                    for _ in range(n):
                        remaining -= 1
                        next_id += 1
                        try:
                            sock = new_socket(family, kind)
                        except OSError as exc:
                            tally.local_failure(now, exc)
                            continue
                        t = Transfer(next_id, sock, now, rrq, hashing, capture, negotiate)
                        table[t.fd] = t
                        counts["started"] += 1
                        series_started[sec] += 1
                        try:
                            if port_low:
                                port = bind_next(sock, bind or "0.0.0.0", port, port_low, port_high)
                            elif bind:
                                sock.bind((bind, 0))
                            ep.register(t.fd, epollin)
                            sock.sendto(rrq, server)
                        except OSError as exc:
                            if exc.errno in FATAL_SEND or exc.errno in (errno.EMFILE,
                                                                         errno.EADDRINUSE):
                                finish(t, "local_error", now)
                                continue
                            # a transient send failure (netfilter drop: EPERM, ENOBUFS)
                            # is a lost packet: the timer resends it
                        heappush(timers, (now + timeout, next_id, t))
            if not starting and not table:
                break

            wait = timers[0][0] - now if timers else 1.0
            if starting and not closed:
                wait = min(wait, t0 + offered / rate - now)
            elif starting and len(table) < limit:
                wait = 0
            wait = min(wait, next_tick - now)
            events = poll(wait if wait > 0 else 0, 4096)
            now = mono()

            for fd, _ev in events:
                t = table.get(fd)
                if t is None:
                    continue
                sock = t.sock
                try:
                    data, addr = sock.recvfrom(bufsize)
                except OSError:         # EAGAIN (already read), EINTR...: nothing to take
                    continue
                if addr != t.tid:
                    if t.tid is None:
                        t.tid = addr
                    else:
                        # RFC 1350: answer a stranger with error 5, leave the transfer be
                        counts["wrong_sender"] += 1
                        try:
                            sock.sendto(err5, addr)
                        except OSError:
                            pass
                        continue
                if len(data) >= 4 and data[0] == 0 and data[1] == 3 and t.negotiated:
                    block = (data[2] << 8) | data[3]
                    if block == t.block:
                        size = len(data) - 4
                        nbytes = t.nbytes + size
                        if size > t.blksize or nbytes > expected:
                            abandon(t, "oversized", now)
                            continue
                        t.nbytes = nbytes
                        if t.hasher is not None:
                            payload = memoryview(data)[4:]
                            t.hasher.update(payload)
                            if capture:
                                t.buf += payload
                        ack = acks.get(block) or build_ack(block)
                        t.pkt = ack
                        t.block = (block + 1) & 0xFFFF
                        t.last = now
                        if t.tries:
                            t.tries = 0
                        if t.window != 1:
                            t.gap = False
                            t.unacked += 1
                            if size == t.blksize and t.unacked < t.window:
                                continue        # RFC 7440: acknowledge once per window
                            t.unacked = 0
                        try:
                            sock.sendto(ack, addr)
                        except OSError:
                            pass    # lost: the timer resends it (after the last block the
                            # server resends its DATA, then gives up: ours is whole)
                        if size < t.blksize:
                            finish(t, OK, now)
                    elif block == ((t.block - 1) & 0xFFFF) and t.pkt is not rrq:
                        # a duplicate of the last block: acknowledge again, count once
                        counts["duplicates"] += 1
                        try:
                            sock.sendto(t.pkt, addr)
                        except OSError:
                            pass
                    elif t.window > 1 and not t.gap and ((block - t.block) & 0xFFFF) < t.window:
                        # RFC 7440: a gap in the window; ack the last block in order, once
                        t.gap = True
                        t.unacked = 0
                        try:
                            sock.sendto(t.pkt, addr)
                        except OSError:
                            pass
                    else:
                        counts["ignored"] += 1
                    continue
                handle_other(t, data, addr, now)

            if timers and timers[0][0] <= now:
                expire(timers, now)

    def finish(self, t: Transfer, outcome: str, now: float) -> None:
        """Record exactly one outcome for ``t`` and release its socket."""
        sock = t.sock
        if sock is None:
            return
        if outcome == OK:
            spec = self.spec
            if spec.expected_size is not None and t.nbytes != spec.expected_size:
                outcome = "short" if t.nbytes < spec.expected_size else "oversized"
            elif spec.sha256 is not None and t.hasher.hexdigest() != spec.sha256.lower():
                outcome = "checksum"
        t.sock = None
        del self.table[t.fd]
        client_port = server_port = None
        if self.tally.wants_ports:
            try:
                client_port = sock.getsockname()[1]
            except OSError:
                pass
            server_port = t.tid[1] if t.tid else None
        sock.close()
        self.tally.record(t, outcome, now, client_port, server_port)

    def _tick(self, now: float) -> int:
        """Close the seconds that passed (in flight and resident memory at their end)."""
        sec = int(now - self.t0)
        self.tally.close_seconds(sec, len(self.table))
        if self.progress is not None:
            self.progress(self.tally.progress(now, len(self.table)))
        return sec


def _spec_dict(spec: LoadSpec) -> dict:
    from dataclasses import asdict
    return asdict(spec)


def _usage() -> tuple[float, float]:
    """CPU seconds (user, system) of this thread, where the engine runs."""
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    usage = resource.getrusage(who)
    return usage.ru_utime, usage.ru_stime


def _raise_file_limit(sockets: int) -> None:
    """Let this process open ``sockets`` sockets (plus a margin), or refuse the spec."""
    need = sockets + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise LoadgenError(f"load spec: {sockets} transfers in flight need {need} open files, "
                           f"but this process may open at most {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
