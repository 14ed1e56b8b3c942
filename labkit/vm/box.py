"""Build labkit's Debian 12 Vagrant box for libvirt with debootstrap, cached by its recipe.

The box is what a lab VM needs and nothing it would have to download once booted:
a minimal bookworm (systemd, sshd, iproute2, iptables, conntrack, tftpd-hpa, tftp
clients, Python) plus a virtualenv at ``/opt/labkit/venv`` with labkit's Python
dependencies (from ``pyproject.toml``; labkit's own source is copied in by whoever
drives the guest).  It boots without a bootloader: the box's Vagrantfile gives
vagrant-libvirt the kernel, initrd and command line (direct kernel boot).

Traps it avoids (``../shared/VM-NOTES.md``): every guest gets its own machine-id
(``/etc/machine-id`` left empty, dbus's copy a symlink to it) and DHCP identifies
by MAC; every guest makes its own SSH host keys on first boot (none in the image),
so a re-created VM has a new key.

Reproducible in the sense that matters here: the recipe (suite, mirror, package
list, files written, Python requirements) is hashed into the cache key; the same
recipe reuses what was built, a different one builds anew beside it.  Package
versions are whatever the mirror serves on the day (listed in ``packages.txt`` and
``python-packages.txt`` beside the box); the bytes are not bit-for-bit identical
between two builds.

Steps, each skipped when its output is there: debootstrap (``.debs`` cached too;
the pristine system is shared by recipes that differ only past it), configure, the Python wheels (downloaded by the host's pip, so its index settings
apply), the disk image (``mkfs.ext4 -d``, then qcow2), the ``.box`` file.

Command line: ``python -m labkit.vm.box [--cache DIR] [--force]`` prints the box
path (``scripts/build-box.sh`` is the same).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from labkit.exceptions import VMError

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
SUITE = "bookworm"
BOX_NAME = "labkit/debian12"
DEFAULT_CACHE = Path("/var/cache/labkit/box")
DISK_GB = 4
# quiet: every character on the emulated serial console costs guest time under TCG (the
# host key line labkit.vm.qemu pins is written to /dev/console directly, quiet or not)
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet"
GUEST_PYTHON = "3.11.2"  # bookworm's python3: wheels are chosen for it, not for the host's
PROJECT_DIR = Path(__file__).resolve().parents[2]

PACKAGES = (
    "linux-image-amd64", "systemd-sysv", "udev", "dbus", "openssh-server", "sudo",
    "iproute2", "iptables", "conntrack", "kmod", "procps", "netbase", "iputils-ping", "curl",
    "tftpd-hpa", "tftp-hpa", "atftp", "python3", "python3-venv",
)
# not needed in a guest that is driven over SSH and serves no notebook itself
GUEST_PY_EXCLUDE = ("jupyterlab",)

SSH_HOSTKEYS_UNIT = """\
[Unit]
Description=Make this VM's own SSH host keys (the box ships none)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# ed25519 only: `ssh-keygen -A` (RSA 3072 too) takes ~55 s under TCG emulation
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
# on the VM's own console: whoever booted it (labkit.vm.qemu) pins the key from there
ExecStartPost=/bin/sh -c 'echo "labkit-host-key: $$(cat /etc/ssh/ssh_host_ed25519_key.pub)" > /dev/console'

[Install]
WantedBy=multi-user.target
"""

# 90-: after Vagrant's 50-vagrant-ethN.network (a private network's static address), as
# systemd-networkd takes the first file, in name order, that matches an interface
DHCP_NETWORK = """\
[Match]
Name=eth*

[Network]
DHCP=ipv4
# no route from router advertisements either (QEMU's user network sends them)
IPv6AcceptRA=no

[DHCPv4]
# every VM of one box starts with the same machine-id-derived DUID otherwise
ClientIdentifier=mac
# no default route, whatever the DHCP server offers (QEMU's user network offers one):
# a lab VM talks to its own network only
UseGateway=no
# the VM's name comes from its kernel command line (labkit-hostname.service), not from DHCP
UseHostname=no
"""

# The VM's name from the kernel command line (``systemd.hostname=NAME``, which the project's
# Vagrantfile adds per machine): written where ``hostname -f`` finds it, so Vagrant sees the
# name already set and skips its own hostname step (about ten commands over SSH under TCG).
HOSTNAME_UNIT = """\
[Unit]
Description=This VM's name from systemd.hostname= in /etc/hostname and /etc/hosts
DefaultDependencies=no
After=local-fs.target
Before=network-pre.target ssh.service sysinit.target
Wants=network-pre.target
ConditionKernelCommandLine=systemd.hostname

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'h=$$(cat /proc/sys/kernel/hostname); echo "$$h" > /etc/hostname; \\
printf "127.0.0.1 localhost\\n127.0.1.1 %%s\\n" "$$h" > /etc/hosts'

[Install]
WantedBy=sysinit.target
"""

# $labkit_box_cmdline: the project's Vagrantfile appends systemd.hostname=NAME to it per machine
BOX_VAGRANTFILE = """\
# labkit's local Debian 12 box: direct kernel boot under vagrant-libvirt (no bootloader),
# QEMU's TCG emulation (driver "qemu"; KVM is not assumed).
$labkit_box_cmdline = "%s"
Vagrant.configure("2") do |config|
  here = File.dirname(__FILE__)
  config.vm.provider :libvirt do |lv|
    lv.driver = "qemu"
    lv.kernel = File.join(here, "vmlinuz")
    lv.initrd = File.join(here, "initrd.img")
    lv.cmd_line = $labkit_box_cmdline
    lv.disk_bus = "virtio"
    lv.graphics_type = "none"
    lv.video_type = "none"
  end
end
"""


def box_vagrantfile(cmdline: str = KERNEL_CMDLINE) -> str:
    """The box's own Vagrantfile: direct kernel boot with ``cmdline``."""
    return BOX_VAGRANTFILE % cmdline

GUEST_FILES: dict[str, tuple[str, int]] = {
    "/etc/hostname": ("labkit\n", 0o644),
    "/etc/hosts": ("127.0.0.1 localhost\n127.0.1.1 labkit\n", 0o644),
    # no fsck at boot (pass 0): every VM starts from a fresh overlay of a clean image
    "/etc/fstab": ("/dev/vda / ext4 defaults 0 0\n", 0o644),
    # a small initrd (6 MB, not 36 MB): the kernel unpacks it ~5 s faster under TCG; these
    # modules (and what they need) mount the root, udev loads the rest from the root
    "/etc/initramfs-tools/conf.d/labkit.conf": ("MODULES=list\nCOMPRESS=gzip\n", 0o644),
    "/etc/initramfs-tools/modules": ("virtio_pci\nvirtio_blk\next4\n", 0o644),
    "/etc/systemd/system/labkit-hostname.service": (HOSTNAME_UNIT, 0o644),
    # sshd -t before every start is one more sshd run (~0.5 s under TCG); the box's config is fixed
    "/etc/systemd/system/ssh.service.d/labkit.conf": ("[Service]\nExecStartPre=\n", 0o644),
    "/etc/systemd/network/90-dhcp.network": (DHCP_NETWORK, 0o644),
    "/etc/systemd/system/labkit-ssh-hostkeys.service": (SSH_HOSTKEYS_UNIT, 0o644),
    "/etc/sudoers.d/vagrant": ("vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n", 0o440),
    "/etc/ssh/sshd_config.d/labkit.conf": ("HostKey /etc/ssh/ssh_host_ed25519_key\nUseDNS no\n"
                                            "PasswordAuthentication no\n", 0o644),
    # conntrack's sysctls exist once the module is loaded (the lab's doctor checks them)
    "/etc/modules-load.d/labkit.conf": ("nf_conntrack\nnf_conntrack_tftp\nnf_nat_tftp\n", 0o644),
    # the pods' CPU limits are cgroup v2 cpu.max in cgroups the lab makes under the root:
    # a slice with a CPU weight makes systemd enable the root's cpu controller for children
    "/etc/systemd/system/system.slice.d/labkit-cpu.conf": ("[Slice]\nCPUWeight=100\n", 0o644),
}
ENABLE = ("systemd-networkd", "labkit-ssh-hostkeys", "labkit-hostname", "ssh")
# tftpd-hpa: the lab starts its own in.tftpd inside namespaces; e2scrub: ~40 s of a boot
DISABLE = ("tftpd-hpa", "e2scrub_reap", "e2scrub_all.timer")
# What a lab VM never needs, each a process start or more at boot or later (~0.05-0.2 s
# each under TCG, more under load): logind (no PAM module asks it for sessions here; the
# lab and the kubelet double run as root through sudo, systemctl talks to PID 1 directly),
# consoles other than the serial one, modules and file systems nobody uses, timers that
# would fire in the middle of a test.  dbus stays (hostnamectl, networkd's bus).
MASK = ("systemd-logind.service", "getty@tty1.service", "modprobe@drm.service", "modprobe@fuse.service",
        "modprobe@dm_mod.service", "modprobe@loop.service", "modprobe@efi_pstore.service",
        "sys-fs-fuse-connections.mount", "sys-kernel-config.mount", "sys-kernel-debug.mount",
        "sys-kernel-tracing.mount", "dev-hugepages.mount", "proc-sys-fs-binfmt_misc.automount",
        "systemd-binfmt.service", "systemd-network-generator.service", "systemd-random-seed.service",
        "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service", "systemd-remount-fs.service",
        "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "fstrim.timer",
        "systemd-tmpfiles-clean.timer", "e2scrub_all.timer", "e2scrub_reap.service")


@dataclass
class Recipe:
    """Everything that decides what the box holds; its hash is the cache key.

    Attributes:
        suite, mirror: what debootstrap installs from.
        packages: the Debian packages asked for (debootstrap adds their dependencies).
        files: guest path -> [content, mode] written into the image.
        python: the Python requirements of the guest's venv.
        vagrant_key: the public key the ``vagrant`` user accepts first (Vagrant's
            insecure key, which ``vagrant up`` replaces with a key of its own).
    """

    suite: str
    mirror: str
    packages: list[str]
    files: dict[str, list]
    python: list[str]
    vagrant_key: str
    guest_python: str = GUEST_PYTHON
    enable: list[str] = field(default_factory=lambda: list(ENABLE))
    disable: list[str] = field(default_factory=lambda: list(DISABLE))
    mask: list[str] = field(default_factory=lambda: list(MASK))
    cmdline: str = KERNEL_CMDLINE
    disk_gb: int = DISK_GB
    version: int = RECIPE_VERSION

    def key(self) -> str:
        """The recipe's hash (hex), stable across runs and machines."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def mirror_from_sources(texts: Iterable[str], suite: str = SUITE) -> str | None:
    """The first Debian mirror URI that serves ``suite`` with ``main``, from apt sources.

    Reads both formats: deb822 ``.sources`` stanzas and one-line ``deb URI SUITE
    COMPONENTS`` entries.  ``-security`` and ``-updates`` suites do not count.
    """
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if fields:
                if ("deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split()
                        and "main" in fields.get("components", "").split()
                        and fields.get("enabled", "yes").lower() != "no" and fields.get("uris")):
                    return fields["uris"].split()[0].rstrip("/")
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 4 and parts[0] == "deb" and parts[2] == suite and "main" in parts[3:]:
                return parts[1].rstrip("/")
    return None


def host_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for bookworm.

    Raises:
        VMError: no apt source serves bookworm main (give ``--mirror``).
    """
    files = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    texts = [f.read_text(errors="replace") for f in files if f.is_file()]
    mirror = mirror_from_sources(texts)
    if not mirror:
        raise VMError(f"no apt source in {apt_dir} serves {SUITE} main; give the mirror with --mirror")
    return mirror


def guest_requirements(pyproject: Path = PROJECT_DIR / "pyproject.toml") -> list[str]:
    """labkit's Python dependencies for the guest's venv (pyproject's, minus JupyterLab).

    Raises:
        VMError: the file cannot be read or has no ``[project] dependencies``.
    """
    import tomllib

    try:
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise VMError(f"{pyproject}: cannot read [project] dependencies: {exc}") from None
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    return sorted(d for d in deps if name.match(d).group(0).lower() not in GUEST_PY_EXCLUDE)


def vagrant_public_key() -> str:
    """Vagrant's published insecure public key, from the installed Vagrant.

    Raises:
        VMError: Vagrant is not installed (its ``keys/vagrant.pub`` is not found).
    """
    patterns = ("/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub",
                "/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub",
                "/opt/vagrant/embedded/gems/*/gems/vagrant-*/keys/vagrant.pub")
    for pattern in patterns:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[-1].read_text().strip()
    raise VMError("Vagrant's insecure public key (keys/vagrant.pub) not found; install vagrant")


def default_recipe(mirror: str | None = None) -> Recipe:
    """The recipe of labkit's box on this machine (mirror from its apt sources)."""
    return Recipe(suite=SUITE, mirror=mirror or host_mirror(), packages=sorted(PACKAGES),
                  files={k: [v[0], v[1]] for k, v in sorted(GUEST_FILES.items())},
                  python=guest_requirements(), vagrant_key=vagrant_public_key())


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    log.info("box: %s", " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise VMError(f"box: {what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    return proc


def _chroot(rootfs: Path, script: str, what: str) -> None:
    """Run ``script`` with sh in the image, with /proc and /dev mounted in a private
    mount namespace (gone when it ends, whatever happens)."""
    inner = (f'mount -t proc proc "{rootfs}/proc" && mount --rbind /dev "{rootfs}/dev" && '
             f'exec chroot "{rootfs}" /bin/sh -ec "$1"')
    _run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-ec", inner, "sh", script],
         what, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root",
                    "DEBIAN_FRONTEND": "noninteractive"})


@dataclass
class BoxBuild:
    """What :func:`build_box` made or found.

    Attributes:
        box: the ``.box`` file (for ``vagrant box add``).
        directory: the cache folder of this recipe.
        key: the recipe's hash.
        seconds: step name -> seconds spent (0 for a step skipped as done).
    """

    box: Path
    directory: Path
    key: str
    seconds: dict[str, float]


class BoxBuilder:
    """Builds one recipe's box in ``cache/<key[:16]>/``, skipping finished steps.

    Args:
        recipe: what to build.
        cache: the cache folder (outside the repository).
    """

    def __init__(self, recipe: Recipe, cache: Path = DEFAULT_CACHE):
        self.recipe = recipe
        self.key = recipe.key()
        self.dir = Path(cache) / self.key[:16]
        self.debs = Path(cache) / "debs"
        self.wheels = Path(cache) / "wheels" / hashlib.sha256(
            "\n".join([recipe.guest_python, "checked", *recipe.python]).encode()).hexdigest()[:16]
        base = json.dumps([recipe.suite, recipe.mirror, recipe.packages, recipe.version]).encode()
        self.base = Path(cache) / f"base-{hashlib.sha256(base).hexdigest()[:16]}"
        self.rootfs = self.dir / "rootfs"
        self.box = self.dir / "labkit-debian12.box"
        self.name = BOX_NAME
        self.seconds: dict[str, float] = {}

    def _step(self, name: str, done: Path, fn) -> None:
        if done.exists():
            self.seconds[name] = 0.0
            log.info("box: %s: done before (%s)", name, done)
            return
        start = time.monotonic()
        fn()
        self.seconds[name] = round(time.monotonic() - start, 1)
        log.info("box: %s: %.1f s", name, self.seconds[name])

    def build(self) -> BoxBuild:
        """Run every step not done yet; return the box.

        Raises:
            VMError: not root, a tool is missing, or a step failed (its output's
                tail in the message); a failed step leaves no stamp, so the next
                run does it again.
        """
        if os.geteuid() != 0:
            raise VMError("building the box needs root (debootstrap, chroot, mkfs)")
        missing = [t for t in ("debootstrap", "mkfs.ext4", "qemu-img", "unshare", "chroot")
                   if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
        if missing:
            raise VMError(f"building the box needs {', '.join(missing)} "
                          "(apt-get install debootstrap qemu-utils e2fsprogs util-linux)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "recipe.json").write_text(json.dumps(asdict(self.recipe), indent=1, sort_keys=True))
        self._step("debootstrap", self.base / "debootstrap.done", self._debootstrap)
        self._step("wheels", self.wheels / ".done", self._wheels)
        self._step("configure", self.dir / "configure.done", self._configure)
        self._step("disk", self.dir / "disk.done", self._disk)
        self._step("box", self.box, self._package)
        self._prune()
        return BoxBuild(self.box, self.dir, self.key, dict(self.seconds))

    def _prune(self) -> None:
        """Remove the boxes of other recipes in the cache (each several GB); the shared
        base systems, ``.debs`` and wheels stay."""
        for other in self.dir.parent.iterdir():
            if other != self.dir and (other / "recipe.json").is_file() and not other.name.startswith("base-"):
                log.info("box: removing the box of an older recipe: %s", other)
                _rmtree(other)

    def _debootstrap(self) -> None:
        """The pristine system, shared by every recipe with the same suite, mirror and packages."""
        tmp, done = self.base / "rootfs.tmp", self.base / "rootfs"
        self.base.mkdir(parents=True, exist_ok=True)
        for stale in (tmp, done):
            _rmtree(stale)
        self.debs.mkdir(parents=True, exist_ok=True)
        # in a private mount namespace: the /proc and /sys debootstrap mounts in the
        # target go away with it, even when it fails half-way
        _run(["unshare", "--mount", "--propagation", "private", "--fork",
              "debootstrap", "--variant=minbase", f"--include={','.join(self.recipe.packages)}",
              f"--cache-dir={self.debs}", "--components=main", self.recipe.suite, str(tmp),
              self.recipe.mirror], "debootstrap")
        tmp.rename(done)
        (self.base / "debootstrap.done").touch()

    def _wheels(self) -> None:
        tmp = self.wheels.with_name(self.wheels.name + ".tmp")
        _rmtree(tmp)
        argv = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(tmp),
                "--python-version", GUEST_PYTHON, "--implementation", "cp", "--abi", "cp311",
                *(a for minor in range(36, 4, -1) for a in ("--platform", f"manylinux_2_{minor}_x86_64")),
                "--platform", "manylinux2014_x86_64", "--platform", "manylinux2010_x86_64",
                "--platform", "manylinux1_x86_64"]  # glibc 2.36 runs every older manylinux
        # An index without Requires-Python data (a local mirror) can hand pip a wheel the
        # guest's Python refuses; exclude such versions and ask again.
        excluded: list[str] = []
        for _ in range(8):
            constraints = self.dir / "wheel-constraints.txt"
            constraints.write_text("".join(f"{x}\n" for x in excluded))
            _run(argv + ["-c", str(constraints)] + self.recipe.python, "downloading the guest's Python wheels")
            bad = wheels_refusing(tmp, GUEST_PYTHON)
            if not bad:
                break
            for wheel, name, version in bad:
                wheel.unlink()
                excluded.append(f"{name}!={version}")
        else:
            raise VMError(f"box: no wheels the guest's Python {GUEST_PYTHON} accepts; excluded {excluded}")
        _rmtree(self.wheels)
        tmp.rename(self.wheels)
        (self.wheels / ".done").touch()

    def _configure(self) -> None:
        root = self.dir / "rootfs.tmp"
        _rmtree(root)
        _rmtree(self.rootfs)
        _run(["cp", "-a", "--reflink=auto", str(self.base / "rootfs"), str(root)], "copying the base system")
        for path, (content, mode) in self.recipe.files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            os.chmod(target, mode)
        # one machine-id per VM: empty file (systemd makes one at first boot), dbus's a link to it
        (root / "etc/machine-id").write_text("")
        dbus_id = root / "var/lib/dbus/machine-id"
        dbus_id.parent.mkdir(parents=True, exist_ok=True)
        dbus_id.unlink(missing_ok=True)
        dbus_id.symlink_to("/etc/machine-id")
        # one set of SSH host keys per VM: made at first boot by labkit-ssh-hostkeys.service
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        wheels_in = root / "tmp/labkit-wheels"
        _rmtree(wheels_in)
        shutil.copytree(self.wheels, wheels_in)
        key = self.recipe.vagrant_key.replace("'", "")
        script = f"""
id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
printf '%s\\n' '{key}' > /home/vagrant/.ssh/authorized_keys
chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys
chmod 600 /home/vagrant/.ssh/authorized_keys
passwd -d root >/dev/null
systemctl enable {' '.join(self.recipe.enable)}
systemctl disable {' '.join(self.recipe.disable)} 2>/dev/null || true
systemctl mask {' '.join(self.recipe.mask)}
update-initramfs -u -k all
rm -rf /opt/labkit/venv
python3 -m venv /opt/labkit/venv
/opt/labkit/venv/bin/pip install -q --no-index --find-links /tmp/labkit-wheels {' '.join(f"'{r}'" for r in self.recipe.python)}
/opt/labkit/venv/bin/pip freeze > /opt/labkit/python-packages.txt
/opt/labkit/venv/bin/python -c 'import matplotlib.pyplot'  # its font cache, made once here
rm -rf /tmp/labkit-wheels /root/.cache/pip
dpkg-query -W -f '${{Package}} ${{Version}}\\n' > /opt/labkit/packages.txt
apt-get clean
rm -f /var/lib/apt/lists/*_Packages /var/log/*.log
"""
        _chroot(root, script, "configuring the image")
        for name in ("packages.txt", "python-packages.txt"):
            shutil.copy(root / "opt/labkit" / name, self.dir / name)
        root.rename(self.rootfs)
        (self.dir / "configure.done").touch()

    def _kernel_files(self) -> tuple[Path, Path]:
        kernels = sorted((self.rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((self.rootfs / "boot").glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            raise VMError(f"box: expected one kernel and one initrd in {self.rootfs}/boot, found "
                          f"{[k.name for k in kernels]} and {[i.name for i in initrds]}")
        return kernels[0], initrds[0]

    def _disk(self) -> None:
        raw, img = self.dir / "disk.raw", self.dir / "box.img"
        kernel, initrd = self._kernel_files()
        raw.unlink(missing_ok=True)
        try:
            _run(["mkfs.ext4", "-q", "-F", "-L", "labkit-root", "-U", _uuid(self.key), "-E",
                  f"hash_seed={_uuid(self.key[::-1])}", "-d", str(self.rootfs), str(raw),
                  f"{self.recipe.disk_gb}G"], "making the ext4 image", env=dict(os.environ, E2FSPROGS_FAKE_TIME=str(_epoch())))
            _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img) + ".tmp"], "converting to qcow2")
        finally:
            raw.unlink(missing_ok=True)
        os.replace(str(img) + ".tmp", img)
        shutil.copy(kernel, self.dir / "vmlinuz")
        shutil.copy(initrd, self.dir / "initrd.img")
        (self.dir / "disk.done").write_text(f"{kernel.name} {initrd.name}\n")

    def _package(self) -> None:
        meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": self.recipe.disk_gb}
        (self.dir / "metadata.json").write_text(json.dumps(meta) + "\n")
        (self.dir / "Vagrantfile").write_text(box_vagrantfile(self.recipe.cmdline))
        (self.dir / "cmdline").write_text(self.recipe.cmdline + "\n")  # for plain QEMU (labkit.vm.qemu)
        (self.dir / "info.json").write_text(json.dumps(
            {"name": self.name, "recipe": self.key, "suite": self.recipe.suite,
             "mirror": self.recipe.mirror}, indent=1) + "\n")
        tmp = self.box.with_suffix(".box.tmp")
        with tarfile.open(tmp, "w") as tar:  # uncompressed: quick to make, quick to add
            for name in ("metadata.json", "Vagrantfile", "info.json", "box.img", "vmlinuz", "initrd.img", "cmdline"):
                tar.add(self.dir / name, arcname=name)
        os.replace(tmp, self.box)


class DerivedBoxBuilder(BoxBuilder):
    """A box of its own name: a built box's system plus some files, e.g. test doubles.

    The files are written into a copy of the base box's root file system before the
    disk image is made (nothing is installed into a running guest).  Cached in
    ``cache/derived/<slug>-<key[:16]>/`` by the base box's key and the files' bytes;
    older builds of the same name are removed.

    Args:
        base: the built box (:func:`build_box`) whose ``rootfs`` is copied.
        name: the Vagrant box name, e.g. ``labkit/debian12-kube``.
        files: guest path -> (content, mode).
        cache: the cache folder (the one of ``base`` by default).
    """

    def __init__(self, base: "BoxBuild", name: str, files: dict[str, tuple[bytes | str, int]],
                 cache: Path | None = None):
        self.recipe = Recipe(**json.loads((base.directory / "recipe.json").read_text()))
        self.base_build = base
        self.files = {k: (v.encode() if isinstance(v, str) else v, mode) for k, (v, mode) in sorted(files.items())}
        digest = hashlib.sha256(base.key.encode())
        for path, (content, mode) in self.files.items():
            digest.update(f"\0{path}\0{mode:o}\0".encode() + hashlib.sha256(content).digest())
        self.key = digest.hexdigest()
        self.name = name
        self.slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        self.parent = Path(cache or base.directory.parent) / "derived"
        self.dir = self.parent / f"{self.slug}-{self.key[:16]}"
        self.rootfs = self.dir / "rootfs"
        self.box = self.dir / f"{self.slug}.box"
        self.seconds = {}

    def build(self) -> "BoxBuild":
        """Copy the base system, write the files, make the disk and the box (each step
        skipped when done).

        Raises:
            VMError: not root, the base box has no root file system, or a step failed.
        """
        if os.geteuid() != 0:
            raise VMError("building a box needs root (mkfs, files owned by root)")
        if not (self.base_build.directory / "rootfs").is_dir():
            raise VMError(f"the base box has no root file system in {self.base_build.directory}; "
                          "build it again (scripts/build-box.sh --force)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._step("derive", self.dir / "derive.done", self._derive)
        self._step("disk", self.dir / "disk.done", self._disk)
        self._step("box", self.box, self._package)
        for other in self.parent.glob(f"{self.slug}-*"):
            if other != self.dir:
                log.info("box: removing an older build of %s: %s", self.name, other)
                _rmtree(other)
        return BoxBuild(self.box, self.dir, self.key, dict(self.seconds))

    def _derive(self) -> None:
        tmp = self.dir / "rootfs.tmp"
        _rmtree(tmp)
        _rmtree(self.rootfs)
        _run(["cp", "-a", "--reflink=auto", str(self.base_build.directory / "rootfs"), str(tmp)],
             "copying the base box's system")
        for path, (content, mode) in self.files.items():
            target = tmp / path.lstrip("/")
            if target.is_symlink():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            os.chmod(target, mode)
        tmp.rename(self.rootfs)
        (self.dir / "derive.done").touch()


def derive_box(base: "BoxBuild", name: str, files: dict[str, tuple[bytes | str, int]],
               cache: str | os.PathLike | None = None) -> "BoxBuild":
    """Build (or find) the box ``name``: ``base``'s system plus ``files``; see
    :class:`DerivedBoxBuilder`."""
    return DerivedBoxBuilder(base, name, files, Path(cache) if cache else None).build()


def wheels_refusing(folder: Path, python: str) -> list[tuple[Path, str, str]]:
    """The wheels in ``folder`` whose Requires-Python excludes ``python``: (file, name, version)."""
    import zipfile

    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a bare python3 (scripts/build-box.sh before .venv exists): pip's copy
        from pip._vendor.packaging.specifiers import SpecifierSet

    out = []
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = zf.read(meta).decode("utf-8", "replace") if meta else ""
        fields = dict(line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines() if ": " in line)
        spec = fields.get("Requires-Python")
        if spec and python not in SpecifierSet(spec):
            out.append((wheel, fields.get("Name", wheel.name.split("-")[0]), fields.get("Version", "")))
    return out


def _rmtree(path: Path) -> None:
    """Remove a folder of an earlier, unfinished step; refuse if anything is mounted in it.

    Raises:
        VMError: a mount point lies inside ``path`` (named, to unmount by hand).
    """
    if not path.exists():
        return
    inside = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(inside)]
    if mounts:
        raise VMError(f"{path} has mounts inside ({', '.join(mounts)}); unmount them, then build again")
    shutil.rmtree(path)


def _uuid(hexkey: str) -> str:
    h = hexkey[:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))


def build_box(cache: str | os.PathLike | None = None, *, mirror: str | None = None,
              force: bool = False) -> BoxBuild:
    """Build labkit's box (or find it built) and return where it is.

    Args:
        cache: the cache folder (default ``$LABKIT_BOX_CACHE`` or ``/var/cache/labkit/box``).
        mirror: the Debian mirror (default: the one this machine's apt uses).
        force: rebuild this recipe from nothing (the downloaded ``.debs`` are kept).

    Raises:
        VMError: see :meth:`BoxBuilder.build`.
    """
    cache_dir = Path(cache or os.environ.get("LABKIT_BOX_CACHE") or DEFAULT_CACHE)
    builder = BoxBuilder(default_recipe(mirror), cache_dir)
    if force:
        _rmtree(builder.dir)
    return builder.build()


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.vm.box``: build the box, print its path and the time per step."""
    parser = argparse.ArgumentParser(prog="build-box", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help=f"cache folder (default $LABKIT_BOX_CACHE or {DEFAULT_CACHE})")
    parser.add_argument("--mirror", help="Debian mirror (default: this machine's apt source)")
    parser.add_argument("--force", action="store_true", help="rebuild this recipe from nothing")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")
    try:
        built = build_box(args.cache, mirror=args.mirror, force=args.force)
    except VMError as exc:
        print(f"build-box: {exc}", file=sys.stderr)
        return 1
    steps = ", ".join(f"{k} {v:g} s" for k, v in built.seconds.items())
    print(f"{built.box}\n# recipe {built.key[:16]}; {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
