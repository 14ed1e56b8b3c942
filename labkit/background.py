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

The collector is the kernel's, so the flows must run on the machine whose kernel
is the lab's node: the testbed's machine (a :class:`~labkit.host.Host`, this one
or one reached over SSH).  They are one process there, ``python -m
labkit.background`` (:func:`main`), started detached through ``Host.spawn``:
the same on this machine as on another.  Its folder ``netns-bg-<token>/`` in the
state directory (on that machine) holds its ledger (the namespaces, so that
``labkit clean`` removes them after a crash), its marker ``background-flows.json``
(pid and start time, when warm, ``status``, and why it failed) and a lease its
owner renews every :data:`RENEW_S`: when the owner is gone (a crashed replay,
a lost SSH connection) the flows end by themselves within :data:`LEASE_S`.  All
of it is read through the Host.

The worker picks up the new cycle at its next pass, at most 60 s after the
flows start (:data:`WARM_S`); :meth:`BackgroundFlows.wait_warm` waits for that.
Loads whose tables never fill need not wait (the listing reaps from the first
second): a replay's machine check and the plain server of iteration 1 run
meanwhile.
Flows are used only by whoever started them: a replay starts one set and keeps it
for all its iterations, in its own state folder, where its notebooks find it
(:func:`find`) and pass it on (``ensure(use=...)``); a single ``labkit run``
starts its own (see :func:`ensure`), never using, nor failing on, another run's.
When the sender fails, it says so in its marker (``status: failed`` and the
reason) and removes its namespaces: :func:`ensure` and :func:`watch` raise it to
the iteration that relies on the flows, and the replay driver starts fresh ones
for the next iteration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import string
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from labkit.exceptions import LabkitError, TestbedError
from labkit.host import Host, LocalHost, NetnsHost, in_netns
from labkit.ledger import Ledger
from labkit.machine import parse_proc_start
from labkit.sysctls import state_dir
from labkit.util import atomic_write

log = logging.getLogger(__name__)

WARM_S = 61.0  # GC_SCAN_INTERVAL_MAX (60 s) and a second: the worker has seen the flows by then
UDP_TIMEOUT_S = 2  # in the flows' own namespaces: longer than the 1 s between flushes
PER_NAMESPACE = 250  # flows per namespace: far below any lab max (early eviction starts at 95 %)
MAX_SHARE = 0.4  # ... and never more than this share of the global max in force (a slow machine's is small)
MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"
MARKER_NAME = "background-flows.json"
LEASE_NAME = "lease"
LOG_NAME = "flows.log"
DIR_PREFIX = "netns-bg-"  # ``labkit clean`` undoes the ledgers of netns-* state folders
WATCH_EVERY_S = 0.25
REMOTE_WATCH_EVERY_S = 1.0  # on another machine: one command a poll
LEASE_S = 30.0  # the flows end by themselves when their owner has not renewed the lease for this long
RENEW_S = 5.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LAUNCH: Sequence[str] = ("-m", "labkit.background")  # what the machine's python runs (a test may wrap it)
_TARGET = "127.1.{}.{}"
_PORT = 9  # discard: nothing listens, the kernel answers nothing we wait for

# ctnetlink: IPCTNL_MSG_CT_DELETE without a tuple empties the namespace's table
_NETLINK_NETFILTER = 12
_CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
_CT_GET = (1 << 8) | 1  # ... | IPCTNL_MSG_CT_GET
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 1, 4, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3

_here = LocalHost("init")


def marker_path(folder: str | os.PathLike) -> Path:
    """Where the flows of ``folder`` (their ``netns-bg-<token>/``) announce themselves."""
    return Path(folder) / MARKER_NAME


def namespaces_for(token: str, flows: int) -> list[str]:
    """The namespaces of a set of flows: ``lkbg<token><k>``, at most :data:`PER_NAMESPACE` flows each."""
    return [f"lkbg{token}{k}" for k in range(math.ceil(int(flows) / PER_NAMESPACE))]


def _folder_of(flows: "dict | str | os.PathLike | BackgroundFlows") -> Path:
    if isinstance(flows, BackgroundFlows):
        return flows.folder
    if isinstance(flows, dict):
        return Path(flows["folder"])
    return Path(flows)


def _log_tail(folder: Path, host: Host) -> str:
    try:
        lines = host.read_file(str(folder / LOG_NAME)).decode(errors="replace").strip().splitlines()
    except (OSError, LabkitError):
        return ""
    return lines[-1].strip() if lines else ""


_REMOTE_READ = (
    'm="$1/background-flows.json"; cat -- "$m" 2>/dev/null; printf "\\n@@\\n"; '
    'p=$(sed -n \'s/^{"pid": \\([0-9]*\\).*/\\1/p\' "$m" 2>/dev/null); '
    '[ -n "$p" ] && cat "/proc/$p/stat" 2>/dev/null; printf "\\n@@\\n"; tail -n 1 "$1/flows.log" 2>/dev/null; exit 0')
"""One command: the marker, its process's ``/proc/PID/stat`` and the log's last line (``@@`` between).
On another machine the flows are watched from threads, and an SSH host's one SFTP session must not
be shared by threads (paramiko hands one thread's answer to another): commands have channels of their own."""


def _read(folder: Path, host: Host) -> tuple[str, dict | None, str | None]:
    """``(kind, marker, reason)``: kind ``running``, ``starting``, ``failed``, ``ended``, ``missing``
    (no marker: not written yet, or removed when they stopped) or ``unreadable``."""
    path = marker_path(folder)
    stat = tail = None
    try:
        if host.is_local:
            text = host.read_file(str(path))
        else:
            res = host.run(["sh", "-c", _REMOTE_READ, "sh", str(folder)], timeout=30)
            text, stat, tail = (res.stdout.split("\n@@\n") + ["", ""])[:3]
            if not text.strip():
                raise FileNotFoundError(path)
        info = json.loads(text)
        pid, start = int(info["pid"]), info.get("start")
    except FileNotFoundError:
        return "missing", None, f"they are no longer running (they were stopped: {path} is gone)"
    except (OSError, LabkitError, ValueError, KeyError, TypeError) as exc:
        return "unreadable", None, f"their marker {path} cannot be read ({exc})"
    if host.is_local:
        alive = host.proc_start_time(pid)
    else:
        alive = parse_proc_start(stat) if stat and stat.strip() else None
    if alive is None or (start is not None and alive != start):
        tail = _log_tail(folder, host) if tail is None else tail.strip()
        return "ended", None, f"their process (pid {pid}) has ended" + (f": {tail}" if tail else " without a word")
    if info.get("status") == "failed":
        return "failed", None, str(info.get("error") or "no reason recorded")
    if info.get("status") == "running":
        return "running", info, None
    return "starting", None, None


def state(flows: "dict | str | os.PathLike | BackgroundFlows", host: Host | None = None
          ) -> tuple[dict | None, str | None]:
    """``(marker, None)`` while the flows run; ``(None, reason)`` once they failed or are gone.

    ``(None, None)`` while they are still starting.  Read through ``host`` (this machine
    by default): their marker, and whether the process it names still lives.

    Args:
        flows: their folder, their marker, or a :class:`BackgroundFlows`.
        host: the machine they run on.
    """
    _, info, reason = _read(_folder_of(flows), host or _here)
    return info, reason


def running(flows, host: Host | None = None) -> dict | None:
    """The marker of the flows of ``flows`` (folder, marker or handle) while they run, else None."""
    return state(flows, host)[0]


def failure(flows, host: Host | None = None) -> str | None:
    """Why the flows of ``flows`` (folder, marker or handle) stopped; None while they run or start."""
    return state(flows, host)[1]


def find(directory: str | os.PathLike, host: Host | None = None) -> Path | None:
    """The folder of the flows kept in a state directory of their owner's (a replay's); the newest set.

    A replay keeps its flows in its own state folder, so its notebooks find exactly
    them here; None when there are none.
    """
    host = host or _here
    sets = sorted((mtime, name) for name, is_dir, mtime in host.entries(directory)
                  if is_dir and name.startswith(DIR_PREFIX))
    return Path(directory) / sets[-1][1] if sets else None


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


class _Sender:
    """The flows process's work (see :func:`main`): namespaces, the loop, the marker, the clean-up."""

    def __init__(self, flows: int, folder: Path, warm_s: float, lease_s: float):
        self.flows, self.folder, self.warm_s, self.lease_s = flows, Path(folder), warm_s, lease_s
        self.namespaces = namespaces_for(self.folder.name[len(DIR_PREFIX):], flows)
        self.ledger = Ledger(self.folder)
        self.halt = threading.Event()
        self.started: float | None = None
        self.error: str | None = None

    def run(self) -> int:
        """Make the namespaces, send until told to stop (or the lease lapses), remove everything."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.halt.set())
        try:
            senders: list[tuple[socket.socket, socket.socket]] = []
            try:
                senders = self._make()
                self.started = time.time()
                self._announce("running")
                log.info("background flows: %d/s in %s", self.flows, ", ".join(self.namespaces))
                self._loop(senders)
            except Exception as exc:  # said in the marker: whoever relies on the flows raises it
                self.error = str(exc) if isinstance(exc, TestbedError) else f"{type(exc).__name__}: {exc}"
                log.error("background flows in %s stopped: %s", self.namespaces[0], self.error)
                self._announce("failed")
            finally:
                for pair in senders:
                    for sock in pair:
                        sock.close()
            if self.error is not None:
                self.ledger.undo()  # the namespaces go now; the marker says why until the owner stops us
                while not self.halt.wait(1.0) and self._lease_left() > 0:
                    pass
        finally:
            try:
                self.ledger.undo()
            except TestbedError as exc:  # what is left stays listed in the folder: `labkit clean` removes it
                log.error("background flows: %s", exc)
                raise
            shutil.rmtree(self.folder, ignore_errors=True)
        return 0 if self.error is None else 1

    def _make(self) -> list[tuple[socket.socket, socket.socket]]:
        for name in self.namespaces:
            ident = self.ledger.record("netns", name=name)
            _here.run(["ip", "netns", "add", name], timeout=30)
            self.ledger.note(ident, inode=_here.netns_inode(name))
            ns = NetnsHost(name)
            ns.run(["ip", "link", "set", "lo", "up"], timeout=30)
            # conntrack works in a namespace only once a rule there needs it
            ns.run(["iptables", "-w", "-A", "OUTPUT", "-p", "udp", "-d", "127.1.0.0/16",
                    "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"], timeout=30)
            ns.write_sysctl("net.netfilter.nf_conntrack_udp_timeout", UDP_TIMEOUT_S)
        return [(in_netns(n, socket.socket, socket.AF_INET, socket.SOCK_DGRAM), in_netns(n, _netlink_socket))
                for n in self.namespaces]

    def _lease_left(self) -> float:
        try:
            return self.lease_s - (time.time() - os.stat(self.folder / LEASE_NAME).st_mtime)
        except FileNotFoundError:
            return 0.0

    def _loop(self, senders: list[tuple[socket.socket, socket.socket]]) -> None:
        shares = [self.flows // len(senders) + (1 if k < self.flows % len(senders) else 0)
                  for k in range(len(senders))]
        targets = [[(_TARGET.format(i // 250, i % 250 + 1), _PORT) for i in range(n)] for n in shares]
        while not self.halt.is_set():
            began = time.monotonic()
            if self._lease_left() <= 0:
                log.warning("background flows: their owner has not renewed the lease for %.0f s "
                            "(it ended?): stopping", self.lease_s)
                return
            for name in self.namespaces:
                if not os.path.exists(f"/run/netns/{name}"):
                    raise TestbedError(f"their namespace {name} was removed by someone else")
            limit = _global_max()  # the lab sets it per iteration; the flows run across iterations
            for k, ((udp, netlink), batch) in enumerate(zip(senders, targets)):
                # last second's flows go, so a namespace never holds more than its share
                flush_table(netlink)
                if k == 0:  # the (now empty) listing reaps the machine's expired entries
                    dump_table(netlink)
                for target in batch[:per_namespace(len(batch), limit)]:
                    try:
                        udp.sendto(b"\0", target)
                    except PermissionError:  # its table is full: the lab lowered the max since the
                        break  # read above; the rest of this burst is dropped, the flows go on
            self.halt.wait(max(0.0, 1.0 - (time.monotonic() - began)))

    def _announce(self, status: str) -> None:
        from labkit.cleanup import owner_record  # pid, start, and the machine's boot id: `labkit clean
        # --on` looks for the process where it runs

        atomic_write(marker_path(self.folder), json.dumps({
            **owner_record(), "folder": str(self.folder),
            "netns": self.namespaces[0], "namespaces": self.namespaces, "flows": self.flows,
            "started": self.started, "warm_at": (self.started or time.time()) + self.warm_s,
            "status": status, "error": self.error}).encode())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labkit.background``: one set of flows, until SIGTERM or its lease lapses."""
    parser = argparse.ArgumentParser(prog="python -m labkit.background",
                                     description="Background flows for the conntrack garbage collector "
                                                 "(started by labkit; see labkit/background.py).")
    parser.add_argument("--flows", type=int, required=True, help="new flows per second")
    parser.add_argument("--folder", required=True, help="their state folder (netns-bg-<token>)")
    parser.add_argument("--warm", type=float, default=WARM_S, help="seconds until the collector is on their cycle")
    parser.add_argument("--lease", type=float, default=LEASE_S, help="end when the lease file is this old")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.flows < 1 or not Path(args.folder).name.startswith(DIR_PREFIX):
        parser.error(f"--flows {args.flows} --folder {args.folder}: at least 1 flow, "
                     f"in a folder named {DIR_PREFIX}<token>")
    return _Sender(args.flows, Path(args.folder), args.warm, args.lease).run()


class BackgroundFlows:
    """``flows`` new short-lived UDP flows a second in namespaces of their own, on a machine.

    A handle on the flows process (see the module): :meth:`start` starts it on ``host``
    and waits until it sends, a thread renews its lease meanwhile, :meth:`stop` ends it.

    Args:
        flows: flows per second (the live entries any garbage-collection pass sees).
        host: the machine whose kernel they keep busy (default this one).
        directory: the state directory there (default :func:`labkit.sysctls.state_dir`).
        warm_s: seconds the garbage collector may take to pick up their cycle (default :data:`WARM_S`).
        python: the interpreter there that can import labkit (default this one here,
            ``python3`` on another machine).
    """

    def __init__(self, flows: int, *, host: Host | None = None, directory: str | os.PathLike | None = None,
                 warm_s: float | None = None, python: str | None = None):
        if int(flows) < 1:
            raise ValueError(f"background flows: {flows!r} flows per second; give at least 1")
        warm_s = WARM_S if warm_s is None else warm_s
        if float(warm_s) < 0:
            raise ValueError(f"background flows: warm-up {warm_s!r} s; give 0 or more")
        self.flows = int(flows)
        self.warm_s = float(warm_s)
        self.host = host or _here
        self.python = python or (sys.executable if self.host.is_local else "python3")
        self.dir = Path(directory or state_dir())
        token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        self.folder = self.dir / f"{DIR_PREFIX}{token}"
        self.namespaces = namespaces_for(token, self.flows)
        self.netns = self.namespaces[0]
        self.pid: int | None = None
        self.started: float | None = None
        self._start_ticks: int | None = None
        self._renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self._made = False

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "BackgroundFlows":
        """Start the flows process on the machine, wait until it sends; returns self.

        Raises:
            TestbedError: it failed to start (its reason: its marker, or its log's last line).
        """
        host = self.host
        try:
            host.makedirs(self.folder, 0o700, exist_ok=False)
            self._made = True
            self._renew()
            self.pid = host.spawn([self.python, *LAUNCH, "--flows", str(self.flows), "--folder", str(self.folder),
                                   "--warm", repr(self.warm_s), "--lease", repr(LEASE_S)],
                                  log=str(self.folder / LOG_NAME))
            self._start_ticks = host.proc_start_time(self.pid)
            self._renewer = threading.Thread(target=self._keep, name="labkit-background-lease", daemon=True)
            self._renewer.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                kind, info, reason = _read(self.folder, host)
                if kind == "running":
                    break
                if kind in ("failed", "ended") or (kind == "missing" and not self._alive()):
                    tail = _log_tail(self.folder, host) if kind == "missing" else ""
                    raise TestbedError(f"background flows on {host.name} did not start: "
                                       + (tail or reason or "no reason"))
                if time.monotonic() > deadline:
                    tail = _log_tail(self.folder, host)
                    raise TestbedError(f"background flows on {host.name} did not start within "
                                       f"{START_TIMEOUT_S:g} s" + (f": {tail}" if tail else ""))
                time.sleep(0.05 if host.is_local else 0.2)
        except BaseException:
            self.stop()
            raise
        self.started = float(info["started"])
        log.info("background flows: %d/s in %s on %s (pid %s)", self.flows, ", ".join(self.namespaces),
                 host.name, self.pid)
        return self

    def _alive(self) -> bool:
        if self.pid is None or self._start_ticks is None:
            return False
        return self.host.proc_start_time(self.pid) == self._start_ticks

    def _renew(self) -> None:
        lease = str(self.folder / LEASE_NAME)
        if self.host.is_local:
            self.host.write_file(lease, f"{time.time():.3f}\n".encode())
        else:  # a command, not SFTP: this runs in a thread of its own (see _REMOTE_READ)
            self.host.run(["touch", "--", lease], timeout=30)

    def _keep(self) -> None:
        """Renew the lease every :data:`RENEW_S` until stopped (a failed renewal is retried;
        if they all fail, the flows end and the iteration relying on them says so)."""
        while not self._renewing.wait(RENEW_S):
            try:
                self._renew()
            except (OSError, LabkitError) as exc:
                try:
                    gone = not self.host.exists(self.folder)
                except (OSError, LabkitError):
                    gone = False    # the machine did not answer: keep trying
                if gone:
                    # stopped or removed under us (``labkit clean`` of flows whose process
                    # was killed): nothing is left to renew
                    log.info("background flows %s: their folder is gone; lease no longer renewed", self.netns)
                    return
                log.warning("background flows %s: cannot renew their lease (%s); they end after %g s "
                            "without one", self.netns, exc, LEASE_S)

    @property
    def info(self) -> dict | None:
        """Their marker while they run (None once they failed or stopped)."""
        return running(self.folder, self.host)

    @property
    def error(self) -> str | None:
        """Why they stopped (their marker's reason, or their process ended); None while they run."""
        if self.pid is None:
            return None
        return failure(self.folder, self.host)

    @property
    def failed(self) -> bool:
        """Whether the flows stopped on an error (see :attr:`error`)."""
        return self.error is not None

    def wait_warm(self, on_wait=None) -> float:
        """Sleep until the garbage collector has had its chance to see the flows; returns seconds slept."""
        return wait_until_warm(self.started + self.warm_s if self.started else time.time(), on_wait)

    def stop(self) -> None:
        """End the flows process (it removes its namespaces and folder); idempotent.

        What a killed process left (its ledger lists it) is removed from here.
        """
        self._renewing.set()
        if self._renewer is not None:
            self._renewer.join(timeout=RENEW_S + 5)
        host = self.host
        if self._alive():
            host.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self._alive() and time.monotonic() < deadline:
                host.reap([self.pid])
                time.sleep(0.05)
            if self._alive():
                log.warning("background flows %s: pid %s did not end on SIGTERM; killing it", self.netns, self.pid)
                host.kill(self.pid, signal.SIGKILL)
                while self._alive() and time.monotonic() < deadline + 5:
                    host.reap([self.pid])
                    time.sleep(0.05)
        if self.pid is not None:
            host.reap([self.pid])
        if self._made and host.exists(self.folder):
            Ledger(self.folder, host=host).undo()
            host.remove(self.folder)

    def __enter__(self) -> "BackgroundFlows":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self) -> None:
        """Raise :class:`~labkit.exceptions.TestbedError` if the flows stopped on an error."""
        reason = self.error
        if reason is not None:
            raise TestbedError(f"background flows in {self.netns} stopped: {reason}")


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
def ensure(flows: int | None, *, host: Host | None = None, directory: str | os.PathLike | None = None,
           use: Any = None, python: str | None = None, on_wait=None, wait: bool = True) -> Iterator[dict | None]:
    """Background flows for the length of the block: the caller's own (``use``), else new ones.

    Waits until they are warm, unless ``wait`` is False.  ``flows`` None or 0: none (yields None).
    Flows the caller does not pass are never used, however many run on the machine.

    Args:
        flows: flows per second.
        host, directory, python: where new ones run (see :class:`BackgroundFlows`).
        use: flows the caller owns and keeps (a replay's, found with :func:`find`): their
            folder, marker or handle.

    Yields:
        The marker of the flows in use.

    Raises:
        TestbedError: the flows passed in ``use`` have failed or are gone: new ones would
            have to wait a minute for the garbage collector, so the iteration fails now,
            with their reason; or new ones failed to start.
    """
    if not flows:
        yield None
        return
    host = host or _here
    if use is not None:
        info, reason = state(use, host)
        if info is None:
            raise TestbedError(f"the background flows of this run stopped: {reason or 'they have not started'}")
        if wait:
            wait_until_warm(float(info["warm_at"]), on_wait)
        yield info
        return
    own = BackgroundFlows(flows, host=host, directory=directory, python=python).start()
    try:
        if wait:
            own.wait_warm(on_wait)
        info = own.info
        if info is None:
            own.check()
        yield info
        own.check()
    finally:
        own.stop()


@contextmanager
def watch(info: dict | None, *, host: Host | None = None,
          on_failure: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Watch the flows of ``info`` (their marker) while the block runs; on their failure, stop it at once.

    A thread reads their marker (through ``host``, this machine by default) every
    :data:`WATCH_EVERY_S` (:data:`REMOTE_WATCH_EVERY_S` on another machine); when it says failed (or they are gone), ``on_failure(reason)``
    is called once.  The default interrupts the main thread (SIGINT to it), so a load
    under way there ends with its usual clean-up; the block then raises
    :class:`~labkit.exceptions.TestbedError` with the flows' reason instead of
    :class:`KeyboardInterrupt`.

    Yields:
        A dict whose ``"reason"`` is set when the flows failed.
    """
    result: dict = {"reason": None}
    if not info:
        yield result
        return
    host = host or _here
    stop = threading.Event()
    main_thread = threading.main_thread().ident

    def fire(reason: str) -> None:
        result["reason"] = reason
        if on_failure is not None:
            on_failure(reason)
        elif main_thread is not None:
            signal.pthread_kill(main_thread, signal.SIGINT)

    every = WATCH_EVERY_S if host.is_local else max(WATCH_EVERY_S, REMOTE_WATCH_EVERY_S)

    def loop() -> None:
        while not stop.wait(every):
            try:
                marker, reason = state(info, host)
            except (OSError, LabkitError) as exc:  # the machine cannot be asked: the load's own step says so
                log.warning("background flows: cannot read their state (%s)", exc)
                continue
            if marker is None and reason is None:
                reason = "they are starting again (their marker says so)"
            if reason is not None:
                fire(reason)
                return

    restore = None
    if on_failure is None and threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
        # launched with SIGINT ignored (``nohup cmd &``) or at its default (death): our own
        # interrupt must still end the load, while a stray SIGINT keeps doing what it did
        previous = signal.getsignal(signal.SIGINT)

        def ours(signum, frame):
            if result["reason"] is not None or previous == signal.SIG_DFL:
                raise KeyboardInterrupt("SIGINT")

        restore = signal.signal(signal.SIGINT, ours)
    thread = threading.Thread(target=loop, name="labkit-background-watch", daemon=True)
    thread.start()
    try:
        yield result
    except KeyboardInterrupt:
        if result["reason"] is None:
            raise
        raise TestbedError(f"the background flows stopped during the load: {result['reason']}") from None
    finally:
        stop.set()
        thread.join(timeout=2)
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
    if result["reason"] is not None:
        raise TestbedError(f"the background flows stopped during the load: {result['reason']}")


if __name__ == "__main__":
    sys.exit(main())
