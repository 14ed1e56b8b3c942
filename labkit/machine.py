"""The machine primitives of a Host: its files and processes, one command each, or natively here.

:class:`MachineOps` (mixed into :class:`~labkit.host.Host`) does what a testbed needs
to keep its state, ledger and servers on the machine it builds on (folders, atomic
writes, appends, a lock, a detached process in a cgroup, a process's start time,
a namespace's inode), each with the host's ``run()`` (or, for an SSH host with an
SFTP session of its own, over SFTP).  :class:`ThisMachineOps` does the same with
syscalls, for :class:`~labkit.host.LocalHost` and :class:`~labkit.host.NetnsHost`:
no process per call, so the local testbed is as fast as it was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import pwd
import shutil
import signal
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from labkit.exceptions import LabkitError, TestbedError

NETNS_DIR = "/run/netns"

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


class MachineOps:
    """The machine primitives, each one command through the host's ``run()`` (or SFTP; see the module)."""

    name: str = "host"

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
        self.kill_all([pid], sig)

    def kill_all(self, pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of ``pids`` with one command; those gone are skipped."""
        if pids:
            self.run(["kill", "-s", signal.Signals(sig).name[3:], "--", *(str(int(p)) for p in pids)],
                     check=False, timeout=30)

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


_children: dict[int, subprocess.Popen] = {}  # servers this process started: reaped once they end


class ThisMachineOps(MachineOps):
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

    def kill_all(self, pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process of ``pids``; those gone are skipped."""
        for pid in pids:
            self.kill(pid, sig)

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


