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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from labkit.exceptions import StateCorrupt, TestbedError
from labkit.host import NETNS_DIR, LocalHost

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"


class Ledger:
    """The ledger of one run.

    Args:
        directory: the run's state directory (made on first record).
        before_record: called before each record (e.g. to act on a pending signal).
        salvage: read a damaged ledger anyway, skipping its unreadable lines (``labkit
            clean``); otherwise a damaged ledger raises :class:`StateCorrupt`.
    """

    def __init__(self, directory: str | os.PathLike, before_record: Callable[[], None] | None = None,
                 *, salvage: bool = False):
        self.dir = Path(directory)
        self.path = self.dir / LEDGER_NAME
        self._before_record = before_record
        self.salvage = salvage
        self.damaged: list[int] = []  # line numbers skipped while salvaging

    def _append(self, entry: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
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

    def _lines(self) -> Iterator[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
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
        self.path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def describe(entry: dict[str, Any]) -> str:
    """A short text naming a ledger entry."""
    kind = entry.get("kind")
    ident = entry.get("name") or entry.get("path") or entry.get("dir") or ""
    where = f" in {entry['netns']}" if entry.get("netns") else ""
    return f"{kind} {ident}{where}".strip()


# --- removers: each checks the resource is there and is ours, then removes it ------

_local = LocalHost("init")


def netns_inode(name: str) -> int | None:
    """The inode of a named network namespace (None when there is none)."""
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def _remove_netns(entry: dict, ledger: Ledger) -> None:
    name = entry["name"]
    inode = netns_inode(name)
    if inode is None:
        return
    if entry.get("inode") and entry["inode"] != inode:
        log.warning("namespace %s is not the one this run made (inode %s, recorded %s): left alone",
                    name, inode, entry["inode"])
        return
    _local.run(["ip", "netns", "del", name], timeout=30)


def _remove_link(entry: dict, ledger: Ledger) -> None:
    netns = entry["netns"]
    if netns_inode(netns) is None:
        return  # gone with its namespace
    if entry.get("netns_inode") and entry["netns_inode"] != netns_inode(netns):
        return
    res = _local.run(["ip", "-n", netns, "link", "del", entry["name"]], check=False, timeout=30)
    if not res.ok and "Cannot find device" not in res.stderr and "does not exist" not in res.stderr:
        res.check()


def proc_start_time(pid: int) -> int | None:
    """A live process's start time in clock ticks since boot (/proc/PID/stat field 22).

    None when the process is gone or has exited (a zombie nobody reaped yet).
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _kill(pid: int, start: int | None) -> None:
    if start is not None and proc_start_time(pid) != start:
        return  # gone, or the pid was reused by another process
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_process(entry: dict, ledger: Ledger) -> None:
    if entry.get("pid"):
        _kill(entry["pid"], entry.get("start"))
        deadline = time.monotonic() + 5
        while proc_start_time(entry["pid"]) == entry.get("start") and time.monotonic() < deadline:
            _reap(entry["pid"])
            time.sleep(0.01)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _remove_cgroup(entry: dict, ledger: Ledger) -> None:
    from labkit.cgroups import remove_cgroup
    remove_cgroup(entry["path"])


def _remove_path(entry: dict, ledger: Ledger) -> None:
    path = Path(entry["path"])
    if not path.resolve().is_relative_to(ledger.dir.resolve()):
        raise TestbedError(f"refusing to remove {path}: outside the run directory {ledger.dir}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_global_sysctls(entry: dict, ledger: Ledger) -> None:
    from labkit.sysctls import CLAIM_PATH, GlobalSysctls
    GlobalSysctls(entry.get("owner", "clean"), directory=Path(entry["dir"]),
                  claim_path=entry.get("claim", CLAIM_PATH)).restore(defaults_if_unreadable=ledger.salvage)


REMOVERS: dict[str, Callable[[dict, Ledger], None]] = {
    "netns": _remove_netns,
    "link": _remove_link,
    "process": _remove_process,
    "cgroup": _remove_cgroup,
    "path": _remove_path,
    "global-sysctls": _remove_global_sysctls,
}
