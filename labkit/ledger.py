"""A run's ledger: every resource is written down before it is made, and undone exactly.

The ledger is an append-only JSON-lines file in the run's state directory.
``record`` appends a resource (kind and identity) and fsyncs *before* the
caller creates it; ``note`` adds what is only known afterwards (a namespace's
inode, a process's pid and start time) so that removal can check it is still
the same object; ``forget`` marks a resource removed.  ``undo`` removes the
live resources in reverse order, skipping what no longer exists, so it is exact
and idempotent: a crash between ``record`` and the creation leaves an entry
whose removal finds nothing to do.  Nothing that is not in a ledger is ever
removed: a look-alike namespace or link made by someone else stays.

A ledger lives on the machine whose resources it lists (``host``, this one by
default): its file is written and its resources are removed through that
machine's :class:`~labkit.host.Host`, so a testbed built over SSH keeps its
ledger there too.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from labkit.exceptions import StateCorrupt, TestbedError
from labkit.host import Host, LocalHost

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"


class Ledger:
    """The ledger of one run.

    Args:
        directory: the run's state directory (made on first record).
        before_record: called before each record (e.g. to act on a pending signal).
        salvage: read a damaged ledger anyway, skipping its unreadable lines (``labkit
            clean``); otherwise a damaged ledger raises :class:`StateCorrupt`.
        host: the machine the ledger and its resources are on (this one by default).
    """

    def __init__(self, directory: str | os.PathLike, before_record: Callable[[], None] | None = None,
                 *, salvage: bool = False, host: Host | None = None):
        self.dir = Path(directory)
        self.path = self.dir / LEDGER_NAME
        self._before_record = before_record
        self.salvage = salvage
        self.host = host or _local
        self.damaged: list[int] = []  # line numbers skipped while salvaging

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        if not self.host.is_local:
            self._append_remote(line)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # a torn last line (a crash mid-append) named nothing that was made: drop it,
                # never glue a record onto it
                tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                cut = tail.rfind(b"\n")
                os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else 0)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append_remote(self, line: bytes) -> None:
        """:meth:`_append` on another machine: a torn last line is cut (rewriting the file) first."""
        try:
            data = self.host.read_file(str(self.path))
        except FileNotFoundError:
            data = b""
        if data and not data.endswith(b"\n"):
            self.host.atomic_write(self.path, data[:data.rfind(b"\n") + 1], mode=0o600)
        self.host.append_file(self.path, line)

    def _lines(self) -> Iterator[dict[str, Any]]:
        try:
            data = self.host.read_file(str(self.path))
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        self.damaged = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict) or entry.get("op") not in ("create", "note", "removed") \
                        or (entry["op"] == "create" and entry.get("kind") not in REMOVERS):
                    raise ValueError("not a ledger record")
            except (ValueError, UnicodeDecodeError) as exc:
                if number == len(lines):
                    # the last line without its newline: a crash mid-append; it names nothing made yet
                    log.debug("%s: ignoring a torn last line", self.path)
                    continue
                if not self.salvage:
                    raise StateCorrupt(self.path, f"line {number} is not a ledger record: {exc}") from None
                self.damaged.append(number)
                continue
            yield entry
        if self.damaged:
            log.warning("%s: skipped %d damaged line(s) (first: line %d)", self.path,
                        len(self.damaged), self.damaged[0])

    def record(self, kind: str, **identity: Any) -> int:
        """Write a resource down before creating it; return its id.

        Args:
            kind: one of :data:`REMOVERS`.
            identity: what names it (netns, name, path...).
        """
        if kind not in REMOVERS:
            raise ValueError(f"unknown ledger kind {kind!r}")
        if self._before_record is not None:
            self._before_record()
        ident = sum(1 for e in self._lines() if e.get("op") == "create") + 1
        self._append({"op": "create", "id": ident, "kind": kind, "time": time.time(), **identity})
        return ident

    def note(self, ident: int, **facts: Any) -> None:
        """Add facts learnt after creation (inode, pid, start time) to resource ``ident``."""
        self._append({"op": "note", "id": ident, **facts})

    def forget(self, ident: int) -> None:
        """Mark resource ``ident`` removed."""
        self._append({"op": "removed", "id": ident})

    def entries(self) -> list[dict[str, Any]]:
        """The live resources (recorded, not removed), with their notes, in creation order."""
        live: dict[int, dict[str, Any]] = {}
        for e in self._lines():
            op, ident = e.get("op"), e.get("id")
            if op == "create":
                live[ident] = {k: v for k, v in e.items() if k != "op"}
            elif op == "note" and ident in live:
                live[ident].update({k: v for k, v in e.items() if k not in ("op", "id")})
            elif op == "removed":
                live.pop(ident, None)
        return list(live.values())

    def remove(self, entry: dict[str, Any]) -> None:
        """Remove one resource (if it still exists and is still ours) and mark it removed."""
        REMOVERS[entry["kind"]](entry, self)
        self.forget(entry["id"])

    def undo(self, select: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Remove the live resources in reverse order of creation.

        Args:
            select: only those for which it returns True (all by default).

        Returns:
            The entries removed.

        Raises:
            TestbedError: some could not be removed (the others were); the ledger keeps them.
        """
        done, failed = [], []
        for entry in reversed(self.entries()):
            if select is not None and not select(entry):
                continue
            try:
                self.remove(entry)
                done.append(entry)
            except Exception as exc:  # go on with the rest; report them all at the end
                log.error("could not remove %s: %s", describe(entry), exc)
                failed.append(f"{describe(entry)}: {exc}")
        if failed:
            raise TestbedError("could not remove: " + "; ".join(failed))
        return done

    def discard(self) -> None:
        """Delete the ledger file and the run directory once nothing is live."""
        if self.entries():
            raise TestbedError(f"{self.path}: resources are still live; undo them first")
        self.host.remove(self.path)
        try:
            self.host.rmdir(self.dir)
        except OSError:
            pass


def describe(entry: dict[str, Any]) -> str:
    """A short text naming a ledger entry."""
    kind = entry.get("kind")
    ident = entry.get("name") or entry.get("path") or entry.get("dir") or ""
    where = f" in {entry['netns']}" if entry.get("netns") else ""
    return f"{kind} {ident}{where}".strip()


# --- removers: each checks the resource is there and is ours, then removes it ------
# Each acts on the ledger's machine (``ledger.host``).

_local = LocalHost("init")


def netns_inode(name: str, host: Host | None = None) -> int | None:
    """The inode of a named network namespace of ``host`` (this machine by default); None when none."""
    return (host or _local).netns_inode(name)


def _remove_netns(entry: dict, ledger: Ledger) -> None:
    name, host = entry["name"], ledger.host
    inode = host.netns_inode(name)
    if inode is None:
        return
    if entry.get("inode") and entry["inode"] != inode:
        log.warning("namespace %s is not the one this run made (inode %s, recorded %s): left alone",
                    name, inode, entry["inode"])
        return
    host.run(["ip", "netns", "del", name], timeout=30)


def _remove_link(entry: dict, ledger: Ledger) -> None:
    netns, host = entry["netns"], ledger.host
    inode = host.netns_inode(netns)
    if inode is None:
        return  # gone with its namespace
    if entry.get("netns_inode") and entry["netns_inode"] != inode:
        return
    res = host.run(["ip", "-n", netns, "link", "del", entry["name"]], check=False, timeout=30)
    if not res.ok and "Cannot find device" not in res.stderr and "does not exist" not in res.stderr:
        res.check()


def proc_start_time(pid: int, host: Host | None = None) -> int | None:
    """A live process's start time in clock ticks since boot (/proc/PID/stat field 22).

    None when the process is gone or has exited (a zombie nobody reaped yet).
    """
    return (host or _local).proc_start_time(pid)


def _remove_process(entry: dict, ledger: Ledger) -> None:
    pid, start, host = entry.get("pid"), entry.get("start"), ledger.host
    if not pid:
        return
    if start is not None and host.proc_start_time(pid) != start:
        return  # gone, or the pid was reused by another process
    host.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while host.proc_start_time(pid) == start and time.monotonic() < deadline:
        host.reap([pid])
        time.sleep(0.01)
    host.reap([pid])


def _remove_cgroup(entry: dict, ledger: Ledger) -> None:
    from labkit.cgroups import remove_cgroup
    remove_cgroup(entry["path"], host=ledger.host)


def _remove_path(entry: dict, ledger: Ledger) -> None:
    path = posixpath.normpath(entry["path"])
    base = posixpath.normpath(str(ledger.dir))
    if ledger.host.is_local:
        path, base = str(Path(path).resolve()), str(ledger.dir.resolve())
    if not (path == base or path.startswith(base.rstrip("/") + "/")):
        raise TestbedError(f"refusing to remove {entry['path']}: outside the run directory {ledger.dir}")
    ledger.host.remove(entry["path"])


def _remove_global_sysctls(entry: dict, ledger: Ledger) -> None:
    from labkit.sysctls import CLAIM_PATH, GlobalSysctls
    GlobalSysctls(entry.get("owner", "clean"), host=ledger.host, files=ledger.host, directory=Path(entry["dir"]),
                  claim_path=entry.get("claim", CLAIM_PATH)).restore(defaults_if_unreadable=ledger.salvage)


REMOVERS: dict[str, Callable[[dict, Ledger], None]] = {
    "netns": _remove_netns,
    "link": _remove_link,
    "process": _remove_process,
    "cgroup": _remove_cgroup,
    "path": _remove_path,
    "global-sysctls": _remove_global_sysctls,
}
