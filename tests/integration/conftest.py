"""A real OpenSSH server for the SSH tests, started and torn down by the tests.

``SSHServer`` runs ``sshd -D -e`` on 127.0.0.1 and a free port with its own host
key, its own authorized user key (for root, the user the tests run as) and no
PAM; nothing of the machine's own SSH set-up is read or changed.  The only
trace outside its temp directory is ``/run/sshd``, the privilege-separation
directory that OpenSSH requires and its package normally creates.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import need_program, need_root

SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                "/usr/libexec/sftp-server") if os.path.exists(p)), "internal-sftp")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """Make an unencrypted key pair at ``path`` (+ ``.pub``); return ``path``."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "labkit-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children first found, deepest last)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SSHServer:
    """One throw-away sshd on loopback.

    Attributes:
        host, port: where it listens.
        user: the user the tests log in as (the current user).
        user_key: private key file authorized for ``user``.
        host_key: the server's private host key file (``.pub`` beside it).
        dir: its temp directory.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lkt-sshd-"))
        self.host = "127.0.0.1"
        self.port = 0
        self.user = os.environ.get("USER") or "root"
        if os.geteuid() == 0:
            self.user = "root"
        self.host_key = keygen(self.dir / "host_ed25519")
        self.user_key = keygen(self.dir / "user_ed25519")
        (self.dir / "authorized_keys").write_text((self.dir / "user_ed25519.pub").read_text())
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "sshd.log"

    @property
    def host_key_line(self) -> str:
        """``type base64`` of the host key, as known_hosts holds it."""
        kind, b64 = (self.host_key.with_suffix(".pub")).read_text().split()[:2]
        return f"{kind} {b64}"

    def known_hosts_line(self) -> str:
        """The known_hosts line that pins this server's key."""
        return f"[{self.host}]:{self.port} {self.host_key_line}\n"

    def start(self) -> "SSHServer":
        """Start sshd and wait until it accepts connections."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privsep dir OpenSSH insists on
        for _ in range(5):
            self.port = free_port()
            config = self.dir / "sshd_config"
            config.write_text(
                f"Port {self.port}\nListenAddress {self.host}\nHostKey {self.host_key}\n"
                "PidFile none\nStrictModes no\nUsePAM no\n"
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\n"
                f"AllowUsers {self.user}\nMaxSessions 64\nMaxStartups 64\n"
                f"Subsystem sftp {SFTP_SERVER}\nLogLevel VERBOSE\n"
            )
            log = open(self.log, "ab")
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                         stdout=log, stderr=log, start_new_session=True)
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection((self.host, self.port), timeout=1) as s:
                        if s.recv(4).startswith(b"SSH-"):
                            return self
                except OSError:
                    time.sleep(0.05)
            self.stop(remove=False)  # port taken meanwhile, or too slow: try another port
        raise RuntimeError(f"sshd did not start; its log:\n{self.log.read_text()}")

    def drop_connections(self) -> int:
        """Kill every session this sshd forked (each runs in its own session, so
        stopping the listener alone leaves them up), as a dropped link would;
        return how many processes were killed."""
        if self.proc is None:
            return 0
        victims = _descendants(self.proc.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def stop(self, remove: bool = True) -> None:
        """Stop sshd and every session it forked; remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.drop_connections()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def ssh_host(self, known_hosts: Path | None = None, pin: bool = True, **options):
        """An :class:`labkit.remote.SSHHost` for this server.

        Args:
            known_hosts: the known_hosts file to use (default: a fresh one in the
                server's directory).
            pin: write this server's key into that file first.
        """
        from labkit.remote import SSHHost

        if known_hosts is None:
            known_hosts = Path(tempfile.mkstemp(dir=self.dir, prefix="known_hosts.")[1])
        if pin:
            known_hosts.write_text(self.known_hosts_line())
        options.setdefault("connect_timeout", 5)
        return SSHHost(self.host, port=self.port, username=self.user, key_filename=self.user_key,
                       known_hosts=known_hosts, **options)


def _serve():
    need_root()
    need_program("sshd", "ssh-keygen")
    server = SSHServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sshd():
    """A real OpenSSH server on loopback for the module's tests."""
    yield from _serve()


@pytest.fixture
def fresh_sshd():
    """A real OpenSSH server of its own, for tests that stop or re-key it."""
    yield from _serve()
