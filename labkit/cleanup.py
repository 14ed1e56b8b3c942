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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import cgroups
from labkit.exceptions import LabkitError, TestbedError
from labkit.host import NETNS_DIR
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


def owner_alive(path: Path) -> dict[str, Any] | None:
    """The owner recorded in ``path`` (``{"pid", "start"}``) when that process still runs."""
    try:
        return live_owner(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None


def live_owner(data: bytes) -> dict[str, Any] | None:
    """The owner an owner file's text names (``{"pid", "start"}``) when that process runs here."""
    try:
        info = json.loads(data)
        pid, start = int(info["pid"]), info.get("start")
    except (ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None  # this process: not another run's
    alive = proc_start_time(pid)
    if alive is None or (start is not None and alive != start):
        return None
    return info


def owner_record() -> dict[str, Any]:
    """``{"pid", "start"}`` of this process, for an owner file."""
    return {"pid": os.getpid(), "start": proc_start_time(os.getpid())}


def clean(directory: str | os.PathLike | None = None) -> CleanReport:
    """Undo every crashed (or abandoned) run recorded under a state directory.

    Args:
        directory: the state directory; ``$LABKIT_STATE_DIR`` or ``/run/labkit``.

    Returns:
        The :class:`CleanReport`.
    """
    from labkit.testbed.netns import signals_deferred, state_lock

    directory = Path(directory or default_state_dir())
    report = CleanReport()
    if not directory.is_dir():
        return report
    with state_lock(directory), signals_deferred():
        _clean_tree(directory, report)
    return report


def _clean_tree(directory: Path, report: CleanReport) -> None:
    from labkit.testbed.netns import state_lock

    own = Ledger(directory, salvage=True)  # a replay's kernels first: nothing may rebuild meanwhile
    _undo(own, report, f"{directory}")
    if not own.entries():
        own.path.unlink(missing_ok=True)
    live_runs = []
    for run in sorted((p for p in directory.glob(f"{NETNS_PREFIX}*") if p.is_dir()),
                      key=lambda p: p.stat().st_mtime):
        live = _live_reason(directory, run)
        if live:
            report.kept.append(live)
            live_runs.append(run.name)
            continue
        _clean_run(run, report)
    for replay in sorted(p for p in directory.glob(f"{REPLAY_PREFIX}*") if p.is_dir()):
        owner = owner_alive(replay / OWNER_NAME)
        if owner:
            report.kept.append(f"replay {replay.name[len(REPLAY_PREFIX):]} is running (pid {owner['pid']}): "
                               "left alone; stop it first (Ctrl-C or kill -TERM)")
            continue
        problems = len(report.problems)
        # its kernels first, before its lock: a kernel of a killed replay may be building (holding it)
        _undo(Ledger(replay, salvage=True), report, str(replay))
        with state_lock(replay):
            _clean_tree(replay, report)
        if len(report.problems) == problems:  # else keep it: what is left is named there
            _remove_folder(replay, report)
    for name in (BG_MARKER,):
        marker = directory / name
        if marker.exists() and not owner_alive(marker):
            marker.unlink(missing_ok=True)
            report.removed.append(f"stale marker {marker}")
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        report.removed.append(f"stale temporary file {tmp}")
    holder = _globals_holder(directory)
    if holder in live_runs:  # the saved originals belong to a run still in use
        report.kept.append(f"global sysctls saved in {directory} left as they are: {holder} still uses them")
        return
    try:
        restored = restore_crashed(directory)
    except LabkitError as exc:
        report.problems.append(f"{directory}: {exc}")
    else:
        report.removed += [f"global sysctl {k} restored to {v}" for k, v in restored.items()]


def _live_reason(directory: Path, run: Path) -> str | None:
    """Why a run must be left alone (its process is alive), or None."""
    if run.name.startswith(BG_PREFIX):  # their process's marker is in their folder (older ones: beside it)
        token = run.name[len(BG_PREFIX):]
        for owner in (owner_alive(run / BG_MARKER), owner_alive(directory / BG_MARKER)):
            if owner and str(owner.get("netns", "")).startswith(f"lkbg{token}"):
                return (f"background flows lkbg{token} are running (pid {owner['pid']}; they end by themselves "
                        "once their owner is gone): left alone")
        return None
    load = owner_alive(run / LOAD_NAME)
    if load:
        return (f"a load is under way on netns run {run.name[len(NETNS_PREFIX):]} (pid {load['pid']}): "
                "left alone; stop it first, or `labkit down --force`")
    user = owner_alive(run / OWNER_NAME)
    if user:
        return (f"netns testbed {run.name[len(NETNS_PREFIX):]} is in use by pid {user['pid']} "
                f"({_command_of(user['pid'])}): left alone; end that process or run `labkit down`")
    return None


def _command_of(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(w.decode(errors="replace") for w in words if w)[:80] or "?"


def _globals_holder(directory: Path) -> str | None:
    """The run (``netns-<id>``) whose originals are saved in ``directory``, if readable."""
    for name in (SYSCTLS_NAME, SYSCTLS_NAME + ".bak"):
        try:
            return str(json.loads((directory / name).read_text()).get("owner"))
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _undo(ledger: Ledger, report: CleanReport, where: str) -> bool:
    try:
        done = ledger.undo()
    except TestbedError as exc:
        report.problems.append(f"{where}: {exc}")
        return False
    report.removed += [describe(e) for e in done]
    return True


def _clean_run(run: Path, report: CleanReport) -> None:
    """Undo one run's ledger (salvaging a damaged one) and remove its folder."""
    ledger = Ledger(run, salvage=True)
    ok = _undo(ledger, report, str(run))
    if ledger.damaged or (not ledger.path.exists() and (run / "state.json").exists()):
        derived = Ledger(run, salvage=True)
        derived.path = run / ".recovered-ledger.jsonl"
        for entry in _entries_from_state(run):
            ident = derived.record(entry.pop("kind"), **entry)
            if "pid" in entry:
                derived.note(ident, pid=entry["pid"], start=entry.get("start"))
        ok = _undo(derived, report, str(run)) and ok
        left = _leftovers(run)
        if left:
            report.problems.append(
                f"{ledger.path} was damaged (line(s) {', '.join(map(str, ledger.damaged[:5]))}); "
                f"still on the machine: {', '.join(left)}; remove them by hand (ip netns del NAME, "
                f"rmdir CGROUP after killing its processes), then delete {run}")
            return
    if ok:
        _remove_folder(run, report)


def _entries_from_state(run: Path) -> list[dict[str, Any]]:
    """Ledger entries a damaged run's ``state.json`` (or, failing that, its id) still names.

    Processes and cgroups first, namespaces last: the reverse of the order they were made.
    """
    from labkit.testbed.netns import STATE_NAME

    try:
        state = json.loads((run / STATE_NAME).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a document")
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        state = {}
    netns: list[str] = []
    cgroup_paths: list[str] = []
    procs: list[dict[str, Any]] = []
    rid = run.name[len(NETNS_PREFIX):]
    if run.name.startswith(BG_PREFIX):  # lkbg<token><k>: one or more namespaces
        netns += [n for n in _names(Path(NETNS_DIR)) if n.startswith(f"lkbg{run.name[len(BG_PREFIX):]}")]
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
                procs.append({"kind": "process", "name": "server", "pid": item["pid"], "start": item.get("start")})
        # every namespace and cgroup of this run carries its id: named, never a wider pattern
        netns += [n for n in _names(Path(NETNS_DIR)) if n.startswith(f"lk{rid}-")]
        try:
            root, _ = cgroups.cpu_root()
            cgroup_paths += [str(root / n) for n in _names(root) if n.startswith(f"lk{rid}-")]
        except TestbedError:
            pass
    # only what is still there: the readable part of the ledger may have removed the rest
    entries: list[dict[str, Any]] = [p for p in procs if proc_start_time(p["pid"]) == p["start"]]
    entries += [{"kind": "cgroup", "path": p} for p in dict.fromkeys(cgroup_paths) if os.path.isdir(p)]
    entries += [{"kind": "netns", "name": n} for n in dict.fromkeys(netns)
                if os.path.exists(os.path.join(NETNS_DIR, n))]
    return list(reversed(entries))  # undo() works backwards


def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _leftovers(run: Path) -> list[str]:
    """The namespaces and cgroups of a run still on the machine (by its id)."""
    rid = run.name[len(NETNS_PREFIX):]
    prefix = f"lkbg{run.name[len(BG_PREFIX):]}" if run.name.startswith(BG_PREFIX) else f"lk{rid}-"
    left = [f"namespace {n}" for n in _names(Path(NETNS_DIR)) if n.startswith(prefix)]
    try:
        root, _ = cgroups.cpu_root()
        left += [f"cgroup {root / n}" for n in _names(root) if n.startswith(prefix)]
    except TestbedError:
        pass
    return left


def _remove_folder(folder: Path, report: CleanReport) -> None:
    """Remove a run's folder once its ledger is undone: state, logs, stale temporary files."""
    if (folder / LEDGER_NAME).exists() and Ledger(folder, salvage=True).entries():
        return
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        report.problems.append(f"could not remove {folder}")
