"""One way to run a command on any machine or namespace the lab touches.

:class:`Host` is the interface: ``run(cmd) -> Result``, sysctls, and files.
:class:`LocalHost` runs on this machine, :class:`NetnsHost` inside a named
network namespace of this machine; :class:`labkit.ssh.SSHHost` (Paramiko) on a
remote machine.  Every command returns a :class:`Result` that keeps the exit
code; ``check=True`` (the default) turns a non-zero exit into
:class:`~labkit.exceptions.CommandFailed`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import posixpath
import pwd
import re
import shutil
import shlex
import signal
import stat
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from labkit.exceptions import CommandFailed, CommandTimedOut, LabkitError, SysctlError, TestbedError

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


_SPAWN_SCRIPT = (
    'cg=$1; lg=${2:-/dev/null}; shift 2; '
    'setsid sh -c \'if [ -n "$1" ]; then echo $$ > "$1/cgroup.procs" || exit 1; fi; shift; exec "$@"\' '
    'sh "$cg" "$@" </dev/null >/dev/null 2>>"$lg" & echo $!')
"""Start a command detached: it joins the cgroup ($1, if any), appends stderr to $2; prints its pid.
(In a non-interactive shell a background job leads no process group, so ``setsid`` does not fork.)"""


def parse_proc_start(stat: str) -> int | None:
    """The start time (field 22, clock ticks since boot) in a ``/proc/PID/stat`` text; None for a zombie."""
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _shell_os_error(stderr: str, path: str) -> OSError:
    """An OSError for what a shell tool said about ``path`` (errno from the message's words)."""
    text = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    for code in (errno.ENOENT, errno.EEXIST, errno.EBUSY, errno.ENOTEMPTY, errno.EACCES, errno.EPERM):
        if os.strerror(code).lower() in text.lower():
            return OSError(code, f"{os.strerror(code)} ({text})", path)
    return OSError(errno.EIO, text, path)


class Host(ABC):
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

    # --- the machine's files and processes, through run() (LocalHost overrides natively) ---------
    # What a testbed needs to keep its state, ledger and servers on the machine it builds on,
    # whether this one or another reached over SSH.  Each is one command on that machine.

    def netns(self, name: str, *, host_name: str | None = None) -> "Host":
        """A view of this machine inside its named network namespace ``name``.

        Raises:
            TestbedError: this kind of host has no namespace views.
        """
        raise TestbedError(f"{self.name}: no network namespace views on a {type(self).__name__}")

    @property
    def is_local(self) -> bool:
        """True when this host is the machine labkit runs on (its processes are ours)."""
        return False

    def _file_session(self):
        """The host's own SFTP session (an SSHHost without ``sudo``), or None: one command per call instead.

        A file operation over SFTP takes a round trip; a command starts a login shell.
        """
        get = getattr(self, "sftp", None)
        return None if get is None or getattr(self, "sudo", True) else get()

    def exists(self, path: str | os.PathLike) -> bool:
        """True when ``path`` exists on this host."""
        sftp = self._file_session()
        if sftp is not None:
            try:
                sftp.stat(os.fspath(path))
                return True
            except FileNotFoundError:
                return False
        return self.run(["test", "-e", os.fspath(path)], check=False, timeout=30).ok

    def makedirs(self, path: str | os.PathLike, mode: int | None = None, *, exist_ok: bool = True) -> None:
        """Make a folder and its parents; ``mode`` for the last one.

        Raises:
            FileExistsError: it exists and not ``exist_ok``.
            OSError: it cannot be made (the host's reason).
        """
        path = os.fspath(path)
        if exist_ok and mode is None and self.exists(path):
            return
        if not exist_ok:
            parent = posixpath.dirname(path.rstrip("/")) or "/"
            res = self.run(["sh", "-c", 'mkdir -p -- "$1" && mkdir -- "$2"', "sh", parent, path],
                           check=False, timeout=30)
        else:
            res = self.run(["mkdir", "-p", "--", path], check=False, timeout=30)
        if not res.ok:
            raise _shell_os_error(res.stderr, path)
        if mode is not None:
            self.run(["chmod", f"{mode:o}", "--", path], timeout=30)

    def remove(self, path: str | os.PathLike) -> None:
        """Remove a file or a whole folder; nothing to do when it is gone."""
        sftp = self._file_session()
        if sftp is not None:
            try:
                if not stat.S_ISDIR(sftp.lstat(os.fspath(path)).st_mode or 0):
                    sftp.remove(os.fspath(path))
                    return
            except FileNotFoundError:
                return
        self.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], timeout=60)

    def rmdir(self, path: str | os.PathLike) -> None:
        """Remove an empty folder (a cgroup).

        Raises:
            OSError: it is busy, not empty or gone (``errno`` as the host's ``rmdir`` said).
        """
        res = self.run(["rmdir", "--", os.fspath(path)], check=False, timeout=30)
        if not res.ok:
            raise _shell_os_error(res.stderr, os.fspath(path))

    def entries(self, path: str | os.PathLike) -> list[tuple[str, bool, float]]:
        """``(name, is_dir, mtime)`` of each entry of a folder (empty when it does not exist)."""
        sftp = self._file_session()
        if sftp is not None:
            try:
                return [(a.filename, stat.S_ISDIR(a.st_mode or 0), float(a.st_mtime or 0))
                        for a in sftp.listdir_attr(os.fspath(path))]
            except FileNotFoundError:
                return []
        res = self.run(["find", os.fspath(path), "-mindepth", "1", "-maxdepth", "1",
                        "-printf", "%y %T@ %f\\n"], check=False, timeout=30)
        out = []
        for line in res.stdout.splitlines() if res.ok else []:
            kind, mtime, name = line.split(" ", 2)
            out.append((name, kind == "d", float(mtime)))
        return out

    def append_file(self, path: str | os.PathLike, data: bytes) -> None:
        """Append ``data`` to a file (made with mode 0600, in a folder made if missing) and flush it to disk."""
        path = os.fspath(path)
        sftp = self._file_session()
        if sftp is not None:  # no fsync over SFTP: the data is in that machine's kernel once this returns
            new = not self.exists(path)
            if new:
                self.makedirs(posixpath.dirname(path))
            with sftp.open(path, "a") as f:
                f.write(data)
            if new:
                sftp.chmod(path, 0o600)
            return
        script = 'umask 077; mkdir -p "${1%/*}" && dd of="$1" oflag=append conv=notrunc,fsync status=none'
        self.run(["sh", "-c", script, "sh", path], input=data, timeout=60)

    def atomic_write(self, path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
        """Write a file atomically: a temporary file beside it, flushed, then renamed over it."""
        path = os.fspath(path)
        sftp = self._file_session()
        if sftp is not None:
            folder, name = posixpath.split(path)
            tmp = posixpath.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
            try:
                with sftp.open(tmp, "wb") as f:
                    f.write(data)
                sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, path)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except OSError:
                    pass
                raise
            return
        script = ('t=$(mktemp "$(dirname "$1")/.$(basename "$1").XXXXXX.tmp") || exit 1; '
                  'if cat > "$t" && chmod "$2" "$t" && sync "$t" && mv -f "$t" "$1"; then exit 0; fi; '
                  'rm -f "$t"; exit 1')
        self.run(["sh", "-c", script, "sh", os.fspath(path), f"{mode:o}"], input=data, timeout=60)

    def netns_inode(self, name: str) -> int | None:
        """The inode of named network namespace ``name`` (None when there is none)."""
        res = self.run(["stat", "-L", "-c", "%i", os.path.join(NETNS_DIR, name)], check=False, timeout=30)
        return int(res.stdout) if res.ok and res.stdout.strip().isdigit() else None

    def own_netns_inode(self) -> int:
        """The inode of this host's own network namespace."""
        return int(self.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"], timeout=30).stdout)

    def proc_start_time(self, pid: int) -> int | None:
        """A live process's start time in clock ticks since boot; None when gone or a zombie."""
        try:
            return parse_proc_start(self.read_file(f"/proc/{int(pid)}/stat").decode())
        except (OSError, LabkitError):
            return None

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``pid``; nothing to do when it is gone."""
        self.run(["kill", "-s", signal.Signals(sig).name[3:], "--", str(int(pid))], check=False, timeout=30)

    def reap(self, pids=None) -> None:
        """Collect exited children of this process among ``pids`` (None: every zombie child).

        Only this process can reap its children: nothing to do on another machine.
        """

    def has_user(self, user: str) -> bool:
        """True when the user exists on this host."""
        return self.run(["id", "-u", "--", user], check=False, timeout=30).ok

    def which(self, program: str) -> bool:
        """True when ``program`` is installed (on PATH or in /usr/sbin, /sbin)."""
        return self.run(["sh", "-c", 'PATH="$PATH:/usr/sbin:/sbin" command -v "$1"', "sh", program],
                        check=False, timeout=30).ok

    def spawn(self, argv: Sequence[str], *, cgroup: str | None = None, log: str | None = None) -> int:
        """Start ``argv`` in the background, detached (own session), and return its pid.

        Args:
            argv: the command; ``ip netns exec NS ...`` to start it in a namespace.
            cgroup: a cgroup folder it joins before it execs (so whoever removes the
                cgroup ends it and all it forks).
            log: a file its stderr is appended to (stdout goes nowhere).
        """
        res = self.run(["sh", "-c", _SPAWN_SCRIPT, "sh", cgroup or "", log or "", *argv], timeout=30)
        return int(res.stdout.split()[-1])

    @contextmanager
    def lock(self, path: str | os.PathLike) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``path`` (a folder, or a file made if missing) for the block.

        The lock is held by ``flock`` on the host; it is released when the block ends or
        when this process's connection to the host goes.
        """
        stream_of = getattr(self, "stream", None)
        if stream_of is None:
            raise TestbedError(f"{self.name}: cannot hold a lock on a {type(self).__name__}")
        stream = stream_of(["flock", "--", os.fspath(path), "sh", "-c",
                            "echo locked; while sleep 0.05; do echo; done"])
        try:
            for line in stream:
                if line == "locked":
                    break
            else:
                raise TestbedError(f"{self.name}: could not lock {path}")
            yield
        finally:
            stream.stop()

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


_children: dict[int, subprocess.Popen] = {}  # servers this process started: reaped once they end


class _ThisMachine(Host):
    """The machine primitives of :class:`Host` done natively: syscalls, no process per call."""

    @property
    def is_local(self) -> bool:
        """True: this machine."""
        return True

    def exists(self, path) -> bool:
        """True when ``path`` exists."""
        return os.path.exists(path)

    def makedirs(self, path, mode=None, *, exist_ok=True) -> None:
        """Make a folder and its parents (``mode`` for the last one)."""
        path = Path(path)
        if not exist_ok:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o755 if mode is None else mode)
        else:
            path.mkdir(parents=True, exist_ok=True)
        if mode is not None:
            os.chmod(path, mode)

    def remove(self, path) -> None:
        """Remove a file or a whole folder; nothing to do when it is gone."""
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def rmdir(self, path) -> None:
        """Remove an empty folder (a cgroup)."""
        Path(path).rmdir()

    def entries(self, path) -> list[tuple[str, bool, float]]:
        """``(name, is_dir, mtime)`` of each entry of a folder (empty when it does not exist)."""
        try:
            with os.scandir(path) as it:
                return [(e.name, e.is_dir(follow_symlinks=False), e.stat(follow_symlinks=False).st_mtime)
                        for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def append_file(self, path, data: bytes) -> None:
        """Append ``data`` to a file (mode 0600 when made, in a folder made if missing) and fsync it."""
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def atomic_write(self, path, data: bytes, mode: int = 0o644) -> None:
        """Write a file atomically (see :func:`labkit.util.atomic_write`)."""
        from labkit.util import atomic_write

        atomic_write(path, data, mode=mode)

    def netns_inode(self, name: str) -> int | None:
        """The inode of named network namespace ``name`` (None when there is none)."""
        try:
            return os.stat(os.path.join(NETNS_DIR, name)).st_ino
        except FileNotFoundError:
            return None

    def own_netns_inode(self) -> int:
        """The inode of the network namespace labkit runs in."""
        return os.stat("/proc/self/ns/net").st_ino

    def proc_start_time(self, pid: int) -> int | None:
        """A live process's start time in clock ticks since boot; None when gone or a zombie."""
        try:
            with open(f"/proc/{int(pid)}/stat") as f:
                return parse_proc_start(f.read())
        except (FileNotFoundError, ProcessLookupError):
            return None

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to ``pid``; nothing to do when it is gone."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self, pids=None) -> None:
        """Collect our exited children among ``pids`` (None: every zombie child of ours)."""
        if pids is None:
            pids = _zombie_children()
        for pid in pids:
            proc = _children.get(pid)
            if proc is not None:
                if proc.poll() is not None:
                    del _children[pid]
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def has_user(self, user: str) -> bool:
        """True when the user exists here."""
        try:
            pwd.getpwnam(user)
            return True
        except KeyError:
            return False

    def which(self, program: str) -> bool:
        """True when ``program`` is installed (on PATH or in /usr/sbin, /sbin)."""
        return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is not None

    def spawn(self, argv, *, cgroup=None, log=None) -> int:
        """Start ``argv`` detached (own session), in ``cgroup`` before it execs; return its pid."""
        if cgroup:
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(cgroup, "cgroup.procs"), *argv]
        with open(log or os.devnull, "ab") as err:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True, close_fds=True)
        _children[proc.pid] = proc
        return proc.pid

    @contextmanager
    def lock(self, path) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``path`` (a folder, or a file made if missing)."""
        if os.path.isdir(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


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


class LocalHost(_ThisMachine):
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


NETNS_DIR = "/run/netns"
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


class NetnsHost(_ThisMachine):
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
