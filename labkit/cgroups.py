"""CPU-limited cgroups for the pods' processes (cgroup v2 or v1, whichever the machine has).

A pod's ``resources.limits.cpu`` becomes a CFS quota: ``cpu.max`` on cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on v1.  The cgroup is also how the
lab finds every process of a pod (the server and the children it forks per
transfer) when it removes the pod.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from labkit.exceptions import TestbedError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def own_cgroup(version: int, proc_cgroup: str | None = None) -> str:
    """This process's cgroup path (``/`` at the root) for the CPU controller.

    Args:
        version: 2 for the unified hierarchy, 1 for the v1 ``cpu`` controller.
        proc_cgroup: the text of ``/proc/self/cgroup`` (read when None).
    """
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == 2 and controllers == "") or (version == 1 and "cpu" in controllers.split(",")):
            return path or "/"
    return "/"


def _v1_mount() -> Path | None:
    for v1 in ("cpu", "cpu,cpuacct"):
        if (CGROUP_ROOT / v1 / "cpu.cfs_quota_us").exists():
            return CGROUP_ROOT / v1
    return None


def cpu_root() -> tuple[Path, int]:
    """Where CPU-controlled cgroups are made, and the cgroup version (2 or 1).

    On cgroup v1 that is this process's own ``cpu`` cgroup, so a lab started inside a
    CPU budget (a cgroup with a quota, see ``scripts/cpu-budget``) keeps its pods
    inside that budget; on v2 (where a cgroup with processes may not have
    controlled children) it is the root.

    Raises:
        TestbedError: no cgroup CPU controller is available.
    """
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists():
        if "cpu" not in controllers.read_text().split():
            raise TestbedError("cgroup v2 without the cpu controller; pods cannot get a CPU limit")
        subtree = (CGROUP_ROOT / "cgroup.subtree_control").read_text().split()
        if "cpu" not in subtree:
            raise TestbedError("cgroup v2: the cpu controller is not enabled for child cgroups; "
                               "run: echo +cpu > /sys/fs/cgroup/cgroup.subtree_control")
        return CGROUP_ROOT, 2
    mount = _v1_mount()
    if mount is not None:
        own = mount / own_cgroup(1).lstrip("/")
        return (own if (own / "cpu.cfs_quota_us").exists() else mount), 1
    raise TestbedError("no cgroup cpu controller mounted (v2 or v1); pods cannot get a CPU limit")


def quota_cores(path: Path, version: int) -> float | None:
    """The CPU quota of one cgroup in cores (None: no quota or not readable)."""
    try:
        if version == 2:
            quota, period = (path / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((path / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((path / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def available_cpus() -> float:
    """The CPU this process and its children may use: its CPUs, less any cgroup quota above it.

    The smaller of the CPUs it may run on (``sched_getaffinity``) and the
    tightest CPU quota of its cgroup and every cgroup above it.
    """
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        root, version = cpu_root()
    except TestbedError:
        return cpus
    base = CGROUP_ROOT if version == 2 else _v1_mount()
    path = base / own_cgroup(version).lstrip("/")
    while True:
        quota = quota_cores(path, version)
        if quota is not None:
            cpus = min(cpus, quota)
        if path == base or path.parent == path:
            return cpus
        path = path.parent


def make_cgroup(name: str, cpu_limit: float | None) -> Path:
    """Make a cgroup ``name`` with a CPU limit of ``cpu_limit`` cores (None: no limit).

    Returns:
        Its directory.

    Raises:
        TestbedError: it exists already, or the limit was refused.
    """
    root, version = cpu_root()
    path = root / name
    become_subreaper()
    try:
        path.mkdir()
    except FileExistsError:
        raise TestbedError(f"cgroup {path} exists already") from None
    set_cpu_limit(path, cpu_limit, version)
    return path


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (``prctl(PR_SET_CHILD_SUBREAPER)``).

    Whoever makes a cgroup removes it, and a cgroup with a dead but unreaped process
    in it cannot be removed (``EBUSY`` on cgroup v1).  Killing a loadgen orphans its
    workers: without this they go to PID 1, which may reap them late (or never, in a
    container), and the removal fails; with it they come to us, and
    :func:`remove_cgroup` reaps them.  Best effort: a kernel without it changes nothing.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_cpu_limit(path: Path, cpu_limit: float | None, version: int | None = None) -> None:
    """Set (or lift, with None) the CPU quota of a cgroup."""
    version = version or (2 if (path / "cpu.max").exists() else 1)
    quota = -1 if cpu_limit is None else max(1000, round(cpu_limit * PERIOD_US))
    try:
        if version == 2:
            (path / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {PERIOD_US}\n")
        else:
            (path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    except OSError as exc:
        raise TestbedError(f"cgroup {path}: cannot set CPU limit {cpu_limit}: {exc.strerror}") from None


def _tasks(path: Path | str) -> list[int]:
    """The thread ids in a cgroup (v1 ``tasks``; empty where there is no such file)."""
    try:
        return [int(t) for t in Path(path, "tasks").read_text().split()]
    except OSError:
        return []


def _zombie_children() -> list[int]:
    """Our children that have exited and wait to be reaped (orphans we adopted as subreaper among them)."""
    me, out = str(os.getpid()), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and fields[1] == me:
            out.append(int(pid))
    return out


def _occupants(path: Path) -> str:
    """What still holds a cgroup: its threads and their state, and its child cgroups (for the error)."""
    try:
        tasks = Path(path, "tasks").read_text().split()
    except OSError:
        tasks = []
    states = []
    for tid in tasks[:5]:
        try:
            stat = Path(f"/proc/{tid}/stat").read_text()
            states.append(f"{tid} {stat.rsplit(')', 1)[1].split()[0]} ppid {stat.rsplit(')', 1)[1].split()[1]}")
        except OSError:
            states.append(f"{tid} gone")
    children = [p.name for p in Path(path).iterdir() if p.is_dir()] if Path(path).is_dir() else []
    return f" (threads: {', '.join(states) or 'none'}; child cgroups: {', '.join(children) or 'none'})"


def procs(path: Path | str) -> list[int]:
    """The pids in a cgroup (empty when it does not exist)."""
    try:
        return [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove_cgroup(path: Path | str, timeout: float = 5.0) -> None:
    """Kill every process in a cgroup and remove it; nothing to do when it is gone.

    Raises:
        TestbedError: it could not be emptied or removed in time.
    """
    path = Path(path)
    if not path.exists():
        return
    # a killed process needs CPU to exit: a throttled cgroup full of forks would outlast the timeout
    # (a cgroup of another hierarchy, e.g. a notebook kernel's in ``pids`` on v1, has no CPU limit)
    if (path / "cpu.max").exists() or (path / "cpu.cfs_quota_us").exists():
        try:
            set_cpu_limit(path, None)
        except TestbedError as exc:
            log.warning("%s", exc)
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        # `tasks` too: a process whose leader thread has exited while another of its threads lives
        # is no longer in cgroup.procs (cgroup v1) but still holds the cgroup.  Listed again after
        # every refused removal: a process may join late (a loadgen's shell writes itself in just
        # after its start, which a signal can interrupt half way)
        pids = sorted(set(procs(path)) | set(_tasks(path)))
        seen.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(seen)
        if not pids:
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                # a child of ours that is dead but not reaped keeps the cgroup busy (cgroup v1) though
                # it is no longer listed: an orphan we adopted as subreaper among them
                _reap(_zombie_children())
                if time.monotonic() > deadline:
                    raise TestbedError(f"cannot remove cgroup {path}: {exc.strerror}{_occupants(path)}") from None
        elif time.monotonic() > deadline:
            raise TestbedError(f"cgroup {path}: processes {pids} did not end")
        time.sleep(0.01)


def _reap(pids) -> None:
    """Reap those of ``pids`` that are our exited children (others are left alone)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
