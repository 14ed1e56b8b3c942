"""Files on a machine reached over SSH: the command agent, the SFTP session, or ``cat``/``tee``.

:class:`SSHTransfer` reads, writes and copies files through the connection's
command agent (:mod:`labkit.remote.agent`, as the user it runs as: root with
``sudo``) when the machine runs one; otherwise over the connection's one
SFTP session.  Files the login user cannot touch (a Vagrant box's ``vagrant``
user writing the kubelet's configuration) and files that only look right from
inside a network namespace (``/proc/sys/net/...``) are read with ``cat`` and
written with ``sh -c 'cat > FILE'`` run through the executor, so they get its
``sudo -n`` and namespace prefix.  A remote tool's refusal becomes the
:class:`OSError` a local access would raise (``ENOENT``, ``EACCES``, ...).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

import paramiko

from labkit.exceptions import SSHError
from labkit.remote.connection import SSHConnection
from labkit.remote.executor import SSHExecutor

FILE_COMMAND_TIMEOUT = 60.0


class SSHTransfer:
    """File access over one SSH connection.

    With a ``sudo`` executor every file goes through ``cat``/``tee`` as root;
    otherwise through SFTP, except where a caller asks for a command (a
    namespace's ``/proc`` files, :meth:`cat` and :meth:`tee`).

    Args:
        connection: the machine's connection (its SFTP session).
        executor: runs ``cat`` and ``tee`` (with its ``sudo`` setting).
    """

    def __init__(self, connection: SSHConnection, executor: SSHExecutor):
        self.connection = connection
        self.executor = executor

    @property
    def name(self) -> str:
        """The machine's name, as errors give it."""
        return self.connection.name

    def read_file(self, path: str) -> bytes:
        """Return a remote file's content (over SFTP; with ``sudo``, ``sudo cat``).

        Raises:
            OSError: as the remote side reports it (no such file, permission denied).
            SSHError: the connection failed.
        """
        data = self.executor.file_op("read", path)
        if data is not None:
            return data
        if self.executor.sudo:
            return self.cat(path)
        try:
            with self.connection.sftp().open(path, "rb") as f:
                return f.read()
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: reading {path}: {exc}") from None

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write a remote file, created or truncated (over SFTP; with ``sudo``, ``sudo tee``).

        Raises:
            OSError: as the remote side reports it.
            SSHError: the connection failed.
        """
        if self.executor.file_op("write", path, data=data, mode=mode) is not None:
            return
        if self.executor.sudo:
            return self.tee(path, data, mode)
        try:
            sftp = self.connection.sftp()
            with sftp.open(path, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            if mode is not None:
                sftp.chmod(path, mode)
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: writing {path}: {exc}") from None

    def put(self, local_path: str | os.PathLike, remote_path: str, mode: int | None = None) -> None:
        """Copy a local file to the machine (by the agent, or over SFTP; with ``sudo``, ``sudo tee``)."""
        if self.executor.sudo or self.executor.agent() is not None:
            return self.write_file(remote_path, Path(local_path).read_bytes(), mode)
        try:
            sftp = self.connection.sftp()
            sftp.put(os.fspath(local_path), remote_path)
            if mode is not None:
                sftp.chmod(remote_path, mode)
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: copying {local_path} to {remote_path}: {exc}") from None

    def get(self, remote_path: str, local_path: str | os.PathLike) -> None:
        """Copy a file of the machine to a local path (by the agent, or over SFTP; with ``sudo``, ``sudo cat``)."""
        if self.executor.sudo or self.executor.agent() is not None:
            Path(local_path).write_bytes(self.read_file(remote_path))
            return
        try:
            self.connection.sftp().get(remote_path, os.fspath(local_path))
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.name}: copying {remote_path} to {local_path}: {exc}") from None

    def cat(self, path: str, *, prefix: Sequence[str] = (), host: str | None = None) -> bytes:
        """A file's content read by ``cat`` run through ``prefix`` (a namespace's view of /proc).

        Raises:
            OSError: ``cat`` failed (its message kept).
        """
        code, out, err, _ = self.executor.exec_command(
            ["cat", "--", path], prefix=prefix, timeout=FILE_COMMAND_TIMEOUT, display=f"cat {path}",
            host=host or self.name)
        if code != 0:
            raise remote_os_error(err.decode(errors="replace"), path)
        return out

    def tee(self, path: str, data: bytes, mode: int | None = None, *, prefix: Sequence[str] = (),
            host: str | None = None) -> None:
        """Write ``data`` to ``path`` with ``cat > path`` run through ``prefix``; then ``chmod``.

        Raises:
            OSError: the shell could not write the file (its message kept).
        """
        script = 'cat > "$1"' + (' && chmod "$2" "$1"' if mode is not None else "")
        argv = ["sh", "-c", script, "sh", path] + ([f"{mode:o}"] if mode is not None else [])
        code, _, err, _ = self.executor.exec_command(
            argv, prefix=prefix, timeout=FILE_COMMAND_TIMEOUT, input=data, display=f"write {path}",
            host=host or self.name)
        if code != 0:
            raise remote_os_error(err.decode(errors="replace"), path)


def remote_os_error(stderr: str, path: str) -> OSError:
    """Turn a remote tool's error message about ``path`` into an OSError."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    for code, words in ((errno.ENOENT, "No such file"), (errno.EACCES, "Permission denied"),
                        (errno.EROFS, "Read-only"), (errno.EINVAL, "Invalid argument")):
        if words in last:
            return OSError(code, os.strerror(code) + f" (remote: {last})", path)
    return OSError(errno.EIO, last, path)
