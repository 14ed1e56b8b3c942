"""One way to run a command on any machine or namespace the lab touches.

:class:`Host` is the interface: ``run(cmd) -> Result``, sysctls, and files.
:class:`LocalHost` runs on this machine, :class:`NetnsHost` inside a named
network namespace of this machine; :class:`labkit.remote.SSHHost` (Paramiko) on a
remote machine.  Every command returns a :class:`Result` that keeps the exit
code; ``check=True`` (the default) turns a non-zero exit into
:class:`~labkit.exceptions.CommandFailed`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from labkit.exceptions import CommandFailed, CommandTimedOut, SysctlError, TestbedError
from labkit.machine import NETNS_DIR, MachineOps, ThisMachineOps, parse_proc_start  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

T = TypeVar("T")

Command = str | Sequence[str]
DEFAULT_TIMEOUT = 60.0
PROC_SYS = "/proc/sys/"
_SYSCTL_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Result:
    """What one command did.

    Attributes:
        command: the command as a shell would show it.
        host: the name of the host (or namespace) it ran on.
        exit_code: its exit status.
        stdout, stderr: what it printed, decoded as UTF-8 (invalid bytes replaced).
        duration: wall-clock seconds from start to exit.
    """

    command: str
    host: str
    exit_code: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.exit_code == 0

    def check(self) -> "Result":
        """Return self when ok; raise :class:`CommandFailed` otherwise."""
        if not self.ok:
            raise CommandFailed(self)
        return self

    def __repr__(self) -> str:
        cmd = self.command if len(self.command) <= 60 else self.command[:57] + "..."
        return f"<Result {self.host} {cmd!r} exit={self.exit_code} {self.duration:.2f}s>"


def command_text(cmd: Command) -> str:
    """Return ``cmd`` as one shell-quoted string (a string is returned as is)."""
    if isinstance(cmd, str):
        return cmd
    return shlex.join(str(c) for c in cmd)


def sysctl_path(name: str) -> str:
    """Turn a sysctl name into its ``/proc/sys`` path, refusing anything else.

    Args:
        name: dotted (``net.netfilter.nf_conntrack_max``) or path form
            (``/proc/sys/net/netfilter/nf_conntrack_max``).  In the dotted form a
            ``/`` stands for a dot inside a component (``net.ipv4.conf.eth0/1.rp_filter``).

    Returns:
        The absolute path under ``/proc/sys``.

    Raises:
        SysctlError: the name is empty, has an empty or invalid component, or
            points outside ``/proc/sys``.
    """
    if not isinstance(name, str) or not name.strip():
        raise SysctlError(str(name), "-", "invalid sysctl name: empty")
    if name.startswith("/"):
        if not name.startswith(PROC_SYS):
            raise SysctlError(name, "-", "invalid sysctl name: a path must start with /proc/sys/")
        parts = name[len(PROC_SYS):].split("/")
    else:
        parts = [p.replace("/", ".") for p in name.split(".")]
    for part in parts:
        if not _SYSCTL_PART.match(part.replace(".", "_")) or part in (".", ".."):
            raise SysctlError(
                name, "-", f"invalid sysctl name: component {part!r} is not of the form "
                "letters, digits, '_' or '-' (use net.netfilter.nf_conntrack_max or "
                "/proc/sys/net/netfilter/nf_conntrack_max)"
            )
    return PROC_SYS + "/".join(parts)


def sysctl_name(name: str) -> str:
    """Return the dotted form of a sysctl given in either form (validated)."""
    path = sysctl_path(name)
    return ".".join(p.replace(".", "/") for p in path[len(PROC_SYS):].split("/"))


class Host(MachineOps, ABC):
    """A machine or namespace that labkit can run commands on.

    Subclasses implement :meth:`_run`, :meth:`_read`, and :meth:`_write`; the rest
    (checking, sysctls, files) is shared.
    """

    name: str = "host"

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run a command and wait for it.

        Args:
            cmd: an argv list (run without a shell) or a string (run by ``sh -c``).
            timeout: seconds before the command is ended; None waits forever.
            check: raise :class:`CommandFailed` when it exits non-zero.
            input: data for its standard input.
            env: extra environment variables.

        Returns:
            The :class:`Result`.

        Raises:
            CommandFailed: ``check`` is true and the exit code is not 0.
            CommandTimedOut: the deadline passed; the command was ended.
        """
        result = self._run(cmd, timeout=timeout, input=input, env=env)
        log.debug("%r", result)
        return result.check() if check else result

    @abstractmethod
    def _run(self, cmd: Command, *, timeout: float | None, input: str | bytes | None,
             env: Mapping[str, str] | None) -> Result:
        """Run ``cmd`` and return its Result without checking the exit code."""

    @abstractmethod
    def read_file(self, path: str) -> bytes:
        """Return the content of a file on this host.

        Raises:
            OSError: as the host's file system reports it.
        """

    @abstractmethod
    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write ``data`` to a file on this host (created or truncated).

        Raises:
            OSError: as the host's file system reports it.
        """

    def read_sysctl(self, name: str) -> str:
        """Return a sysctl's value as the kernel prints it, whitespace-trimmed.

        Raises:
            SysctlError: the name is invalid or the sysctl does not exist here.
        """
        path = sysctl_path(name)
        try:
            return self.read_file(path).decode().strip()
        except OSError as exc:
            raise SysctlError(name, self.name, _os_reason(exc)) from None

    def write_sysctl(self, name: str, value: Any) -> None:
        """Set a sysctl.

        Raises:
            SysctlError: the name is invalid, the sysctl does not exist, is
                read-only here, or the kernel refused the value (its message is kept).
        """
        path = sysctl_path(name)
        try:
            self.write_file(path, f"{value}\n".encode())
        except OSError as exc:
            raise SysctlError(name, self.name, _os_reason(exc), value=value) from None

    def put(self, local_path: str | os.PathLike, remote_path: str, mode: int | None = None) -> None:
        """Copy a local file to this host."""
        self.write_file(remote_path, Path(local_path).read_bytes(), mode)

    def get(self, remote_path: str, local_path: str | os.PathLike) -> None:
        """Copy a file of this host to a local path."""
        Path(local_path).write_bytes(self.read_file(remote_path))

    def close(self) -> None:
        """Release connections held for this host (nothing for local hosts)."""

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such sysctl on this host"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror} (read-only here: global sysctls can only be set in the initial network namespace)"
    return exc.strerror or str(exc)


def run_subprocess(argv: Sequence[str], display: str, host: str, *, timeout: float | None,
                   input: str | bytes | None, env: Mapping[str, str] | None) -> Result:
    """Run ``argv`` locally in its own process group; end the group at the deadline.

    Returns:
        The :class:`Result`.

    Raises:
        CommandTimedOut: the deadline passed.
    """
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    data = input.encode() if isinstance(input, str) else input
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, start_new_session=True,
        )
    except FileNotFoundError:
        return Result(display, host, 127, "", f"{argv[0]}: command not found", time.monotonic() - start)
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise CommandTimedOut(display, host, timeout or 0, _decode(out), _decode(err)) from None
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM turned into an exception): let the command
        # clean up after itself as it would at a terminal, then make sure it is gone.
        _interrupt_group(proc)
        raise
    return Result(display, host, proc.returncode, _decode(out), _decode(err), time.monotonic() - start)


INTERRUPT_GRACE_S = 3.0


def _interrupt_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(INTERRUPT_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    _kill_group(proc.pid)
    proc.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


def _argv(cmd: Command) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]


class LocalHost(ThisMachineOps, Host):
    """This machine, in the network namespace labkit runs in."""

    def __init__(self, name: str = "local"):
        self.name = name

    def netns(self, name: str, *, host_name: str | None = None) -> "NetnsHost":
        """A view of this machine inside its named network namespace ``name``."""
        return NetnsHost(name, name=host_name)

    def _run(self, cmd, *, timeout, input, env) -> Result:
        return run_subprocess(_argv(cmd), command_text(cmd), self.name, timeout=timeout,
                              input=input, env=env)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        _write_local(path, data, mode)


def _write_local(path: str, data: bytes, mode: int | None) -> None:
    flags = os.O_WRONLY if path.startswith("/proc/") else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o644 if mode is None else mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)
    if mode is not None:
        os.chmod(path, mode)


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` in a thread that has joined network namespace ``netns``.

    Only that short-lived thread changes namespace (``setns`` acts on the calling
    thread), so the rest of the process is untouched and no process is started.
    Sysctls under ``/proc/sys/net`` and files under ``/proc/thread-self/net``
    opened there are the namespace's own.

    Raises:
        TestbedError: the namespace does not exist or cannot be joined.
        Whatever ``fn`` raises.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
        except OSError as exc:
            box["error"] = TestbedError(f"network namespace {netns!r}: {exc.strerror}")
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                box["error"] = TestbedError(f"cannot join network namespace {netns!r}: {os.strerror(err)}")
                return
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class NetnsHost(ThisMachineOps, Host):
    """A named network namespace of this machine (``ip netns`` names, /run/netns).

    Commands run through ``ip netns exec``; sysctls are read and written in
    process, from a thread that joined the namespace.  Files outside ``/proc/sys``
    are this machine's files: a network namespace shares the file system.
    """

    def __init__(self, netns: str, name: str | None = None):
        self.netns = netns
        self.name = name or netns

    def _run(self, cmd, *, timeout, input, env) -> Result:
        argv = ["ip", "netns", "exec", self.netns, *_argv(cmd)]
        return run_subprocess(argv, command_text(cmd), self.name, timeout=timeout,
                              input=input, env=env)

    def read_file(self, path: str) -> bytes:
        if path.startswith(PROC_SYS) or path.startswith("/proc/thread-self/"):
            return in_netns(self.netns, _read_local, path)
        return _read_local(path)

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        if path.startswith(PROC_SYS):
            in_netns(self.netns, _write_local, path, data, None)
        else:
            _write_local(path, data, mode)

    def exists(self, path=None) -> bool:
        """True when the namespace exists (or, given ``path``, when that file exists)."""
        return os.path.exists(path if path is not None else os.path.join(NETNS_DIR, self.netns))

    def own_netns_inode(self) -> int:
        """The inode of this namespace."""
        return os.stat(os.path.join(NETNS_DIR, self.netns)).st_ino


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
