"""Background flows: keep the kernel's conntrack garbage collector on the cycle of a busy node.

On Linux 5.15 and later a conntrack entry whose timeout has run out stays in the
table, and in ``nf_conntrack_count``, until the garbage-collection worker's next
pass reaps it.  One worker serves every namespace; after each pass it sleeps for
about the mean remaining timeout of the entries it saw, from a bias of 100
entries at 60 s (``GC_SCAN_INITIAL_COUNT``, ``GC_SCAN_INTERVAL_MAX`` in
``net/netfilter/nf_conntrack_core.c``).  On a machine whose tables are empty
between two lab loads it sleeps the full 60 s, and a load that starts meanwhile
piles up expired entries until the worker wakes, at a random moment up to a
minute in: most of a 70-second lab load (the article's 10-minute loads hardly
noticed).  See ``docs/kernel-notes.md`` for what that did to the lab.

:class:`BackgroundFlows` gives the machine the steady trickle of short-lived
flows a busy node has: every second it sends ``flows`` UDP datagrams, each a new
flow, to closed ports on the loopback of a namespace of its own, and deletes the
previous second's entries (so that namespace never holds more than ``flows``,
far from any ``nf_conntrack_max`` the lab sets).  Every pass of the worker then
sees that many live entries with a second or two to live and comes back within
seconds, for the lab's loads as for the background.  The flows never leave
their namespace and never touch the node's or the pods' tables; they cost about
3 % of one core (half of it in the ``conntrack -D`` run each second).

The worker picks up the new cycle at its next pass, at most 60 s after the
flows start (:data:`WARM_S`); :meth:`BackgroundFlows.wait_warm` waits for that.
A replay starts the flows once and keeps them for all its iterations; a single
``labkit run`` starts its own when none are running (see :func:`ensure`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import string
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from labkit.exceptions import TestbedError
from labkit.host import LocalHost, NetnsHost, in_netns
from labkit.ledger import Ledger, netns_inode
from labkit.sysctls import state_dir
from labkit.util import atomic_write

log = logging.getLogger(__name__)

WARM_S = 61.0  # GC_SCAN_INTERVAL_MAX (60 s) and a second: the worker has seen the flows by then
UDP_TIMEOUT_S = 2  # in the flows' own namespace: longer than the 1 s between deletions
MARKER_NAME = "background-flows.json"
DIR_PREFIX = "netns-bg-"  # ``labkit clean`` undoes the ledgers of netns-* state folders
_TARGET = "127.1.{}.{}"
_PORT = 9  # discard: nothing listens, the kernel answers nothing we wait for


def marker_path(directory: Path | None = None) -> Path:
    """Where the running flows announce themselves (pid, namespace, when warm)."""
    return Path(directory or state_dir()) / MARKER_NAME


def running(directory: Path | None = None) -> dict | None:
    """The marker of background flows running on this machine, None when there are none."""
    try:
        info = json.loads(marker_path(directory).read_text())
        os.kill(int(info["pid"]), 0)
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError):
        return None
    except PermissionError:
        pass
    return info if netns_inode(info.get("netns", "")) is not None else None


class BackgroundFlows:
    """``flows`` new short-lived UDP flows a second in a namespace of their own.

    Args:
        flows: flows per second (the live entries any garbage-collection pass sees).
        directory: the state directory (default :func:`labkit.sysctls.state_dir`).
    """

    def __init__(self, flows: int, *, directory: Path | None = None):
        if int(flows) < 1:
            raise ValueError(f"background flows: {flows!r} flows per second; give at least 1")
        self.flows = int(flows)
        self.dir = Path(directory or state_dir())
        token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        self.netns = f"lkbg{token}"
        self.ledger = Ledger(self.dir / f"{DIR_PREFIX}{token}")
        self.started: float | None = None
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "BackgroundFlows":
        """Make the namespace, start sending, announce the flows; returns self."""
        ident = self.ledger.record("netns", name=self.netns)
        try:
            LocalHost("init").run(["ip", "netns", "add", self.netns], timeout=30)
            self.ledger.note(ident, inode=netns_inode(self.netns))
            ns = NetnsHost(self.netns)
            ns.run(["ip", "link", "set", "lo", "up"], timeout=30)
            # conntrack works in a namespace only once a rule there needs it
            ns.run(["iptables", "-w", "-A", "OUTPUT", "-p", "udp", "-d", "127.1.0.0/16",
                    "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"], timeout=30)
            ns.write_sysctl("net.netfilter.nf_conntrack_udp_timeout", UDP_TIMEOUT_S)
            self._thread = threading.Thread(target=self._loop, name="labkit-background-flows", daemon=True)
            self._thread.start()
            self.started = time.time()
            atomic_write(marker_path(self.dir), json.dumps({
                "pid": os.getpid(), "netns": self.netns, "flows": self.flows,
                "started": self.started, "warm_at": self.started + WARM_S}).encode())
        except BaseException:
            self.stop()
            raise
        log.info("background flows: %d/s in %s", self.flows, self.netns)
        return self

    def wait_warm(self, on_wait=None) -> float:
        """Sleep until the garbage collector has had its chance to see the flows; returns seconds slept."""
        return wait_until_warm(self.started + WARM_S if self.started else time.time(), on_wait)

    def stop(self) -> None:
        """Stop sending, remove the namespace and the marker; idempotent."""
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

    def _loop(self) -> None:
        try:
            sock = in_netns(self.netns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
            targets = [(_TARGET.format(i // 250, i % 250 + 1), _PORT) for i in range(self.flows)]
            ns = NetnsHost(self.netns)
            with sock:
                while not self._stop.is_set():
                    began = time.monotonic()
                    # last second's flows go, so the namespace never holds more than `flows`;
                    # conntrack exits 1 when there was nothing to delete (the first round)
                    deleted = ns.run(["conntrack", "-D", "-p", "udp", "--orig-port-dst", str(_PORT)],
                                     timeout=10, check=False)
                    if not deleted.ok and "0 flow entries" not in deleted.stderr:
                        deleted.check()
                    for target in targets:
                        sock.sendto(b"\0", target)
                    self.sent += len(targets)
                    self._stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))
        except BaseException as exc:  # raised by check(); the marker goes so no one relies on them
            self._error = exc
            self._drop_marker()

    def _drop_marker(self) -> None:
        try:
            info = json.loads(marker_path(self.dir).read_text())
            if info.get("netns") == self.netns:
                marker_path(self.dir).unlink(missing_ok=True)
        except (FileNotFoundError, ValueError):
            pass

    def check(self) -> None:
        """Raise :class:`~labkit.exceptions.TestbedError` if the sender stopped on an error."""
        if self._error is not None:
            raise TestbedError(f"background flows in {self.netns} stopped: {self._error}")


def wait_until_warm(warm_at: float, on_wait=None) -> float:
    """Sleep until ``warm_at`` (a time.time()); returns the seconds slept."""
    left = warm_at - time.time()
    if left <= 0:
        return 0.0
    if on_wait:
        on_wait(f"background flows: waiting {left:.0f} s for the kernel's conntrack garbage collector "
                "to take up their cycle")
    time.sleep(left)
    return left


@contextmanager
def ensure(flows: int | None, *, directory: Path | None = None, on_wait=None) -> Iterator[dict | None]:
    """Background flows for the length of the block: the machine's own if running, else new ones.

    Waits until they are warm.  ``flows`` None or 0: none (yields None).

    Yields:
        The marker of the flows in use.
    """
    if not flows:
        yield None
        return
    info = running(directory)
    if info is not None:
        wait_until_warm(float(info["warm_at"]), on_wait)
        yield info
        return
    own = BackgroundFlows(flows, directory=directory).start()
    try:
        own.wait_warm(on_wait)
        yield running(directory)
        own.check()
    finally:
        own.stop()

