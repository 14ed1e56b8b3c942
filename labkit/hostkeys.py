"""The lab's own known_hosts: pinning SSH host keys, and refusing unknown or changed ones.

Paramiko's ``RejectPolicy`` (here :class:`RefuseUnknownKey`, with a message that
says what to do) is the default; :class:`PinOnFirstUse` is the explicit
trust-on-first-use option, which writes the key into the file.  A key that
differs from a pinned one is never accepted (:func:`changed_key_error`).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

import paramiko

from labkit.exceptions import HostKeyError
from labkit.util import atomic_write

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = Path(os.environ.get("LABKIT_KNOWN_HOSTS")
                           or Path.home() / ".config" / "labkit" / "known_hosts")


def known_hosts_name(hostname: str, port: int) -> str:
    """The name a host has in a known_hosts file: ``host`` or ``[host]:port``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def describe_key(key: paramiko.PKey) -> str:
    """A key as OpenSSH shows it: its type and SHA256 fingerprint."""
    return f"{key.get_name()} {key.fingerprint}"


def pin_host_key(path: str | os.PathLike, name: str, key: paramiko.PKey) -> None:
    """Add ``name key`` to the known_hosts file ``path`` (created if missing).

    The file is rewritten atomically under an exclusive lock, so concurrent
    pinning from several processes keeps every line.

    Raises:
        HostKeyError: ``name`` is already pinned with a different key of that type.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keys = paramiko.HostKeys()
        if path.exists():
            keys.load(str(path))
        known = keys.lookup(name) or {}
        old = known.get(key.get_name())
        if old is not None:
            if old == key:
                return
            raise HostKeyError(f"{name}: {path} already pins {describe_key(old)}, not "
                               f"{describe_key(key)}; remove the old line first "
                               f"(ssh-keygen -R '{name}' -f {path})")
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"{name} {key.get_name()} {key.get_base64()}\n"
        atomic_write(path, text.encode(), 0o600)


class RefuseUnknownKey(paramiko.RejectPolicy):
    """Paramiko's RejectPolicy, raising an error that says what to do."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"{hostname}: host key not in the lab's known_hosts {self.known_hosts}; the server "
            f"offers {describe_key(key)}. Compare it with the host's own key (on the host: "
            f"ssh-keygen -lf /etc/ssh/ssh_host_{_key_file_kind(key)}_key.pub), then pin it "
            "by connecting once with trust_on_first_use=True (labkit: --trust-on-first-use), "
            f"or add the host's key line to {self.known_hosts}."
        )


class PinOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Trust-on-first-use: accept an unknown key once and pin it in known_hosts."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        pin_host_key(self.known_hosts, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("%s: trusted on first use and pinned in %s: %s", hostname, self.known_hosts,
                    describe_key(key))


def _key_file_kind(key: paramiko.PKey) -> str:
    name = key.get_name()
    if "ed25519" in name:
        return "ed25519"
    if "ecdsa" in name:
        return "ecdsa"
    return "rsa"


def changed_key_error(where: str, label: str, known_hosts: Path,
                      exc: paramiko.BadHostKeyException) -> HostKeyError:
    """The refusal of a host whose key differs from the pinned one: which host,
    both fingerprints, and what to do."""
    return HostKeyError(
        f"{where}: HOST KEY CHANGED for {label}: the lab's known_hosts {known_hosts} "
        f"pins {describe_key(exc.expected_key)} but the server now offers "
        f"{describe_key(exc.key)}. Refusing to connect (this can be a man-in-the-middle). "
        "If the machine was re-created (e.g. vagrant destroy + up), remove the old key "
        f"with: ssh-keygen -R '{label}' -f {known_hosts} -- then connect again with "
        "trust_on_first_use=True to pin the new one."
    )
