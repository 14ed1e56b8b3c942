"""A replay's own state, where ``labkit clean`` finds it: its process and its notebook kernels.

A replay run keeps its notebooks' testbeds under ``replay-<run-id>/`` of the state
directory (see :func:`labkit.results.replay_state_dir`).  This module adds, there:

- ``owner.json``: the replay's process, so that ``labkit clean`` leaves a live replay
  alone and cleans up after a dead one;
- ``ledger.jsonl``: for each notebook, the cgroup its Jupyter kernel runs in (recorded
  before the kernel starts) and the folder of its connection file (which holds the
  kernel's key, 0600), instead of a file in ``/tmp``.

:func:`notebook_kernel` is the scope of one notebook: on leaving it, however the
notebook ended, the kernel and every process it started are ended (its cgroup is
removed) before the driver tears the notebook's testbed down.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from labkit import cgroups
from labkit.cleanup import OWNER_NAME, owner_alive, owner_record
from labkit.exceptions import ReplayError, TestbedError
from labkit.ledger import Ledger
from labkit.results import replay_state_dir
from labkit.util import atomic_write

log = logging.getLogger(__name__)

JUPYTER_DIR = "jupyter"
WATCH_S = 2.0


def claim(run_id: str) -> Path:
    """Write ``owner.json`` (this process) into the replay's state folder; return the folder.

    Raises:
        ReplayError: another live replay keeps its state there.
    """
    folder = replay_state_dir(run_id)
    other = owner_alive(folder / OWNER_NAME)
    if other:
        raise ReplayError(f"{folder} is the state of replay {run_id}, which pid {other['pid']} is running: "
                          "wait for it, or give this replay another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / OWNER_NAME, json.dumps(owner_record()).encode())
    except OSError as exc:  # not root: the notebooks' testbeds cannot be built either
        log.warning("cannot write %s: %s", folder / OWNER_NAME, exc)
    return folder


def release(run_id: str) -> None:
    """End whatever the replay's own ledger still lists, drop ``owner.json``, remove the folder if empty."""
    folder = replay_state_dir(run_id)
    if not folder.exists():
        return
    ledger = Ledger(folder)
    ledger.undo()
    ledger.path.unlink(missing_ok=True)
    (folder / OWNER_NAME).unlink(missing_ok=True)
    for sub in (folder / JUPYTER_DIR, folder):
        try:
            sub.rmdir()
        except OSError:
            pass  # a testbed's state still there: its `teardown()` or `labkit clean` owns it


def kernel_cgroup_root() -> Path:
    """Where a kernel's cgroup is made: the unified root on cgroup v2; on v1 a hierarchy other
    than ``cpu`` (``pids``), since the testbed makes its pods' CPU cgroups inside the ``cpu``
    cgroup of the process that builds it, the kernel.

    Raises:
        TestbedError: no such hierarchy.
    """
    root, version = cgroups.cpu_root()
    if version == 2:
        return root
    for name in ("pids", "freezer", "devices"):
        path = cgroups.CGROUP_ROOT / name
        if (path / "cgroup.procs").exists():
            return path
    raise TestbedError("cgroup v1 without a pids, freezer or devices hierarchy to hold the notebook kernels")


def _kernel_manager_class(procs: str, connection_file: str):
    """A KernelManager whose kernel joins a cgroup before it starts, with its connection file here."""
    from jupyter_client.manager import AsyncKernelManager

    class CgroupKernelManager(AsyncKernelManager):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.setdefault("connection_file", connection_file)
            super().__init__(*args, **kwargs)

        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]

    return CgroupKernelManager


def _watch_globals(folder: Path, stop: threading.Event, on_wait: Callable[[str], None]) -> None:
    """Say (once per holder) when the notebook's testbed waits for another run's global sysctls."""
    from labkit.sysctls import CLAIM_PATH, describe_claimant

    told = None
    while not stop.wait(WATCH_S):
        try:
            claimant = Path(CLAIM_PATH).read_text().strip()
        except OSError:
            continue
        building = any(json.loads(p.read_text()).get("state") == "building"
                       for p in folder.glob("netns-*/state.json") if _readable(p))
        if building and claimant and claimant != told and not claimant.startswith(str(folder) + "/") \
                and Path(claimant).exists():
            told = claimant
            on_wait(f"waiting: {describe_claimant(claimant)}")


def _readable(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


@contextmanager
def notebook_kernel(run_id: str, label: str,
                    on_wait: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The scope of one notebook's kernel; yields papermill's extra arguments for it.

    Args:
        run_id: the replay's run id.
        label: names the kernel's cgroup (``iteration-3``, ``summary``).
        on_wait: told when the notebook's testbed waits for global sysctls another run holds.

    Yields:
        ``{"kernel_manager_class": ...}`` for :func:`labkit.replay.notebook.execute`.
    """
    folder = replay_state_dir(run_id)
    ledger = Ledger(folder)
    runtime = folder / JUPYTER_DIR
    try:
        if not runtime.exists():
            ledger.record("path", path=str(runtime))
            runtime.mkdir(mode=0o700, parents=True)
        root = kernel_cgroup_root()
        name = f"lkreplay-{run_id}-{label}-{secrets.token_hex(2)}"
        ident = ledger.record("cgroup", path=str(root / name))
        cgroup = root / name
        cgroup.mkdir()
    except (OSError, TestbedError) as exc:  # not root, or no cgroup controller: a plain kernel
        log.warning("%s: the notebook kernel runs without a cgroup of its own (%s); after a crash "
                    "only its parent's exit ends it", label, exc)
        yield {}
        return
    stop = threading.Event()
    if on_wait is not None:
        threading.Thread(target=_watch_globals, args=(folder, stop, on_wait), daemon=True,
                         name="labkit-globals-watch").start()
    try:
        connection = runtime / f"kernel-{label}.json"
        yield {"kernel_manager_class": _kernel_manager_class(str(cgroup / "cgroup.procs"), str(connection))}
    finally:
        stop.set()
        for entry in reversed(ledger.entries()):
            # the kernel and all it started end here; then its connection file's folder goes
            if entry["id"] == ident or (entry["kind"] == "path" and entry["path"] == str(runtime)):
                ledger.remove(entry)
