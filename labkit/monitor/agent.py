"""The monitor's remote agent: one process samples several namespaces and streams rows.

On a Vagrant or SSH testbed the node runs this agent (``python3 agent.pyz
--target node=- --target pod-1=/proc/4242/ns/net ...``, uploaded over SFTP as a
zip of the standard-library-only monitor modules), and its stdout comes back
over one SSH channel as JSON lines:

    {"type": "hello", "host": "node1", "own_inode": 4026531833, "netns": {"node": 4026531833}, ...}
    {"type": "tick", "t": 1764158400.1, "role": "node", "values": {"nf_conntrack_count": 812, ...}}
    {"type": "event", "t": 1764158400.2, "kind": "table_full", "message": "...", "inode": 4026532246, ...}
    {"type": "end", "records": 120, "lost": 0}

The agent ends when its stdout is closed (the SSH channel: the next write
fails), on SIGTERM/SIGINT, after ``--duration`` seconds, or when a sampler
fails (an ``error`` line, exit status 1).

The same module holds the client side, :class:`AgentSession`, which uploads and
starts the agent through a :class:`~labkit.host.Host` and hands rows to callbacks.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from labkit.exceptions import LabkitError, MonitorError
from labkit.monitor.parse import KernelEvent
from labkit.monitor.sampler import KmsgFollower, NetnsSampler, NetnsTarget, Tick

log = logging.getLogger(__name__)

#: Files of the labkit package the agent needs (standard library only).
AGENT_MODULES = ("exceptions.py", "monitor/__init__.py", "monitor/parse.py",
                 "monitor/sampler.py", "monitor/agent.py")
# labkit/__init__.py imports the rest of labkit; the agent needs none of it.
_PACKAGE_INIT = '"""labkit, reduced to the monitor agent (standard library only)."""\n'
_MAIN = "import sys\nfrom labkit.monitor.agent import main\nsys.exit(main())\n"


def parse_target(text: str) -> NetnsTarget:
    """Parse ``ROLE=PATH`` (``PATH`` ``-`` for the agent's own namespace).

    Raises:
        MonitorError: no ``=``, or an empty role.
    """
    role, sep, path = text.partition("=")
    if not sep or not role.strip():
        raise MonitorError(f"--target {text!r}: expected ROLE=PATH (PATH '-' for the own namespace), "
                           "e.g. node=- or pod-1=/proc/4242/ns/net")
    return NetnsTarget(role.strip(), None if path in ("", "-") else path)


class _Writer:
    """JSON lines to a stream, one lock; remembers when the reader went away."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def write(self, obj: dict) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self.lock:
            if self.closed.is_set():
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.closed.set()


def run_agent(targets: Sequence[NetnsTarget], *, hz: float, kmsg: bool, duration: float | None,
              out: Any, stop: threading.Event | None = None) -> int:
    """Sample ``targets`` and follow the kernel log, writing JSON lines to ``out``.

    Args:
        stop: set it to end the run (the command line sets it on SIGTERM/SIGINT).

    Returns:
        0 when stopped normally, 1 when a sampler or the follower failed.
    """
    writer = _Writer(out)
    stop = stop or threading.Event()
    roles = {t.role: t.inode() for t in targets}
    own = os.stat("/proc/self/ns/net").st_ino

    def on_tick(tick: Tick) -> None:
        writer.write({"type": "tick", "t": tick[0], "role": tick[1], "values": tick[2]})

    def on_event(wall: float, event: KernelEvent) -> None:
        writer.write({"type": "event", "t": wall, "kind": event.kind, "message": event.message,
                      "inode": event.netns_inode, "suppressed": event.suppressed,
                      "seq": event.seq, "usec": event.usec})

    threads: list[Any] = []
    if kmsg:
        threads.append(KmsgFollower(on_event, stop))
    threads += [NetnsSampler(t, hz, on_tick, stop) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.ready.wait(10)
    # hello once every namespace has its first sample: the client's start() returns then
    writer.write({"type": "hello", "host": socket.gethostname(), "own_inode": own, "netns": roles,
                  "hz": hz, "pid": os.getpid()})
    deadline = None if duration is None else time.monotonic() + duration
    status = 0
    while not stop.is_set():
        failed = [t for t in threads if t.error is not None]
        if failed:
            for t in failed:
                writer.write({"type": "error", "thread": t.name, "message": str(t.error)})
            status = 1
            break
        if writer.closed.is_set() or (deadline is not None and time.monotonic() >= deadline):
            break
        stop.wait(0.1)
    stop.set()
    for thread in threads:
        thread.join(5)
    follower = threads[0] if kmsg else None
    writer.write({"type": "end", "records": getattr(follower, "records", 0),
                  "lost": getattr(follower, "lost", 0)})
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the agent (``python -m labkit.monitor.agent`` or the uploaded zip)."""
    parser = argparse.ArgumentParser(prog="labkit-monitor-agent",
                                     description="Sample conntrack in namespaces; JSON lines on stdout.")
    parser.add_argument("--target", action="append", default=[], metavar="ROLE=PATH",
                        help="a namespace to sample (PATH: /run/netns/NAME, /proc/PID/ns/net, - for own)")
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--no-kmsg", action="store_true", help="do not follow /dev/kmsg")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    out = io.TextIOWrapper(os.fdopen(os.dup(1), "wb", buffering=0), encoding="utf-8", write_through=True)
    try:
        targets = [parse_target(t) for t in args.target] or [NetnsTarget("init")]
        return run_agent(targets, hz=args.hz, kmsg=not args.no_kmsg, duration=args.duration,
                         out=out, stop=stop)
    except LabkitError as exc:
        _Writer(out).write({"type": "error", "thread": "main", "message": str(exc)})
        return 1


def build_agent_zip() -> bytes:
    """A runnable zip (``python3 agent.pyz ...``) of the agent and what it imports."""
    root = Path(__file__).resolve().parent.parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__main__.py", _MAIN)
        zf.writestr("labkit/__init__.py", _PACKAGE_INIT)
        for name in AGENT_MODULES:
            zf.write(root / name, f"labkit/{name}")
    return buf.getvalue()


class _LocalStream:
    """The agent run locally (for tests and ``agent=True``): lines of its stdout."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stderr = ""

    def __iter__(self) -> Iterable[str]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            yield line.rstrip("\n")
        self.proc.wait()
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def remote_target(role: str, host: Any) -> tuple[Any, NetnsTarget]:
    """Where the agent for ``host`` runs, and the namespace it samples there.

    A host with a ``parent`` (:class:`labkit.remote.SSHNetnsHost`) is a namespace of
    its parent machine: ``netns`` is a name (``/run/netns/NAME``) or ``pid:N``
    (``/proc/N/ns/net``, a container's namespace).  Any other host is sampled in
    its own namespace.
    """
    parent = getattr(host, "parent", None)
    if parent is None:
        return host, NetnsTarget(role, None)
    netns = str(getattr(host, "netns", ""))
    if netns.startswith("pid:"):
        return parent, NetnsTarget(role, f"/proc/{netns[4:]}/ns/net")
    return parent, NetnsTarget(role, f"/run/netns/{netns}")


class AgentSession:
    """One agent on one machine: upload, start, read its lines, stop, clean up.

    Args:
        transport: the machine (a Host with ``stream(cmd)``, e.g. SSHHost; or a
            local host, which runs the agent as a local process).
        targets: namespaces to sample there.
        hz, kmsg: as for the Monitor.
        on_hello, on_tick, on_event: called from the reader thread with the
            decoded JSON objects.
        python: the interpreter on that machine.
    """

    def __init__(self, transport: Any, targets: Sequence[NetnsTarget], *, hz: float, kmsg: bool,
                 on_hello: Callable[[dict], None], on_tick: Callable[[dict], None],
                 on_event: Callable[[dict], None], python: str | None = None):
        self.transport = transport
        self.targets = list(targets)
        self.hz = hz
        self.kmsg = kmsg
        self.on_hello, self.on_tick, self.on_event = on_hello, on_tick, on_event
        self.local = not hasattr(transport, "stream")
        self.python = python or (sys.executable if self.local else "python3")
        self.error: BaseException | None = None
        self.end: dict | None = None
        self.ready = threading.Event()
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._path = f"/tmp/labkit-monitor-agent-{uuid.uuid4().hex[:12]}.pyz"
        self._lock = threading.Lock()
        self._ticks: dict[str, int] = {}

    def argv(self) -> list[str]:
        """The agent's command line on that machine."""
        argv = [self.python, self._path, "--hz", repr(self.hz)]
        if not self.kmsg:
            argv.append("--no-kmsg")
        for t in self.targets:
            argv += ["--target", f"{t.role}={t.path or '-'}"]
        return argv

    def start(self, timeout: float = 30.0) -> None:
        """Upload and start the agent; return once it said hello.

        Raises:
            MonitorError: it could not be started or failed before its first line.
        """
        self.transport.write_file(self._path, build_agent_zip(), 0o600)
        argv = self.argv()
        try:
            self._stream = _LocalStream(argv) if self.local else self.transport.stream(argv)
        except BaseException:
            self.stop()     # removes the uploaded file
            raise
        self._thread = threading.Thread(target=self._read, name="lk-agent-reader", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout) or self.error:
            self.stop()
            raise MonitorError(f"{getattr(self.transport, 'name', 'host')}: the monitor agent did not "
                               f"start: {self.error or 'no hello within %gs' % timeout}")

    def _read(self) -> None:
        try:
            for line in self._stream:
                if not line.strip():
                    continue
                obj = json.loads(line)
                kind = obj.get("type")
                if kind == "tick":
                    self.on_tick(obj)
                    with self._lock:
                        self._ticks[obj["role"]] = self._ticks.get(obj["role"], 0) + 1
                elif kind == "event":
                    self.on_event(obj)
                elif kind == "hello":
                    self.on_hello(obj)
                    self.ready.set()
                elif kind == "error":
                    self.error = MonitorError(f"{getattr(self.transport, 'name', 'host')}: "
                                              f"monitor agent: {obj.get('message')}")
                elif kind == "end":
                    self.end = obj
        except BaseException as exc:  # handed to stop()
            if self.error is None:
                self.error = exc
        finally:
            if not self.ready.is_set() and self.error is None:
                stderr = getattr(self._stream, "stderr", "")
                self.error = MonitorError(f"the agent ended before its first line: {stderr.strip()[-500:]}")
            self.ready.set()

    def stop(self) -> None:
        """Stop the agent once each namespace sent a sample taken after this call; clean up.

        Closing the channel loses what is still in flight, so first wait (at most
        two seconds) until every namespace has sent one more sample.
        """
        if self._stream is not None and self.error is None and self._thread and self._thread.is_alive():
            with self._lock:
                seen = dict(self._ticks)
            deadline = time.monotonic() + max(2.0, 3.0 / self.hz)
            while time.monotonic() < deadline and self._thread.is_alive():
                with self._lock:
                    if all(self._ticks.get(t.role, 0) > seen.get(t.role, 0) for t in self.targets):
                        break
                time.sleep(0.02)
        try:
            if self._stream is not None:
                self._stream.stop()
            if self._thread is not None:
                self._thread.join(15)
        finally:
            try:
                self.transport.run(["rm", "-f", self._path], timeout=30, check=False)
            except LabkitError as exc:
                log.warning("could not remove %s: %s", self._path, exc)


if __name__ == "__main__":
    sys.exit(main())
