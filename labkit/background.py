"""Background flows: keep the kernel's conntrack garbage collector on the cycle of a busy node.

On Linux 5.15 and later a conntrack entry whose timeout has run out stays in the
table, and in ``nf_conntrack_count``, until the garbage-collection worker's next
pass reaps it.  One worker serves every namespace; after each pass it sleeps for
about the mean remaining timeout of the entries it saw, from a bias of 100
entries at 60 s (``GC_SCAN_INITIAL_COUNT``, ``GC_SCAN_INTERVAL_MAX`` in
``net/netfilter/nf_conntrack_core.c``).  On a machine whose tables are empty
between two lab loads it sleeps the full 60 s, and a load that starts meanwhile
piles up expired entries until the worker wakes, at a random moment up to a
minute in: most of a lab load (the article's 10-minute loads hardly noticed).
See ``docs/kernel-notes.md`` for what that did to the lab.

:class:`BackgroundFlows` gives the machine the steady trickle of short-lived
flows a busy node has: every second it empties the tables of namespaces of its
own (``lkbg*``), lists one of them (:func:`dump_table`) and sends ``flows`` new
UDP flows, each to a closed port on their loopback.  Every pass of the worker
then sees that many live entries with a second or two to live and comes back
within about 7 s (measured) instead of 60.  The listing does more: the kernel
evicts every expired entry a listing walks past, of any namespace, so the
machine's expired entries are reaped within a second of their timeout, as the
article's kernel (3.10, a timer per entry) did; ``conntrack -L`` and ``-D`` on a
node do the same.  The flows are spread over namespaces of at most
:data:`PER_NAMESPACE` each: one worker scans every namespace's entries, but each
namespace's count is held against the global ``nf_conntrack_max`` on its own,
and a small lab max (a slow machine's, 64 in the lab VM) must stay far from full in
these: each second a namespace gets at most :data:`MAX_SHARE` of the max in force
then (:func:`per_namespace`), fewer flows rather than a full table; when the lab
lowers the max in the middle of a second's burst, the rest of that burst is
dropped (``EPERM``, table full) and the flows go on.  A
table is emptied with one netlink message (``IPCTNL_MSG_CT_DELETE`` with no
tuple: what ``conntrack -F`` sends), so no entry can vanish between a listing and
its deletion, and no process is started per second.  They never leave their
namespaces, never touch the node's or the pods' tables, and cost about 1-2 % of
one core.

The worker picks up the new cycle at its next pass, at most 60 s after the
flows start (:data:`WARM_S`); :meth:`BackgroundFlows.wait_warm` waits for that.
Loads whose tables never fill need not wait (the listing reaps from the first
second): a replay's machine check and the plain server of iteration 1 run
meanwhile.
A replay starts the flows once and keeps them for all its iterations; a single
``labkit run`` starts its own when none are running (see :func:`ensure`).  When
the sender fails, it says so in its marker file (``status: failed`` and the
reason): :func:`ensure` and :func:`watch` raise it to the iteration that relies on
the flows, and the replay driver starts fresh ones for the next iteration.
"""

from __future__ import annotations

import json
import math
import logging
import os
import secrets
import signal
import socket
import struct
import string
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from labkit.exceptions import TestbedError
from labkit.host import LocalHost, NetnsHost, in_netns
from labkit.ledger import Ledger, netns_inode
from labkit.sysctls import state_dir
from labkit.util import atomic_write

log = logging.getLogger(__name__)

WARM_S = 61.0  # GC_SCAN_INTERVAL_MAX (60 s) and a second: the worker has seen the flows by then
UDP_TIMEOUT_S = 2  # in the flows' own namespaces: longer than the 1 s between flushes
PER_NAMESPACE = 250  # flows per namespace: far below any lab max (early eviction starts at 95 %)
MAX_SHARE = 0.4  # ... and never more than this share of the global max in force (a slow machine's is small)
MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"
MARKER_NAME = "background-flows.json"
DIR_PREFIX = "netns-bg-"  # ``labkit clean`` undoes the ledgers of netns-* state folders
WATCH_EVERY_S = 0.25
_TARGET = "127.1.{}.{}"
_PORT = 9  # discard: nothing listens, the kernel answers nothing we wait for

# ctnetlink: IPCTNL_MSG_CT_DELETE without a tuple empties the namespace's table
_NETLINK_NETFILTER = 12
_CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
_CT_GET = (1 << 8) | 1  # ... | IPCTNL_MSG_CT_GET
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 1, 4, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3


def marker_path(directory: Path | None = None) -> Path:
    """Where the running flows announce themselves (pid, namespaces, when warm, status)."""
    return Path(directory or state_dir()) / MARKER_NAME


def _marker(directory: Path | None) -> dict | None:
    """The marker of a live process's flows (running or failed), None when there is none."""
    try:
        info = json.loads(marker_path(directory).read_text())
        os.kill(int(info["pid"]), 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ProcessLookupError):
        return None
    except PermissionError:
        pass
    return info if isinstance(info, dict) else None


def _running(info: dict | None) -> dict | None:
    if info is None or info.get("status", "running") != "running":
        return None
    names = info.get("namespaces") or [info.get("netns", "")]
    return info if all(netns_inode(str(n)) is not None for n in names) else None


def _failure(info: dict | None) -> str | None:
    if info is None or info.get("status") != "failed":
        return None
    return str(info.get("error") or "no reason recorded")


def running(directory: Path | None = None) -> dict | None:
    """The marker of background flows running on this machine, None when there are none."""
    return _running(_marker(directory))


def failure(directory: Path | None = None) -> str | None:
    """Why the flows of a live run stopped (their marker says failed), None when they did not."""
    return _failure(_marker(directory))


def flush_table(sock: socket.socket) -> None:
    """Empty the conntrack table of the namespace ``sock`` (a netfilter netlink socket) belongs to.

    Raises:
        OSError: the kernel refused (its errno), or answered something else than an ack.
    """
    header = struct.pack("=LHHLL", 20, _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
    sock.send(header + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
    reply = sock.recv(4096)
    kind = struct.unpack_from("=H", reply, 4)[0] if len(reply) >= 16 else None
    if kind != _NLMSG_ERROR or len(reply) < 20:
        raise OSError(f"conntrack flush: unexpected netlink answer {reply[:20].hex()}")
    code = struct.unpack_from("=i", reply, 16)[0]
    if code != 0:
        raise OSError(-code, f"conntrack flush: {os.strerror(-code)}")


def dump_table(sock: socket.socket) -> int:
    """List the conntrack table of ``sock``'s namespace (as ``conntrack -L`` does); returns its entries.

    Listing walks the whole hash table, which every namespace shares, and the kernel
    evicts each *expired* entry it passes, of any namespace (``ctnetlink_dump_table``
    tests expiry before it tests the namespace).  One listing a second therefore
    reaps every entry on the machine within a second of its timeout: see
    ``docs/kernel-notes.md``.

    Raises:
        OSError: the kernel refused the dump.
    """
    sock.send(struct.pack("=LHHLL", 20, _CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP, 2, 0)
              + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
    entries = 0
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=LH", data, offset)
            if length < 16:
                raise OSError(f"conntrack dump: malformed netlink message {data[offset:offset + 16].hex()}")
            if kind == _NLMSG_DONE:
                return entries
            if kind == _NLMSG_ERROR:
                code = struct.unpack_from("=i", data, offset + 16)[0]
                raise OSError(-code, f"conntrack dump: {os.strerror(-code)}")
            entries += 1
            offset += (length + 3) & ~3


def per_namespace(share: int, global_max: int) -> int:
    """How many of its ``share`` of flows a namespace sends this second under ``global_max`` (pure)."""
    return max(1, min(share, int(global_max * MAX_SHARE)))


def _global_max() -> int:
    with open(MAX_PATH) as f:
        return int(f.read())


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)


class BackgroundFlows:
    """``flows`` new short-lived UDP flows a second in namespaces of their own.

    Args:
        flows: flows per second (the live entries any garbage-collection pass sees).
        directory: the state directory (default :func:`labkit.sysctls.state_dir`).
        warm_s: seconds the garbage collector may take to pick up their cycle (default :data:`WARM_S`).
    """

    def __init__(self, flows: int, *, directory: Path | None = None, warm_s: float | None = None):
        if int(flows) < 1:
            raise ValueError(f"background flows: {flows!r} flows per second; give at least 1")
        warm_s = WARM_S if warm_s is None else warm_s
        if float(warm_s) < 0:
            raise ValueError(f"background flows: warm-up {warm_s!r} s; give 0 or more")
        self.flows = int(flows)
        self.warm_s = float(warm_s)
        self.dir = Path(directory or state_dir())
        token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        count = math.ceil(self.flows / PER_NAMESPACE)
        self.namespaces = [f"lkbg{token}{k}" for k in range(count)]
        self.netns = self.namespaces[0]
        self.ledger = Ledger(self.dir / f"{DIR_PREFIX}{token}")
        self.started: float | None = None
        self.sent = 0
        self.flushes = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "BackgroundFlows":
        """Make the namespaces, start sending, announce the flows; returns self."""
        try:
            for name in self.namespaces:
                ident = self.ledger.record("netns", name=name)
                LocalHost("init").run(["ip", "netns", "add", name], timeout=30)
                self.ledger.note(ident, inode=netns_inode(name))
                ns = NetnsHost(name)
                ns.run(["ip", "link", "set", "lo", "up"], timeout=30)
                # conntrack works in a namespace only once a rule there needs it
                ns.run(["iptables", "-w", "-A", "OUTPUT", "-p", "udp", "-d", "127.1.0.0/16",
                        "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"], timeout=30)
                ns.write_sysctl("net.netfilter.nf_conntrack_udp_timeout", UDP_TIMEOUT_S)
            senders = [(in_netns(n, socket.socket, socket.AF_INET, socket.SOCK_DGRAM),
                        in_netns(n, _netlink_socket)) for n in self.namespaces]
            self._thread = threading.Thread(target=self._loop, args=(senders,),
                                            name="labkit-background-flows", daemon=True)
            self.started = time.time()
            self._announce("running")
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        log.info("background flows: %d/s in %s", self.flows, ", ".join(self.namespaces))
        return self

    def wait_warm(self, on_wait=None) -> float:
        """Sleep until the garbage collector has had its chance to see the flows; returns seconds slept."""
        return wait_until_warm(self.started + self.warm_s if self.started else time.time(), on_wait)

    @property
    def failed(self) -> bool:
        """Whether the sender stopped on an error (see :attr:`error`)."""
        return self.error is not None

    def stop(self) -> None:
        """Stop sending, remove the namespaces and the marker; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drop_marker()
        self.ledger.undo()
        self.ledger.discard()

    def __enter__(self) -> "BackgroundFlows":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the sender --------------------------------------------------------------------

    def _loop(self, senders: list[tuple[socket.socket, socket.socket]]) -> None:
        shares = [self.flows // len(senders) + (1 if k < self.flows % len(senders) else 0)
                  for k in range(len(senders))]
        targets = [[(_TARGET.format(i // 250, i % 250 + 1), _PORT) for i in range(n)] for n in shares]
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                limit = _global_max()  # the lab sets it per iteration; the flows run across iterations
                for k, ((udp, netlink), batch) in enumerate(zip(senders, targets)):
                    batch = batch[:per_namespace(len(batch), limit)]
                    # last second's flows go, so a namespace never holds more than its share
                    flush_table(netlink)
                    self.flushes += 1
                    if k == 0:  # the (now empty) listing reaps the machine's expired entries
                        dump_table(netlink)
                    for sent, target in enumerate(batch):
                        try:
                            udp.sendto(b"\0", target)
                        except PermissionError:  # its table is full: the max was lowered meanwhile
                            break  # (the lab sets it between two reads): fewer flows this second
                    else:
                        sent = len(batch)
                    self.sent += sent
                self._stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))
        except Exception as exc:  # the thread's end: said in the marker, raised by whoever relies on it
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("background flows in %s stopped: %s", self.netns, self.error)
            self._announce("failed")
        finally:
            for pair in senders:
                for sock in pair:
                    sock.close()

    def _announce(self, status: str) -> None:
        atomic_write(marker_path(self.dir), json.dumps({
            "pid": os.getpid(), "netns": self.netns, "namespaces": self.namespaces,
            "flows": self.flows, "started": self.started, "warm_at": (self.started or time.time()) + self.warm_s,
            "status": status, "error": self.error}).encode())

    def _drop_marker(self) -> None:
        try:
            info = json.loads(marker_path(self.dir).read_text())
            if info.get("netns") == self.netns:
                marker_path(self.dir).unlink(missing_ok=True)
        except (FileNotFoundError, ValueError):
            pass

    def check(self) -> None:
        """Raise :class:`~labkit.exceptions.TestbedError` if the sender stopped on an error."""
        if self.error is not None:
            raise TestbedError(f"background flows in {self.netns} stopped: {self.error}")


def wait_until_warm(warm_at: float, on_wait=None) -> float:
    """Sleep until ``warm_at`` (a time.time()); returns the seconds slept."""
    left = warm_at - time.time()
    if left <= 0:
        return 0.0
    if on_wait:
        on_wait(f"background flows: waiting {left:.0f} s for the kernel's conntrack garbage collector "
                "to take up their cycle (its first pass after an idle spell can be 60 s away)")
    time.sleep(left)
    return left


@contextmanager
def ensure(flows: int | None, *, directory: Path | None = None, on_wait=None,
           wait: bool = True) -> Iterator[dict | None]:
    """Background flows for the length of the block: the machine's own if running, else new ones.

    Waits until they are warm, unless ``wait`` is False.  ``flows`` None or 0: none (yields None).

    Yields:
        The marker of the flows in use.

    Raises:
        TestbedError: the flows a live run keeps for this machine (a replay's) have failed:
            new ones would have to wait a minute for the garbage collector, so the
            iteration fails now, with their reason.
    """
    if not flows:
        yield None
        return
    reason = failure(directory)
    if reason is not None:
        raise TestbedError(f"the background flows of this run stopped: {reason}")
    info = running(directory)
    if info is not None:
        if wait:
            wait_until_warm(float(info["warm_at"]), on_wait)
        yield info
        return
    own = BackgroundFlows(flows, directory=directory).start()
    try:
        if wait:
            own.wait_warm(on_wait)
        yield running(directory)
        own.check()
    finally:
        own.stop()


@contextmanager
def watch(info: dict | None, *, directory: Path | None = None,
          on_failure: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Watch the flows of ``info`` while the block runs; on their failure, stop the block at once.

    A thread reads their marker every :data:`WATCH_EVERY_S`; when it says failed (or is
    gone), ``on_failure(reason)`` is called once.  The default interrupts the main thread
    (SIGINT to it), so a load under way there ends with its usual clean-up; the block then
    raises :class:`~labkit.exceptions.TestbedError` with the flows' reason instead of
    :class:`KeyboardInterrupt`.

    Yields:
        A dict whose ``"reason"`` is set when the flows failed.
    """
    state: dict = {"reason": None}
    if not info:
        yield state
        return
    stop = threading.Event()
    main = threading.main_thread().ident

    def fire(reason: str) -> None:
        state["reason"] = reason
        if on_failure is not None:
            on_failure(reason)
        elif main is not None:
            signal.pthread_kill(main, signal.SIGINT)

    def loop() -> None:
        while not stop.wait(WATCH_EVERY_S):
            marker = _marker(directory)  # one read a poll
            reason = _failure(marker)
            if reason is None and _running(marker) is None:
                reason = "they are no longer running (their process or namespaces are gone)"
            if reason is not None:
                fire(reason)
                return

    thread = threading.Thread(target=loop, name="labkit-background-watch", daemon=True)
    thread.start()
    try:
        yield state
    except KeyboardInterrupt:
        if state["reason"] is None:
            raise
        raise TestbedError(f"the background flows stopped during the load: {state['reason']}") from None
    finally:
        stop.set()
        thread.join(timeout=2)
    if state["reason"] is not None:
        raise TestbedError(f"the background flows stopped during the load: {state['reason']}")
