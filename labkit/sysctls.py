"""The machine's global conntrack sysctls: saved before the first write, always restorable.

``net.netfilter.nf_conntrack_max`` and ``nf_conntrack_expect_max`` are global:
writable only in the initial network namespace, and every namespace is held
against them; ``nf_conntrack_buckets`` sizes the one hash table all namespaces
share.  A lab run that changes them must give them back, on ``down``, on
an error, on a signal, and through ``labkit clean`` after a crash.  So the
originals go to a state file (atomically, before anything is written), and one
machine-wide claim file says which state file owns the globals: two labs on one
machine never save each other's values as "original".
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from labkit.exceptions import GlobalSysctlsHeld, SavedSysctlsUnreadable, SysctlError, TestbedError
from labkit.host import Host, LocalHost, sysctl_name

log = logging.getLogger(__name__)

GLOBAL_SYSCTLS = frozenset({
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_expect_max",
    "net.nf_conntrack_max",
    "net.netfilter.nf_conntrack_buckets",
})
CLAIM_PATH = "/run/lock/labkit-global-sysctls.claim"
STATE_NAME = "global-sysctls.json"
BACKUP_SUFFIX = ".bak"


def state_dir() -> Path:
    """Where labkit keeps run state (ledgers, saved sysctls): $LABKIT_STATE_DIR or /run/labkit."""
    return Path(os.environ.get("LABKIT_STATE_DIR", "/run/labkit"))


def is_global(name: str) -> bool:
    """True for the sysctls that only the initial network namespace may set."""
    return sysctl_name(name) in GLOBAL_SYSCTLS


def check_max(host: Host, value: int, where: str = "in its own namespace") -> None:
    """Refuse an ``nf_conntrack_max`` below what ``host``'s namespace already tracks.

    Args:
        host: the namespace to read ``nf_conntrack_count`` in.
        value: the new global max.
        where: how the message names that namespace.

    Raises:
        TestbedError: ``value`` is below the current ``nf_conntrack_count`` there.
    """
    tracked = int(host.read_sysctl("net.netfilter.nf_conntrack_count"))
    if int(value) < tracked:
        raise TestbedError(
            f"refusing to set net.netfilter.nf_conntrack_max={value}: the machine already tracks {tracked} "
            f"connections {where}; lowering the max below that would drop them")


class GlobalSysctls:
    """Set and restore the global sysctls for one lab run.

    Args:
        owner: the run id that owns the change (kept in the state file).
        host: the machine (its initial namespace); this machine by default.
        directory: the state directory; :func:`state_dir` by default.
        claim_path: the machine-wide claim file (tests may point it elsewhere).
        files: the machine holding the state and claim files (this one by default; the
            netns testbed passes its machine, so that they live beside the globals).
    """

    def __init__(self, owner: str, *, host: Host | None = None, directory: Path | None = None,
                 claim_path: str = CLAIM_PATH, files: Host | None = None):
        self.owner = owner
        self.host = host or LocalHost()
        self.files = files or LocalHost()
        self.dir = Path(directory or state_dir())
        self.path = self.dir / STATE_NAME
        self.claim_path = Path(claim_path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.files.makedirs(self.claim_path.parent)
        with self.files.lock(str(self.claim_path) + ".lock"):
            yield

    def _read(self, path: Path) -> str:
        return self.files.read_file(str(path)).decode()

    def _claimant(self) -> str | None:
        try:
            return self._read(self.claim_path).strip() or None
        except FileNotFoundError:
            return None

    @property
    def backup_path(self) -> Path:
        """The second copy of the state file."""
        return self.path.with_name(self.path.name + BACKUP_SUFFIX)

    def _state(self) -> dict:
        """The saved state: the file, else its copy; {} when neither exists.

        Raises:
            SavedSysctlsUnreadable: a file exists but neither copy can be read.
        """
        problems = []
        for path in (self.path, self.backup_path):
            try:
                state = json.loads(self._read(path))
                if not isinstance(state, dict) or not isinstance(state.get("saved", {}), dict):
                    raise ValueError("not a labkit saved-sysctls document")
            except FileNotFoundError:
                continue
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(f"{path}: {exc}")
                continue
            if problems:
                log.warning("%s; using the copy %s", problems[0], path)
            return state
        if problems:
            raise SavedSysctlsUnreadable(self.path, "; ".join(problems))
        return {}

    def _write_state(self, state: dict) -> None:
        data = json.dumps(state, indent=1).encode()
        self.files.atomic_write(self.backup_path, data)  # the copy first: the main file's old version stays whole
        self.files.atomic_write(self.path, data)

    def _remove_state(self) -> None:
        self.files.remove(self.path)
        self.files.remove(self.backup_path)

    def saved(self) -> dict[str, str]:
        """The original values saved by this state directory (empty when none)."""
        return dict(self._state().get("saved", {}))

    def set(self, values: Mapping[str, int], *, wait: float = 0.0) -> None:
        """Save the originals (first time only), then write ``values``.

        Args:
            values: global sysctls (dotted or /proc/sys form) and their new values.
            wait: seconds to wait while another lab run holds the globals.

        Raises:
            SysctlError: a name is not a global sysctl, or the kernel refused a value.
            GlobalSysctlsHeld: another run holds the globals (after ``wait``).
            TestbedError: a new
                ``nf_conntrack_max`` is below what the machine already tracks.
        """
        names = {sysctl_name(n): v for n, v in values.items()}
        for name in names:
            if name not in GLOBAL_SYSCTLS:
                raise SysctlError(name, self.host.name, "not a global sysctl; set it in its namespace")
        deadline = time.monotonic() + wait
        while True:
            with self._locked():
                claimant = self._claimant()
                if claimant in (None, str(self.path)) or not self.files.exists(claimant):
                    self._set_locked(names)
                    return
            if time.monotonic() >= deadline:
                raise GlobalSysctlsHeld(describe_claimant(claimant))
            time.sleep(0.2)

    def _set_locked(self, names: dict[str, int]) -> None:
        state = self._state() or {"owner": self.owner, "saved": {}}
        saved = state["saved"]
        for name in names:
            if name not in saved:
                saved[name] = self.host.read_sysctl(name)
        self.files.makedirs(self.dir)
        self._write_state(state)
        self.files.atomic_write(self.claim_path, str(self.path).encode())
        for name, value in names.items():
            if name.endswith("nf_conntrack_max"):
                check_max(self.host, value)
            log.info("global %s=%s (was %s)", name, value, saved[name])
            self.host.write_sysctl(name, value)

    def restore(self, *, defaults_if_unreadable: bool = False) -> dict[str, str]:
        """Write the saved originals back and forget them; idempotent.

        Args:
            defaults_if_unreadable: when neither copy of the state file can be read,
                write the kernel's defaults (:func:`kernel_defaults`) instead of raising
                (what ``labkit clean`` does).

        Returns:
            The values restored (empty when nothing was saved).

        Raises:
            SavedSysctlsUnreadable: both copies are damaged and ``defaults_if_unreadable`` is false.
        """
        with self._locked():
            try:
                saved = self._state().get("saved", {})
            except SavedSysctlsUnreadable:
                if not defaults_if_unreadable:
                    raise
                saved = kernel_defaults(self.host)
                log.warning("%s and its copy are unreadable: restoring the kernel's defaults %s",
                            self.path, saved)
            for name, value in reversed(list(saved.items())):
                self.host.write_sysctl(name, value)
                log.info("restored global %s=%s", name, value)
            self._remove_state()
            if self._claimant() == str(self.path):
                self.files.remove(self.claim_path)
            return saved


def restore_crashed(directory: Path | None = None, *, host: Host | None = None,
                    claim_path: str = CLAIM_PATH, files: Host | None = None) -> dict[str, str]:
    """Give back the globals a crashed run of ``directory`` saved (for ``labkit clean``).

    Only the originals saved in that state directory are written back, and only its
    own claim is released: another run's globals are never touched.

    Returns:
        The values restored (empty when that directory saved none).
    """
    return GlobalSysctls("clean", host=host, directory=directory, claim_path=claim_path,
                         files=files).restore(defaults_if_unreadable=True)


def kernel_defaults(host: Host | None = None) -> dict[str, str]:
    """The values the kernel gives ``nf_conntrack_max`` and ``nf_conntrack_expect_max`` at boot.

    Derived as ``nf_conntrack_init_start()`` does from the hash size
    (``nf_conntrack_buckets``, which labkit never changes): the max equals the
    buckets, expect_max is 4 x max(1, buckets / 256).
    """
    host = host or LocalHost()
    buckets = int(host.read_sysctl("net.netfilter.nf_conntrack_buckets"))
    return {"net.netfilter.nf_conntrack_max": str(buckets),
            "net.netfilter.nf_conntrack_expect_max": str(4 * max(1, buckets // 256))}


def describe_claimant(claimant: str | None) -> str:
    """Why the globals are held, and the command that can release them.

    A replay's notebooks keep their state under ``replay-<run-id>/``: only that
    replay (or, once it has crashed, ``labkit clean``) releases them, not ``labkit down``.
    """
    state = Path(claimant) if claimant else None
    replay = next((p.name[len("replay-"):] for p in (state.parents if state else [])
                   if p.name.startswith("replay-")), None)
    if replay:
        return (f"the global conntrack sysctls are held by replay {replay} (state {claimant}); "
                "wait for it to finish (or stop it with Ctrl-C), give `--wait SECONDS` to wait here, "
                "or run `labkit clean` if it crashed")
    return (f"the global conntrack sysctls are held by another lab run (state {claimant}); "
            "bring it down with `labkit down` (or wait with `--wait SECONDS`), "
            "or run `labkit clean` if it crashed")
