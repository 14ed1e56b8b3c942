"""One VM of labkit's box booted by plain QEMU (no libvirt, no Vagrant), reached over Paramiko.

For a machine without libvirt, or a quick look at the box: :class:`QemuGuest` boots
the box's image through a throw-away qcow2 overlay (the box stays untouched) with
direct kernel boot and QEMU's TCG emulation, and user networking with
``restrict=on``: the guest reaches nothing off its own network, not the host, not
the internet; the only way in is the SSH port forwarded from ``127.0.0.1``.  (The
box also takes no default route from DHCP.)

The guest's SSH host key is made at its first boot and written to its console
(``labkit-host-key: ...``, by the box's ``labkit-ssh-hostkeys`` unit); :meth:`QemuGuest.host`
pins it from there, so the connection is checked from the first byte.

    with QemuGuest(built.directory, work_dir) as guest:
        guest.host().run(["uname", "-r"])
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from labkit.exceptions import VMError
from labkit.hostkeys import known_hosts_name, pin_host_key
from labkit.remote import SSHHost
from labkit.testbed.vagrant import parse_host_key
from labkit.vm.box import KERNEL_CMDLINE

log = logging.getLogger(__name__)

KEY_LINE = re.compile(r"labkit-host-key: (ssh-ed25519 [A-Za-z0-9+/=]+)")
BOOT_TIMEOUT = 300.0


def vagrant_private_key() -> Path:
    """Vagrant's published insecure private key, which the box's ``vagrant`` user accepts.

    Raises:
        VMError: Vagrant is not installed.
    """
    patterns = ("usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant",
                "opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant",
                "opt/vagrant/embedded/gems/*/gems/vagrant-*/keys/vagrant")
    for pattern in patterns:
        found = sorted(Path("/").glob(pattern))
        if found:
            return found[-1]
    raise VMError("Vagrant's insecure private key (keys/vagrant) not found; install vagrant")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def box_cmdline(box_dir: Path) -> str:
    """The kernel command line of the box in ``box_dir``: its ``cmdline`` file (written by the
    box's recipe), or labkit's current one for a box built before boxes had that file."""
    path = Path(box_dir) / "cmdline"
    return path.read_text().strip() if path.is_file() else KERNEL_CMDLINE


def qemu_argv(box_dir: Path, disk: Path, console: Path, pidfile: Path, port: int, *,
              cpus: int = 1, memory: int = 1024, cmdline: str | None = None,
              initrd: Path | None = None) -> list[str]:
    """The QEMU command line of a guest of the box in ``box_dir`` (its ``vmlinuz``, ``initrd.img``
    and kernel command line, unless ``initrd``/``cmdline`` say otherwise).

    User networking with ``restrict=on``: the guest can open no connection off its network;
    only ``127.0.0.1:port`` is forwarded to its SSH port.
    """
    return ["qemu-system-x86_64", "-accel", "tcg", "-smp", str(cpus), "-m", str(memory),
            "-nodefaults", "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
            "-pidfile", str(pidfile),
            "-kernel", str(box_dir / "vmlinuz"), "-initrd", str(initrd or box_dir / "initrd.img"),
            "-append", box_cmdline(box_dir) if cmdline is None else cmdline,
            "-drive", f"file={disk},if=virtio,format=qcow2",
            "-netdev", f"user,id=net0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=net0"]


class QemuGuest:
    """A guest of labkit's box under plain QEMU.

    Args:
        box_dir: the built box's folder (``box.img``, ``vmlinuz``, ``initrd.img``).
        work: a folder for the overlay disk, console log, pid file and known_hosts
            (emptied at :meth:`stop`).
        cpus, memory: the guest's size (memory in MiB).
        cmdline, initrd: another kernel command line or initrd than the box's (to measure
            a change before it goes into the box's recipe, ``benchmarks/vm_boot.py``).
    """

    def __init__(self, box_dir: str | os.PathLike, work: str | os.PathLike, *, cpus: int = 1,
                 memory: int = 1024, cmdline: str | None = None, initrd: str | os.PathLike | None = None):
        self.box_dir = Path(box_dir)
        self.work = Path(work)
        self.cpus, self.memory = cpus, memory
        self.cmdline = cmdline
        self.initrd = Path(initrd) if initrd else None
        self.disk = self.work / "disk.qcow2"
        self.console = self.work / "console.log"
        self.pidfile = self.work / "qemu.pid"
        self.known_hosts = self.work / "known_hosts"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._host: SSHHost | None = None

    @property
    def pid(self) -> int | None:
        """QEMU's pid while it runs."""
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return qemu_argv(self.box_dir, self.disk, self.console, self.pidfile, self.port,
                         cpus=self.cpus, memory=self.memory, cmdline=self.cmdline, initrd=self.initrd)

    def start(self) -> None:
        """Make the overlay and start QEMU (returns at once; :meth:`host` waits for SSH).

        Raises:
            VMError: QEMU or the box's files are missing, or QEMU exited at once.
        """
        for f in ("box.img", "vmlinuz", "initrd.img"):
            if not (self.box_dir / f).is_file():
                raise VMError(f"{self.box_dir} has no {f}: not a built box (scripts/build-box.sh)")
        if not shutil.which("qemu-system-x86_64"):
            raise VMError("needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
        self.work.mkdir(parents=True, exist_ok=True)
        for f in (self.disk, self.console, self.pidfile, self.known_hosts):
            f.unlink(missing_ok=True)
        made = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                               str(self.box_dir / "box.img"), str(self.disk)], capture_output=True, text=True)
        if made.returncode != 0:
            raise VMError(f"qemu-img create of the overlay failed: {made.stderr.strip()}")
        self.port = free_port()
        log.info("qemu: %s", " ".join(self.argv()))
        with open(self.work / "qemu.log", "wb") as out:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(1)
        if self.proc.poll() is not None:
            self.proc = None
            said = (self.work / "qemu.log").read_text(errors="replace").strip()
            raise VMError(f"QEMU exited at once: {said[-500:]}")

    def host_key_line(self, timeout: float = BOOT_TIMEOUT) -> str:
        """The host key line the guest wrote to its console at its first boot.

        Raises:
            VMError: QEMU ended, or no key line within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            found = KEY_LINE.search(text)
            if found:
                return found.group(1)
            if self.pid is None:
                raise VMError(f"QEMU ended before the guest wrote its host key; console: {self.console}")
            time.sleep(1)
        raise VMError(f"the guest wrote no host key to its console within {timeout:g} s ({self.console})")

    def host(self, timeout: float = BOOT_TIMEOUT) -> SSHHost:
        """The guest as an :class:`SSHHost` (user ``vagrant``, root through sudo), its host key
        pinned from the console; waits until SSH answers.

        Raises:
            VMError: no key line or no SSH answer within ``timeout`` s.
        """
        if self._host is not None:
            return self._host
        start = time.monotonic()
        label = known_hosts_name("127.0.0.1", self.port)
        pin_host_key(self.known_hosts, label, parse_host_key(self.host_key_line(timeout), f"{self.console}"))
        host = SSHHost("127.0.0.1", port=self.port, username="vagrant", key_filename=vagrant_private_key(),
                       known_hosts=self.known_hosts, name="qemu:labkit", sudo=True)
        while True:
            try:
                host.run(["true"], timeout=60)
                break
            except Exception as exc:  # sshd not up yet: connection refused or reset
                if time.monotonic() - start > timeout or self.pid is None:
                    raise VMError(f"the guest's SSH did not answer within {timeout:g} s: {exc}") from None
                host.close()
                time.sleep(2)
        self._host = host
        return host

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove the overlay; idempotent."""
        if self._host is not None:
            self._host.close()
            self._host = None
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=20)
            self.proc = None
        for f in (self.disk, self.pidfile):
            f.unlink(missing_ok=True)

    def __enter__(self) -> "QemuGuest":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
