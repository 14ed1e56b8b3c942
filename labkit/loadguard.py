"""A load under way on the netns testbed: announced, refused company, stoppable, never orphaned.

While :func:`run_load` runs an iteration's load, the run's state folder holds
``load.json`` (the process running it and the loadgen's cgroup), and the run's
ledger lists the loadgen's cgroup and its per-transfer CSV (in the state folder,
not ``/tmp``).  So:

- ``labkit down`` and ``labkit up`` from another process refuse while the load runs
  (:func:`refuse_during_load`); ``labkit down --force`` first ends the loadgen (its
  whole cgroup), and the load's caller then raises: its row is never written as ok;
- ``labkit clean`` after a crash ends an orphaned loadgen with the rest of the run.

The announcement, the CSV and the cgroup live on the testbed's machine
(``testbed.machine``, this one or one reached over SSH): there the loadgen's shell
writes itself into the cgroup before it becomes the loadgen (and enters the client's
namespace), and its CSV is read back through the machine's Host.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from typing import Any

from labkit import cgroups
from labkit.cleanup import LOAD_NAME, live_owner, owner_alive, owner_record
from labkit.exceptions import LoadUnderWay, TestbedError

log = logging.getLogger(__name__)


def load_under_way(testbed) -> dict[str, Any] | None:
    """The load another live process runs on this netns testbed (None when there is none).

    The announcement is read on the testbed's machine; the process it names runs here.
    """
    if not getattr(testbed, "run_id", None):
        return None
    machine = getattr(testbed, "machine", None)
    if machine is None or machine.is_local:
        return owner_alive(testbed.run_dir / LOAD_NAME)
    try:
        return live_owner(machine.read_file(str(testbed.run_dir / LOAD_NAME)))
    except FileNotFoundError:
        return None


def refuse_during_load(testbed, action: str, *, force: bool = False) -> None:
    """Refuse ``action`` while another process runs a load on the testbed.

    Call with the testbed's state lock held.

    Args:
        testbed: a :class:`~labkit.testbed.netns.NetnsTestbed`.
        action: what the caller was about to do (for the message).
        force: end the load instead (its loadgen's cgroup); its iteration then fails.

    Raises:
        LoadUnderWay: a load is under way and not ``force``.
    """
    info = load_under_way(testbed)
    if info is None:
        return
    if not force:
        raise LoadUnderWay(
            f"a load is under way on netns testbed {testbed.run_id} ({info.get('command', 'a run')}, "
            f"pid {info['pid']}): refusing to {action}; wait for it to end, or use "
            "`labkit down --force` to stop the load (that iteration is then recorded as failed)")
    log.warning("stopping the load of pid %s on netns testbed %s", info["pid"], testbed.run_id)
    for entry in testbed.ledger.entries():
        if entry["kind"] == "cgroup" and entry.get("path") == info.get("cgroup"):
            testbed.ledger.remove(entry)  # ends the loadgen and everything it started


def run_load(testbed, spec, progress=None):
    """Run an iteration's load from the testbed's client and return the :class:`LoadResult`.

    On the netns testbed the load is announced (``load.json``), its loadgen runs in a
    cgroup of the testbed's machine that the run's ledger lists, and its per-transfer CSV (and its progress file, with
    ``progress``: see :func:`labkit.loadgen.run_load_on`) lives in the run's state
    folder; other testbeds just run it on their client.

    Raises:
        TestbedError: the testbed was taken down while the load ran (``labkit down --force``).
        CommandFailed, LoadgenError: the loadgen failed.
    """
    from labkit.loadgen import run_load_on

    if getattr(testbed, "name", None) != "netns" or not hasattr(testbed, "ledger"):
        return run_load_on(testbed.host("client"), spec, transfers=True, progress=progress)
    from labkit.testbed.netns import STATE_NAME, state_lock

    run_dir, run_id, machine = testbed.run_dir, testbed.run_id, testbed.machine
    with state_lock(testbed.state_dir, machine):
        if not machine.exists(run_dir / STATE_NAME):
            raise TestbedError(f"netns testbed {run_id} was taken down before its load could start")
        refuse_during_load(testbed, "start another load")
        ledger = testbed.ledger
        token = secrets.token_hex(3)
        root, _ = cgroups.cpu_root(machine)
        name = f"lk{run_id}-load{token}"
        ids = [ledger.record("cgroup", path=str(root / name))]
        csv = run_dir / f"load-{token}.csv"
        ids.append(ledger.record("path", path=str(csv)))
        feed = run_dir / f"load-{token}.progress.jsonl" if progress is not None else None
        if feed is not None:
            ids.append(ledger.record("path", path=str(feed)))
        ids.append(ledger.record("path", path=str(run_dir / LOAD_NAME)))
        cgroup = cgroups.make_cgroup(name, None, host=machine)
        command = " ".join(os.path.basename(a) for a in sys.argv[:3]) or "python"
        machine.atomic_write(run_dir / LOAD_NAME, json.dumps({**owner_record(), "cgroup": str(cgroup),
                                                              "command": command}).encode(), mode=0o600)
    try:
        result = run_load_on(testbed.host("client"), spec, transfers=True, cgroup=cgroup,
                             transfers_path=str(csv), progress=progress, python=testbed.python,
                             progress_path=str(feed) if feed is not None else None)
    except Exception:
        _check_still_up(testbed, run_dir, run_id)
        raise
    finally:
        _release(testbed, run_dir, ids)
    _check_still_up(testbed, run_dir, run_id)
    return result


def _check_still_up(testbed, run_dir, run_id) -> None:
    from labkit.testbed.netns import STATE_NAME, state_lock

    with state_lock(testbed.state_dir, testbed.machine):  # a `down --force` that ended the load finishes first
        gone = not testbed.machine.exists(run_dir / STATE_NAME)
    if gone:
        raise TestbedError(f"netns testbed {run_id} was taken down while its load ran "
                           "(`labkit down --force`?): the load was stopped and its numbers are not kept") from None


def _release(testbed, run_dir, ids: list[int]) -> None:
    """Remove the load's cgroup, CSV and announcement, unless the whole run went meanwhile."""
    from labkit.testbed.netns import STATE_NAME, state_lock

    with state_lock(testbed.state_dir, testbed.machine):
        if not testbed.machine.exists(run_dir / STATE_NAME):
            return  # taken down (and its ledger undone) by another process
        entries = {e["id"]: e for e in testbed.ledger.entries()}
        for ident in reversed(ids):
            if ident in entries:
                testbed.ledger.remove(entries[ident])
