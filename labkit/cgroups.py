"""CPU-limited cgroups for the pods' processes (cgroup v2 or v1, whichever the machine has).

A pod's ``resources.limits.cpu`` becomes a CFS quota: ``cpu.max`` on cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on v1.  The cgroup is also how the
lab finds every process of a pod (the server and the children it forks per
transfer) when it removes the pod.

Every function takes the machine as a :class:`~labkit.host.Host` (this one by
default): the netns testbed makes its cgroups on the machine it builds on,
whether this one or one reached over SSH.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from labkit.exceptions import LabkitError, TestbedError
from labkit.host import Host, LocalHost

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


_here = LocalHost("init")


def _read(host: Host, path) -> str:
    return host.read_file(str(path)).decode()


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


def _v1_mount(host: Host | None = None) -> Path | None:
    host = host or _here
    for v1 in ("cpu", "cpu,cpuacct"):
        if host.exists(CGROUP_ROOT / v1 / "cpu.cfs_quota_us"):
            return CGROUP_ROOT / v1
    return None


def cpu_root(host: Host | None = None) -> tuple[Path, int]:
    """Where CPU-controlled cgroups are made, and the cgroup version (2 or 1).

    On cgroup v1 that is this process's own ``cpu`` cgroup, so a lab started inside a
    CPU budget (a cgroup with a quota, see ``scripts/cpu-budget``) keeps its pods
    inside that budget; on v2 (where a cgroup with processes may not have
    controlled children) it is the root.

    Args:
        host: the machine (this one by default).

    Raises:
        TestbedError: no cgroup CPU controller is available.
    """
    host = host or _here
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if host.exists(controllers):
        if "cpu" not in _read(host, controllers).split():
            raise TestbedError("cgroup v2 without the cpu controller; pods cannot get a CPU limit")
        subtree = _read(host, CGROUP_ROOT / "cgroup.subtree_control").split()
        if "cpu" not in subtree:
            raise TestbedError("cgroup v2: the cpu controller is not enabled for child cgroups; "
                               "run: echo +cpu > /sys/fs/cgroup/cgroup.subtree_control")
        return CGROUP_ROOT, 2
    mount = _v1_mount(host)
    if mount is not None:
        own = mount / own_cgroup(1, _read(host, "/proc/self/cgroup")).lstrip("/")
        return (own if host.exists(own / "cpu.cfs_quota_us") else mount), 1
    raise TestbedError("no cgroup cpu controller mounted (v2 or v1); pods cannot get a CPU limit")


def quota_cores(path: Path, version: int, host: Host | None = None) -> float | None:
    """The CPU quota of one cgroup in cores (None: no quota or not readable) (on ``host``, this machine by default)."""
    host = host or _here
    try:
        if version == 2:
            quota, period = _read(host, path / "cpu.max").split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int(_read(host, path / "cpu.cfs_quota_us"))
        return None if quota < 0 else quota / int(_read(host, path / "cpu.cfs_period_us"))
    except (OSError, LabkitError, ValueError):
        return None


def available_cpus(host: Host | None = None) -> float:
    """The CPU the lab's processes may use on a machine: its CPUs, less any cgroup quota above them.

    The smaller of the CPUs a process may run on (``sched_getaffinity``; ``nproc`` on
    another machine) and the tightest CPU quota of its cgroup and every cgroup above it.
    On this machine that process is this one; on another (``host``) it is a command
    started there as the lab's servers are.
    """
    host = host or _here
    if host.is_local:
        cpus, proc_cgroup = float(len(os.sched_getaffinity(0))), None
    else:
        cpus = float(host.run(["nproc"], timeout=30).stdout.strip())
        proc_cgroup = host.run(["cat", "/proc/self/cgroup"], timeout=30).stdout
    try:
        root, version = cpu_root(host)
    except TestbedError:
        return cpus
    base = CGROUP_ROOT if version == 2 else _v1_mount(host)
    path = base / own_cgroup(version, proc_cgroup).lstrip("/")
    while True:
        quota = quota_cores(path, version, host)
        if quota is not None:
            cpus = min(cpus, quota)
        if path == base or path.parent == path:
            return cpus
        path = path.parent


def make_cgroup(name: str, cpu_limit: float | None, host: Host | None = None) -> Path:
    """Make a cgroup ``name`` with a CPU limit of ``cpu_limit`` cores (None: no limit).

    Args:
        name: its name under :func:`cpu_root`.
        cpu_limit: cores.
        host: the machine (this one by default).

    Returns:
        Its directory (on that machine).

    Raises:
        TestbedError: it exists already, or the limit was refused.
    """
    host = host or _here
    root, version = cpu_root(host)
    path = root / name
    if host.is_local:
        become_subreaper()
    try:
        host.makedirs(path, exist_ok=False)
    except FileExistsError:
        raise TestbedError(f"cgroup {path} exists already") from None
    set_cpu_limit(path, cpu_limit, version, host=host)
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


def set_cpu_limit(path: Path, cpu_limit: float | None, version: int | None = None, *,
                  host: Host | None = None) -> None:
    """Set (or lift, with None) the CPU quota of a cgroup (on ``host``, this machine by default)."""
    host = host or _here
    path = Path(path)
    version = version or (2 if host.exists(path / "cpu.max") else 1)
    quota = -1 if cpu_limit is None else max(1000, round(cpu_limit * PERIOD_US))
    try:
        if version == 2:
            host.write_file(str(path / "cpu.max"), f"{'max' if quota < 0 else quota} {PERIOD_US}\n".encode())
        else:
            host.write_file(str(path / "cpu.cfs_period_us"), f"{PERIOD_US}\n".encode())
            host.write_file(str(path / "cpu.cfs_quota_us"), f"{quota}\n".encode())
    except OSError as exc:
        raise TestbedError(f"cgroup {path}: cannot set CPU limit {cpu_limit}: {exc.strerror}") from None


def _ids(host: Host, path) -> list[int]:
    try:
        return [int(t) for t in _read(host, path).split()]
    except (OSError, LabkitError):
        return []


def _tasks(path: Path | str, host: Host | None = None) -> list[int]:
    """The thread ids in a cgroup (v1 ``tasks``; empty where there is no such file)."""
    return _ids(host or _here, Path(path, "tasks"))


def _occupants(path: Path, host: Host | None = None) -> str:
    """What still holds a cgroup: its threads and their state, and its child cgroups (for the error)."""
    host = host or _here
    states = []
    for tid in _tasks(path, host)[:5]:
        try:
            stat = _read(host, f"/proc/{tid}/stat").rsplit(")", 1)[1].split()
            states.append(f"{tid} {stat[0]} ppid {stat[1]}")
        except (OSError, LabkitError):
            states.append(f"{tid} gone")
    children = [name for name, is_dir, _ in host.entries(path) if is_dir]
    return f" (threads: {', '.join(states) or 'none'}; child cgroups: {', '.join(children) or 'none'})"


def procs(path: Path | str, host: Host | None = None) -> list[int]:
    """The pids in a cgroup (empty when it does not exist)."""
    return _ids(host or _here, Path(path, "cgroup.procs"))


def remove_cgroup(path: Path | str, timeout: float = 5.0, host: Host | None = None) -> None:
    """Kill every process in a cgroup and remove it; nothing to do when it is gone.

    Args:
        path: the cgroup's folder.
        timeout: seconds to wait for its processes to end (at least 30 on another machine,
            where each look is a command: a slow guest's pod with dozens of forks needs it).
        host: the machine (this one by default).

    Raises:
        TestbedError: it could not be emptied or removed in time.
    """
    host = host or _here
    if not host.is_local:
        timeout = max(timeout, 30.0)
    path = Path(path)
    if not host.exists(path):
        return
    # a killed process needs CPU to exit: a throttled cgroup full of forks would outlast the timeout
    # (a cgroup of another hierarchy, e.g. a notebook kernel's in ``pids`` on v1, has no CPU limit)
    if host.exists(path / "cpu.max") or host.exists(path / "cpu.cfs_quota_us"):
        try:
            set_cpu_limit(path, None, host=host)
        except TestbedError as exc:
            log.warning("%s", exc)
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        # `tasks` too: a process whose leader thread has exited while another of its threads lives
        # is no longer in cgroup.procs (cgroup v1) but still holds the cgroup.  Listed again after
        # every refused removal: a process may join late (a loadgen's shell writes itself in just
        # after its start, which a signal can interrupt half way)
        pids = sorted(set(procs(path, host)) | set(_tasks(path, host)))
        seen.update(pids)
        host.kill_all(pids, signal.SIGKILL)  # one command for all on another machine
        host.reap(seen)
        if not pids:
            try:
                host.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                # a child of ours that is dead but not reaped keeps the cgroup busy (cgroup v1) though
                # it is no longer listed: an orphan we adopted as subreaper among them
                host.reap()
                if time.monotonic() > deadline:
                    raise TestbedError(f"cannot remove cgroup {path}: {exc.strerror}"
                                       f"{_occupants(path, host)}") from None
        elif time.monotonic() > deadline:
            raise TestbedError(f"cgroup {path}: processes {pids} did not end")
        time.sleep(0.01)
