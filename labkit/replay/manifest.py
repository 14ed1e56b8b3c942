"""``manifest.json``: what a run was, where it ran, and how each notebook ended.

The manifest is the run folder's own record (DESIGN.md): status, timing, the
kernel and distribution, package versions, the git revision, and the global
sysctls before and after, per iteration as well as for the whole batch.  It is
rewritten atomically after every step, so a crash leaves the last state.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from labkit.exceptions import LabkitError
from labkit.host import Host, LocalHost
from labkit.results import MANIFEST_FILE, read_json, write_json

log = logging.getLogger(__name__)

PACKAGES = ("labkit", "papermill", "nbconvert", "nbclient", "ipykernel", "jupyter_client",
            "pandas", "matplotlib", "seaborn", "pyyaml", "paramiko")
SYSCTLS = (
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_expect_max",
    "net.netfilter.nf_conntrack_buckets",
    "net.netfilter.nf_conntrack_udp_timeout",
    "net.netfilter.nf_conntrack_udp_timeout_stream",
)
REPO = Path(__file__).resolve().parents[2]


def now() -> str:
    """The current time, ISO 8601 with the UTC offset."""
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def read_sysctls(host: Host | None = None, names: tuple[str, ...] = SYSCTLS) -> dict[str, str | None]:
    """The conntrack sysctls of the machine's own namespace (None where one does not exist)."""
    host = host or LocalHost()
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = host.read_sysctl(name)
        except LabkitError:
            out[name] = None
    return out


def distro() -> str:
    """The distribution's PRETTY_NAME from /etc/os-release, or the platform string."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def git_revision(repo: Path = REPO) -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": bool(status) if status is not None else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None when missing)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Where this run happens: kernel, distribution, CPUs, Python, packages, git."""
    uname = os.uname()
    return {
        "hostname": uname.nodename,
        "kernel": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "distro": distro(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": package_versions(),
        "git": git_revision(),
    }


# One command on the testbed's machine: its kernel, distribution and CPUs
_MACHINE_PROBE = ('uname -n; uname -r; uname -v; uname -m; nproc; '
                  '(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || uname -s')


def machine_environment(machine: Any) -> dict[str, Any]:
    """Where the testbed of a ``--on`` run runs: that machine's kernel, distribution and CPUs.

    The notebooks, and :func:`environment`, are on this machine; the kernel the story is
    about is that one's.

    Raises:
        LabkitError: the machine cannot be asked (the Host's own errors).
    """
    lines = machine.run(["sh", "-c", _MACHINE_PROBE], timeout=60).stdout.splitlines()
    hostname, release, version, arch, cpus, name = (lines + [""] * 6)[:6]
    return {"name": machine.name, "hostname": hostname, "kernel": release, "kernel_version": version,
            "machine": arch, "distro": name, "cpus": int(cpus) if cpus.isdigit() else None}


class Manifest:
    """The manifest of one run folder, saved atomically on every change.

    Attributes:
        path: ``<run folder>/manifest.json``.
        data: the JSON document.
    """

    def __init__(self, run_dir: str | os.PathLike, data: dict[str, Any]):
        self.path = Path(run_dir) / MANIFEST_FILE
        self.data = data

    @classmethod
    def create(cls, run_dir: str | os.PathLike, *, run_id: str, profile: str, testbed: str,
               iterations: list[int], kernel: str, on: str | None = None,
               sysctls: dict[str, str | None] | None = None,
               testbed_machine: dict[str, Any] | None = None) -> "Manifest":
        """A new manifest for a run that starts now (saved).

        ``on``: the machine the netns testbed runs on (``--on``), None for this one;
        ``sysctls``: that machine's conntrack sysctls now (read here when None);
        ``testbed_machine``: that machine's :func:`machine_environment` (None: this one).
        """
        manifest = cls(run_dir, {
            "run_id": run_id,
            "status": "running",
            "profile": profile,
            "testbed": testbed,
            "on": on,
            "iterations_requested": list(iterations),
            "jupyter_kernel": kernel,
            "started": now(),
            "finished": None,
            "duration_s": None,
            "environment": environment(),
            "testbed_machine": testbed_machine,
            "sysctls": {"before": read_sysctls() if sysctls is None else sysctls, "after": None},
            "iterations": {},
            "summary": None,
            "resumed": [],
        })
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "Manifest":
        """The manifest of an existing run folder.

        Raises:
            ReplayError: there is none, or it is not valid JSON.
        """
        return cls(run_dir, read_json(Path(run_dir) / MANIFEST_FILE))

    def save(self) -> None:
        """Write the manifest atomically."""
        write_json(self.data, self.path)

    def entry(self, number: int) -> dict[str, Any] | None:
        """The record of iteration ``number`` (None when it never started)."""
        return self.data["iterations"].get(str(number))

    def set_entry(self, number: int, entry: dict[str, Any]) -> None:
        """Record iteration ``number`` and save."""
        self.data["iterations"][str(number)] = entry
        self.save()
