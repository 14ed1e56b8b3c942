"""The lab's own libvirt: libvirtd and virtlogd by pid file, inside a network namespace.

No service manager runs on the lab machines, so :class:`LibvirtLab` starts the
daemons itself (``virtlogd -d -p PIDFILE``, ``libvirtd -d -p PIDFILE``) and stops
them by those pids.  It starts them inside a network namespace it makes
(``labkit-vm``): every bridge, tap, dnsmasq and iptables chain libvirt creates for
its networks lives there, none in the machine's own namespace, so the machine's
``iptables-save``/``ip6tables-save``/``nft list ruleset`` are the same before and
after, by construction (libvirt 9 leaves its empty ``LIBVIRT_*`` chains behind when
it stops; here they vanish with the namespace).  The namespace has no link to the
machine's: a guest cannot reach anything off its isolated network even if a
``<forward>`` slipped in.  Whoever talks to a guest does it from inside the
namespace (``ip netns exec labkit-vm vagrant ...``; a socket made there with
:func:`labkit.host.in_netns` for Paramiko).

What it made is written to ``state.json`` in its state folder before it is made;
:meth:`LibvirtLab.stop` (also from another process, or after a crash) removes
exactly that: the domains, networks, storage volumes and pool that appeared under
this daemon, the daemons, any process left in the namespace, the namespace, and
the folders libvirt made that did not exist before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from labkit.exceptions import VMError
from labkit.host import NETNS_DIR
from labkit.util import atomic_write

log = logging.getLogger(__name__)

NETNS = "labkit-vm"
STATE_DIR = Path(os.environ.get("LABKIT_VM_STATE_DIR", "/run/labkit/vm"))
POOL = "labkit"
LOG_DIR = Path(os.environ.get("LABKIT_VM_LOG_DIR", "/var/cache/labkit/vm/logs"))
POOL_DIR = Path("/var/lib/labkit/vm-pool")
URI = "qemu:///system"
SOCKET = Path("/run/libvirt/libvirt-sock")
CAPS_DIR = Path("/var/cache/libvirt/qemu/capabilities")
# folders a privileged libvirtd makes when it starts (removed at stop unless they were there)
LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt",
                "/etc/libvirt/qemu", "/etc/libvirt/storage", "/etc/libvirt/nwfilter",
                "/etc/libvirt/secrets")
AUTOSTART_DIRS = ("/etc/libvirt/qemu/autostart", "/etc/libvirt/qemu/networks/autostart",
                  "/etc/libvirt/storage/autostart")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def netns_pids(netns: str) -> list[int]:
    """The pids of the processes in network namespace ``netns`` (``ip netns pids``)."""
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def parse_virsh_list(text: str) -> list[str]:
    """Names from ``virsh list --name`` style output (one a line, blanks ignored)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class LibvirtLab:
    """libvirtd and virtlogd of the lab, in their own network namespace.

    Args:
        state_dir: pid files and ``state.json`` (default ``$LABKIT_VM_STATE_DIR`` or
            ``/run/labkit/vm``).
        netns: the namespace the daemons and their guests live in.
        pool, pool_dir: the storage pool the lab's volumes go to (a ``dir`` pool).
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, *, netns: str = NETNS,
                 pool: str = POOL, pool_dir: str | os.PathLike = POOL_DIR):
        self.state_dir = Path(state_dir or STATE_DIR)
        self.netns = netns
        self.pool = pool
        self.pool_dir = Path(pool_dir)
        self.state_path = self.state_dir / "state.json"
        self.log_dir = LOG_DIR

    # --- state ----------------------------------------------------------------------

    def _state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None

    def _save(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, json.dumps(state, indent=1).encode())

    @property
    def running(self) -> bool:
        """True when this lab's libvirtd runs (its pid file names a live process)."""
        pid = _read_pid(self.state_dir / "libvirtd.pid")
        return pid is not None and _pid_alive(pid)

    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command where the guests are reachable."""
        return ["ip", "netns", "exec", self.netns]

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``virsh -c qemu:///system ARGS`` against the lab's daemon.

        Raises:
            VMError: it failed (with ``check``), naming the command and virsh's message.
        """
        argv = ["virsh", "-q", "-c", URI, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(argv, 124, "", f"no answer within {timeout:g} s")
        if check and proc.returncode != 0:
            raise VMError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # --- start ----------------------------------------------------------------------

    def _dirs(self) -> list[str]:
        """Folders the lab's libvirt may make: libvirt's own, the pool's, and the ``machine``
        cgroups it puts guests in (each checked for existence before the start)."""
        cgroups = sorted(str(p.parent / "machine") for p in Path("/sys/fs/cgroup").glob("*/cgroup.procs"))
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            cgroups.append("/sys/fs/cgroup/machine")
        return list(LIBVIRT_DIRS) + [str(self.pool_dir.parent), str(self.pool_dir)] + cgroups

    def _refuse_foreign(self) -> None:
        if self._state() is not None:
            raise VMError(f"the lab's libvirt state {self.state_path} exists (running, or a crash): "
                          "stop it first (LibvirtLab().stop(), or `python -m labkit.vm.libvirtd stop`)")
        other = _read_pid(Path("/run/libvirtd.pid"))
        if SOCKET.exists() or (other is not None and _pid_alive(other)):
            raise VMError(f"a libvirtd labkit did not start runs here ({SOCKET}); the VM tests "
                          "run their own and would share it: stop it first")
        for d in AUTOSTART_DIRS:
            if Path(d).is_dir() and any(Path(d).iterdir()):
                raise VMError(f"{d} lists autostart objects of this machine's libvirt "
                              f"({', '.join(p.name for p in Path(d).iterdir())}); the lab's libvirtd "
                              "would start them: not starting")
        if os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            raise VMError(f"network namespace {self.netns} exists already (a crash?); "
                          f"`ip netns pids {self.netns}` then `ip netns del {self.netns}`")

    def start(self) -> None:
        """Make the namespace, start virtlogd and libvirtd in it, wait for libvirtd
        to answer, and make the lab's storage pool.

        Raises:
            VMError: not root, a program missing, another libvirtd runs, or a daemon
                did not come up (everything made so far is removed again).
        """
        if os.geteuid() != 0:
            raise VMError("the lab's libvirt needs root")
        missing = [p for p in ("libvirtd", "virtlogd", "virsh", "ip")
                   if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
        if missing:
            raise VMError(f"needs {', '.join(missing)} (apt-get install libvirt-daemon "
                          "libvirt-daemon-driver-qemu libvirt-clients)")
        self._refuse_foreign()
        state: dict[str, Any] = {"netns": self.netns, "pool": self.pool, "pool_dir": str(self.pool_dir),
                                 "created_dirs": [d for d in self._dirs() if not os.path.lexists(d)],
                                 "started": time.time()}
        self._save(state)
        try:
            self._start(state)
        except BaseException:
            self.stop()
            raise

    def _start(self, state: dict[str, Any]) -> None:
        started = time.monotonic()
        _check(["ip", "netns", "add", self.netns], "making the lab's network namespace")
        _check(["ip", "-n", self.netns, "link", "set", "lo", "up"], "bringing lo up")
        # libvirt-daemon-system would have made these (listed in created_dirs when new)
        for d in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/cache/libvirt"):
            os.makedirs(d, exist_ok=True)
        self._restore_capabilities(state)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            pidfile = self.state_dir / f"{daemon}.pid"
            # warnings and errors to a file that outlives the run (no syslog here)
            env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{self.log_dir / (daemon + '.log')}")
            _check(self.exec_prefix() + self._hide_kvm() + [daemon, "-d", "-p", str(pidfile)],
                   f"starting {daemon}", env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.virsh("version", check=False, timeout=10).returncode == 0:
                break
            if not self.running:
                raise VMError("libvirtd exited while starting; run `ip netns exec "
                              f"{self.netns} libvirtd` in the foreground to see why")
            if time.monotonic() > deadline:
                raise VMError(f"libvirtd did not answer within {READY_TIMEOUT:g} s")
            time.sleep(0.5)
        state["existing"] = self.inventory()  # what a foreign definition brought in: left alone
        self._save(state)
        self.pool_dir.mkdir(parents=True, exist_ok=True)
        self.virsh("pool-define-as", self.pool, "dir", "--target", str(self.pool_dir))
        self.virsh("pool-start", self.pool)
        log.info("libvirt: up in %.1f s (netns %s)", time.monotonic() - started, self.netns)

    @staticmethod
    def _hide_kvm() -> list[str]:
        """The argv prefix that runs a daemon with ``/dev/kvm`` masked (its own mount namespace).

        The guests run under TCG (the box says ``driver = "qemu"``); where ``/dev/kvm``
        exists but the CPU has no virtualization (these machines), libvirt re-probes
        QEMU with KVM on every domain definition and waits ~45 s for it each time.
        """
        if not os.path.exists("/dev/kvm"):
            return []
        return ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                'mount --bind /dev/null /dev/kvm && exec "$0" "$@"']

    # --- inspect --------------------------------------------------------------------

    def inventory(self) -> dict[str, list[str]]:
        """Names of the domains, networks and pools this daemon knows (any state)."""
        out = {}
        for kind, cmd in (("domains", ["list", "--all", "--name"]), ("networks", ["net-list", "--all", "--name"]),
                          ("pools", ["pool-list", "--all", "--name"])):
            out[kind] = parse_virsh_list(self.virsh(*cmd).stdout)
        return out

    def volumes(self, pool: str | None = None) -> list[str]:
        """The volume names of a pool (the lab's by default)."""
        proc = self.virsh("vol-list", pool or self.pool, check=False)
        return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()] \
            if proc.returncode == 0 else []

    def network_xml(self, name: str) -> str:
        """The XML of a libvirt network (to check it has no ``<forward>``)."""
        return self.virsh("net-dumpxml", name).stdout

    # --- stop -----------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Remove everything the lab's libvirt made and stop its daemons.

        Idempotent, and works from a fresh process after a crash (it reads
        ``state.json``).  Returns what it removed, one line each.

        Raises:
            VMError: something could not be removed (named); the state file is
                kept so that a second ``stop`` tries again.
        """
        state = self._state()
        if state is None:
            return []
        removed: list[str] = []
        errors: list[str] = []
        if self.running:
            self._remove_objects(state, removed, errors)
        for daemon in ("libvirtd", "virtlogd"):
            self._kill_pidfile(daemon, removed, errors)
        if os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            for pid in netns_pids(self.netns):  # only processes inside the lab's own namespace
                _terminate(pid, f"process {pid} left in {self.netns}", removed, errors)
            proc = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, text=True)
            if proc.returncode == 0:
                removed.append(f"netns {self.netns}")
            else:
                errors.append(f"ip netns del {self.netns}: {proc.stderr.strip()}")
        self._keep_capabilities(state)
        for d in state.get("created_dirs", []):
            if d.startswith("/sys/fs/cgroup/"):
                _remove_cgroup_tree(Path(d), removed, errors)
            elif os.path.isdir(d) and not os.path.islink(d):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"dir {d}")
            elif os.path.lexists(d):
                os.unlink(d)
                removed.append(f"file {d}")
        if errors:
            raise VMError("the lab's libvirt was not fully removed: " + "; ".join(errors))
        self.state_path.unlink(missing_ok=True)
        for name in ("libvirtd.pid", "virtlogd.pid"):
            (self.state_dir / name).unlink(missing_ok=True)
        try:
            self.state_dir.rmdir()  # only when empty
        except OSError:
            pass
        return removed

    # libvirt probes each QEMU binary's capabilities (tens of seconds under TCG) and caches
    # them in a folder the stop removes when libvirt made it; the lab keeps a copy in its own
    # cache (libvirt re-probes an entry whose binary, kernel or libvirt changed)

    def _restore_capabilities(self, state: dict[str, Any]) -> None:
        saved = self.log_dir.parent / "qemu-capabilities"
        if CAPS_DIR.parent.parent.as_posix() in state.get("created_dirs", []) and saved.is_dir():
            CAPS_DIR.mkdir(parents=True, exist_ok=True)
            for xml in saved.glob("*.xml"):
                shutil.copy2(xml, CAPS_DIR / xml.name)

    def _keep_capabilities(self, state: dict[str, Any]) -> None:
        if CAPS_DIR.parent.parent.as_posix() not in state.get("created_dirs", []) or not CAPS_DIR.is_dir():
            return
        saved = self.log_dir.parent / "qemu-capabilities"
        saved.mkdir(parents=True, exist_ok=True)
        for xml in CAPS_DIR.glob("*.xml"):
            shutil.copy2(xml, saved / xml.name)

    def _remove_objects(self, state: dict[str, Any], removed: list[str], errors: list[str]) -> None:
        existing = state.get("existing", {})
        now = self.inventory()
        for dom in now["domains"]:
            if dom in existing.get("domains", []):
                continue
            self.virsh("destroy", dom, check=False)
            proc = self.virsh("undefine", dom, "--managed-save", "--snapshots-metadata", "--nvram",
                              check=False)
            if proc.returncode != 0:
                proc = self.virsh("undefine", dom, check=False)
            _tally(proc, f"domain {dom}", removed, errors)
        for net in now["networks"]:
            if net in existing.get("networks", []):
                continue
            self.virsh("net-destroy", net, check=False)
            proc = self.virsh("net-undefine", net, check=False)
            _tally(proc, f"network {net}", removed, errors)
        for pool in now["pools"]:
            if pool in existing.get("pools", []):
                continue
            for vol in self.volumes(pool):
                proc = self.virsh("vol-delete", vol, "--pool", pool, check=False)
                _tally(proc, f"volume {pool}/{vol}", removed, errors)
            self.virsh("pool-destroy", pool, check=False)
            proc = self.virsh("pool-undefine", pool, check=False)
            _tally(proc, f"pool {pool}", removed, errors)

    def _kill_pidfile(self, daemon: str, removed: list[str], errors: list[str]) -> None:
        pid = _read_pid(self.state_dir / f"{daemon}.pid")
        if pid is not None and _pid_alive(pid) and _comm(pid) == daemon:
            _terminate(pid, f"{daemon} (pid {pid})", removed, errors)

    def __enter__(self) -> "LibvirtLab":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_cgroup_tree(top: Path, removed: list[str], errors: list[str]) -> None:
    """rmdir a cgroup and its children, deepest first (a cgroup with processes stays, named)."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
        try:
            d.rmdir()
        except OSError as exc:
            errors.append(f"cgroup {d}: {exc.strerror}")
            return
    removed.append(f"cgroup {top}")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _terminate(pid: int, what: str, removed: list[str], errors: list[str]) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while _pid_alive(pid) and _comm(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if _pid_alive(pid) and _comm(pid):
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        _reap(pid)
    if _pid_alive(pid) and Path(f"/proc/{pid}/status").exists() and "zombie" not in \
            Path(f"/proc/{pid}/status").read_text():
        errors.append(f"{what} does not end")
    else:
        removed.append(what)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _check(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise VMError(f"{what}: {' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.vm.libvirtd start|stop|status``: the lab's libvirt by hand."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="labkit-libvirtd", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    args = parser.parse_args(argv)
    lab = LibvirtLab()
    try:
        if args.action == "start":
            lab.start()
            print(f"libvirtd up in network namespace {lab.netns}; run guests' tools with: "
                  f"{' '.join(lab.exec_prefix())} COMMAND")
        elif args.action == "stop":
            for line in lab.stop():
                print(f"removed {line}")
        else:
            print(json.dumps({"running": lab.running, "state": lab._state(),
                              "inventory": lab.inventory() if lab.running else None}, indent=1))
    except VMError as exc:
        print(f"labkit-libvirtd: {exc}", file=sys.stderr)
        return 1
    return 0


def _tally(proc, what: str, removed: list[str], errors: list[str]) -> None:
    """Note ``what`` as removed when the virsh command succeeded, else as an error with its reason."""
    if proc.returncode == 0:
        removed.append(what)
    else:
        errors.append(f"{what}: {proc.stderr.strip()}")


if __name__ == "__main__":
    raise SystemExit(main())
