"""``labkit clean``: one owner for cleanup, whatever run left state behind.

Every run keeps its state under the state directory (``$LABKIT_STATE_DIR`` or
``/run/labkit``), where this module finds it:

- ``netns-<id>/``: a netns testbed (``labkit up``, ``labkit run``, a notebook);
- ``netns-bg-<token>/``: background flows (:mod:`labkit.background`);
- ``replay-<run-id>/``: a replay; its notebooks' testbeds are ``netns-<id>/`` inside it,
  its own ``ledger.jsonl`` lists the notebook kernels' cgroups and their connection
  files, ``owner.json`` names the replay's process;
- ``global-sysctls.json`` (+ ``.bak``) in any of these: the saved global sysctls.

:func:`clean` undoes each run's ledger in reverse order (servers, loadgens and
kernels live in cgroups the ledgers list, so ending them is exact), restores the
saved global sysctls (the kernel's defaults when both copies are unreadable) and
removes the folders, stale ``.*.tmp`` files included.  A run whose process is still
alive (a replay, background flows, a load) is left alone and reported.  A damaged
ledger is read line by line; what its readable lines and the run's ``state.json``
name is removed, and anything of the run still on the machine is reported by name.

The state directory is on a machine (``clean(..., host=machine)``; this one by
default): every file is read and removed, and every run undone, through that
machine's :class:`~labkit.host.Host` (this one, or one reached over SSH).  An owner
file names a process and the machine it runs on (its boot id and host name): a
process is looked for on this machine or on the state's machine, whichever it is;
one on a third machine is left alone and reported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import cgroups
from labkit.exceptions import LabkitError, TestbedError
from labkit.host import NETNS_DIR, Host, LocalHost
from labkit.ledger import LEDGER_NAME, Ledger, describe, proc_start_time
from labkit.sysctls import STATE_NAME as SYSCTLS_NAME
from labkit.sysctls import restore_crashed
from labkit.sysctls import state_dir as default_state_dir

log = logging.getLogger(__name__)

OWNER_NAME = "owner.json"
REPLAY_PREFIX = "replay-"
NETNS_PREFIX = "netns-"
BG_PREFIX = "netns-bg-"
BG_MARKER = "background-flows.json"
LOAD_NAME = "load.json"
BOOT_ID = "/proc/sys/kernel/random/boot_id"

_here = LocalHost("init")


@dataclass
class CleanReport:
    """What :func:`clean` did.

    Attributes:
        removed: one line per resource removed or value restored.
        kept: runs left alone because their process is alive, with the reason.
        problems: what could not be removed (named), and what to do.
    """

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def owner_alive(path: str | os.PathLike, host: Host | None = None) -> dict[str, Any] | None:
    """The owner recorded in ``path`` on ``host`` (this machine by default) when that process still runs."""
    try:
        return live_owner((host or _here).read_file(os.fspath(path)), host)
    except (FileNotFoundError, NotADirectoryError):
        return None


def live_owner(data: bytes, host: Host | None = None) -> dict[str, Any] | None:
    """The owner an owner file's text names when that process runs.

    The process is looked for on the machine the record names (its ``boot_id``): this
    one, or ``host`` (the machine the file is on); a record without it names a process
    of this machine.  A process of a machine that has rebooted since is gone; one of a
    third machine cannot be looked at: it is returned with ``"elsewhere": True``.
    """
    try:
        info = json.loads(data)
        pid, start = int(info["pid"]), info.get("start")
    except (ValueError, KeyError, TypeError):
        return None
    machine = _owner_machine(info, host)
    if machine is None:
        return None
    if machine == "elsewhere":
        return {**info, "elsewhere": True}
    if machine.is_local and pid == os.getpid():
        return None  # this process: not another run's
    alive = machine.proc_start_time(pid)
    if alive is None or (start is not None and alive != start):
        return None
    return info


def _owner_machine(info: dict[str, Any], host: Host | None) -> Host | str | None:
    """Where an owner record's process runs: a Host, ``"elsewhere"``, or None (rebooted since)."""
    boot = info.get("boot_id")
    if not boot or boot == boot_id():
        return _here
    if host is not None and not host.is_local and boot == boot_id(host):
        return host
    names = {socket.gethostname()} | ({_read_text(host, "/proc/sys/kernel/hostname")} if host else set())
    return None if info.get("machine") in names else "elsewhere"


def boot_id(host: Host | None = None) -> str | None:
    """The boot id of ``host`` (this machine by default): it changes at every boot."""
    if host is None or host.is_local:
        global _BOOT_HERE
        if _BOOT_HERE is None:
            _BOOT_HERE = _read_text(_here, BOOT_ID)
        return _BOOT_HERE
    return _read_text(host, BOOT_ID)


_BOOT_HERE: str | None = None


def _read_text(host: Host, path: str) -> str | None:
    try:
        return host.read_file(path).decode().strip() or None
    except (OSError, LabkitError, UnicodeDecodeError):
        return None


def owner_record() -> dict[str, Any]:
    """``{"pid", "start", "boot_id", "machine"}`` of this process, for an owner file."""
    return {"pid": os.getpid(), "start": proc_start_time(os.getpid()), "boot_id": boot_id(),
            "machine": socket.gethostname()}


def clean(directory: str | os.PathLike | None = None, *, host: Host | None = None) -> CleanReport:
    """Undo every crashed (or abandoned) run recorded under a state directory of a machine.

    Args:
        directory: the state directory; ``$LABKIT_STATE_DIR`` or ``/run/labkit``.
        host: the machine it is on (this one by default), e.g. an
            :class:`~labkit.remote.SSHHost`: its runs, servers, cgroups and global
            sysctls are undone there.

    Returns:
        The :class:`CleanReport`.
    """
    from labkit.testbed.netns import signals_deferred, state_lock

    machine = host or _here
    directory = Path(directory or default_state_dir())
    report = CleanReport()
    if not machine.exists(directory):
        return report
    with state_lock(directory, machine), signals_deferred():
        _Cleaner(machine, report).tree(directory)
    return report


class _Cleaner:
    """:func:`clean` on one machine: every file and resource through its Host."""

    def __init__(self, machine: Host, report: CleanReport):
        self.m, self.report = machine, report

    def ledger(self, directory: Path) -> Ledger:
        return Ledger(directory, salvage=True, host=self.m)

    def tree(self, directory: Path) -> None:
        from labkit.testbed.netns import state_lock

        m, report = self.m, self.report
        own = self.ledger(directory)  # a replay's kernels first: nothing may rebuild meanwhile
        self.undo(own, f"{directory}")
        if not own.entries():
            m.remove(own.path)
        listing = m.entries(directory)
        live_runs = []
        for _, name in sorted((mtime, name) for name, is_dir, mtime in listing
                              if is_dir and name.startswith(NETNS_PREFIX)):
            live = self.live_reason(directory, name)
            if live:
                report.kept.append(live)
                live_runs.append(name)
                continue
            self.clean_run(directory / name)
        for name in sorted(n for n, is_dir, _ in listing if is_dir and n.startswith(REPLAY_PREFIX)):
            replay = directory / name
            owner = owner_alive(replay / OWNER_NAME, m)
            if owner:
                report.kept.append(f"replay {name[len(REPLAY_PREFIX):]} is running (pid {owner['pid']}"
                                   f"{_where(owner)}): left alone; stop it first (Ctrl-C or kill -TERM)")
                continue
            problems = len(report.problems)
            # its kernels first, before its lock: a kernel of a killed replay may be building (holding it)
            self.undo(self.ledger(replay), str(replay))
            with state_lock(replay, m):
                self.tree(replay)
            if len(report.problems) == problems:  # else keep it: what is left is named there
                self.remove_folder(replay)
        names = {n for n, _, _ in listing}
        if BG_MARKER in names and not owner_alive(directory / BG_MARKER, m):
            m.remove(directory / BG_MARKER)
            report.removed.append(f"stale marker {directory / BG_MARKER}")
        for name in sorted(n for n, is_dir, _ in listing if not is_dir and n.startswith(".") and n.endswith(".tmp")):
            m.remove(directory / name)
            report.removed.append(f"stale temporary file {directory / name}")
        holder = self.globals_holder(directory)
        if holder in live_runs:  # the saved originals belong to a run still in use
            report.kept.append(f"global sysctls saved in {directory} left as they are: {holder} still uses them")
            return
        try:
            restored = restore_crashed(directory, host=m, files=m)
        except LabkitError as exc:
            report.problems.append(f"{directory}: {exc}")
        else:
            report.removed += [f"global sysctl {k} restored to {v}" for k, v in restored.items()]

    def live_reason(self, directory: Path, name: str) -> str | None:
        """Why run ``name`` of ``directory`` must be left alone (its process is alive), or None."""
        run, m = directory / name, self.m
        if name.startswith(BG_PREFIX):  # their process's marker is in their folder (older ones: beside it)
            token = name[len(BG_PREFIX):]
            for owner in (owner_alive(run / BG_MARKER, m), owner_alive(directory / BG_MARKER, m)):
                if owner and str(owner.get("netns", "")).startswith(f"lkbg{token}"):
                    return (f"background flows lkbg{token} are running (pid {owner['pid']}{_where(owner)}; they "
                            "end by themselves once their owner is gone): left alone")
            return None
        load = owner_alive(run / LOAD_NAME, m)
        if load:
            return (f"a load is under way on netns run {name[len(NETNS_PREFIX):]} (pid {load['pid']}"
                    f"{_where(load)}): left alone; stop it first, or `labkit down --force`")
        user = owner_alive(run / OWNER_NAME, m)
        if user:
            return (f"netns testbed {name[len(NETNS_PREFIX):]} is in use by pid {user['pid']}"
                    f"{_where(user) or ' (' + self.command_of(user) + ')'}: left alone; "
                    "end that process or run `labkit down`")
        return None

    def command_of(self, owner: dict[str, Any]) -> str:
        machine = _owner_machine(owner, self.m)
        if not isinstance(machine, Host):
            return "?"
        try:
            words = machine.read_file(f"/proc/{int(owner['pid'])}/cmdline").split(b"\0")
        except (OSError, LabkitError):
            return "?"
        return " ".join(w.decode(errors="replace") for w in words if w)[:80] or "?"

    def globals_holder(self, directory: Path) -> str | None:
        """The run (``netns-<id>``) whose originals are saved in ``directory``, if readable."""
        for name in (SYSCTLS_NAME, SYSCTLS_NAME + ".bak"):
            try:
                return str(json.loads(self.m.read_file(str(directory / name))).get("owner"))
            except (OSError, LabkitError, ValueError, AttributeError):
                continue
        return None

    def undo(self, ledger: Ledger, where: str) -> bool:
        try:
            done = ledger.undo()
        except TestbedError as exc:
            self.report.problems.append(f"{where}: {exc}")
            return False
        self.report.removed += [describe(e) for e in done]
        return True

    def clean_run(self, run: Path) -> None:
        """Undo one run's ledger (salvaging a damaged one) and remove its folder."""
        m = self.m
        ledger = self.ledger(run)
        ok = self.undo(ledger, str(run))
        if ledger.damaged or (not m.exists(ledger.path) and m.exists(run / "state.json")):
            derived = self.ledger(run)
            derived.path = run / ".recovered-ledger.jsonl"
            for entry in self.entries_from_state(run):
                ident = derived.record(entry.pop("kind"), **entry)
                if "pid" in entry:
                    derived.note(ident, pid=entry["pid"], start=entry.get("start"))
            ok = self.undo(derived, str(run)) and ok
            left = self.leftovers(run)
            if left:
                self.report.problems.append(
                    f"{ledger.path} was damaged (line(s) {', '.join(map(str, ledger.damaged[:5]))}); "
                    f"still on the machine{_on(m)}: {', '.join(left)}; remove them by hand (ip netns del NAME, "
                    f"rmdir CGROUP after killing its processes), then delete {run}")
                return
        if ok:
            self.remove_folder(run)

    def names(self, folder: str | os.PathLike) -> list[str]:
        return sorted(name for name, _, _ in self.m.entries(folder))

    def cgroup_root(self) -> Path | None:
        try:
            return cgroups.cpu_root(self.m)[0]
        except TestbedError:
            return None

    def entries_from_state(self, run: Path) -> list[dict[str, Any]]:
        """Ledger entries a damaged run's ``state.json`` (or, failing that, its id) still names.

        Processes and cgroups first, namespaces last: the reverse of the order they were made.
        """
        from labkit.testbed.netns import STATE_NAME

        m = self.m
        try:
            state = json.loads(m.read_file(str(run / STATE_NAME)))
            if not isinstance(state, dict):
                raise ValueError("not a document")
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            state = {}
        netns: list[str] = []
        cgroup_paths: list[str] = []
        procs: list[dict[str, Any]] = []
        rid = run.name[len(NETNS_PREFIX):]
        if run.name.startswith(BG_PREFIX):  # lkbg<token><k>: one or more namespaces
            netns += [n for n in self.names(NETNS_DIR) if n.startswith(f"lkbg{run.name[len(BG_PREFIX):]}")]
        else:
            netns += [f"lk{rid}-client", f"lk{rid}-node"]
            for item in [state.get("server") or {}, *(state.get("pods") or [])]:
                if not isinstance(item, dict):
                    continue
                if item.get("netns"):
                    netns.append(item["netns"])
                if item.get("cgroup"):
                    cgroup_paths.append(item["cgroup"])
                if item.get("pid") and item.get("start"):  # without its start time a pid proves nothing
                    procs.append({"kind": "process", "name": "server", "pid": item["pid"], "start": item["start"]})
            # every namespace and cgroup of this run carries its id: named, never a wider pattern
            netns += [n for n in self.names(NETNS_DIR) if n.startswith(f"lk{rid}-")]
            root = self.cgroup_root()
            if root is not None:
                cgroup_paths += [str(root / n) for n in self.names(root) if n.startswith(f"lk{rid}-")]
        # only what is still there: the readable part of the ledger may have removed the rest
        entries: list[dict[str, Any]] = [p for p in procs if m.proc_start_time(p["pid"]) == p["start"]]
        entries += [{"kind": "cgroup", "path": p} for p in dict.fromkeys(cgroup_paths) if m.exists(p)]
        entries += [{"kind": "netns", "name": n} for n in dict.fromkeys(netns)
                    if m.exists(os.path.join(NETNS_DIR, n))]
        return list(reversed(entries))  # undo() works backwards

    def leftovers(self, run: Path) -> list[str]:
        """The namespaces and cgroups of a run still on the machine (by its id)."""
        rid = run.name[len(NETNS_PREFIX):]
        prefix = f"lkbg{run.name[len(BG_PREFIX):]}" if run.name.startswith(BG_PREFIX) else f"lk{rid}-"
        left = [f"namespace {n}" for n in self.names(NETNS_DIR) if n.startswith(prefix)]
        root = self.cgroup_root()
        if root is not None:
            left += [f"cgroup {root / n}" for n in self.names(root) if n.startswith(prefix)]
        return left

    def remove_folder(self, folder: Path) -> None:
        """Remove a run's folder once its ledger is undone: state, logs, stale temporary files."""
        m = self.m
        if m.exists(folder / LEDGER_NAME) and self.ledger(folder).entries():
            return
        m.remove(folder)
        if m.exists(folder):
            self.report.problems.append(f"could not remove {folder}{_on(m)}")


def _where(owner: dict[str, Any]) -> str:
    """`` on machine M``, for a process of a third machine (see :func:`live_owner`)."""
    return f" on machine {owner.get('machine', '?')}, not this one nor the state's" if owner.get("elsewhere") else ""


def _on(machine: Host) -> str:
    return "" if machine.is_local else f" {machine.name}"


def clean_strict(directory: str | os.PathLike | None = None, *, host: Host | None = None) -> list[str]:
    """:func:`clean`, raising when anything is left (``labkit.testbed.netns.clean``).

    Returns:
        A line per resource removed.

    Raises:
        TestbedError: something could not be removed (named in the message).
    """
    report = clean(directory, host=host)
    if report.problems:
        raise TestbedError("clean: " + "; ".join(report.problems))
    return report.removed


def clean_folder(directory: str | os.PathLike, host: Host | None = None) -> list[str]:
    """:func:`clean_strict` a state folder of its own (a replay run's) on ``host`` (this machine by
    default), then remove the folders it emptied."""
    machine, directory = host or LocalHost("init"), Path(directory)
    if not machine.exists(directory):
        return []
    removed = clean_strict(directory, host=machine)
    emptied = [directory / n for n, is_dir, _ in sorted(machine.entries(directory), reverse=True) if is_dir]
    for folder in emptied + [directory]:
        try:  # what clean() emptied; anything still holding files stays
            machine.rmdir(folder)
        except OSError:
            pass
    return removed
