"""Where the time of ``vagrant up lab`` goes: labkit's box under the lab's libvirt (QEMU TCG).

Starts the lab's libvirt (:class:`labkit.vm.libvirtd.LibvirtLab`; refused if one runs),
adds the box in ``--box`` (a built box's folder) to a Vagrant home of its own, runs
``vagrant up lab`` with the project's Vagrantfile and ``box_source: local``, and
prints each line of Vagrant's output with the seconds since ``up`` started, then what the
guest says (``systemd-analyze``, the top of ``blame``, a process start and ``sudo -n true``
timed inside), then destroys the VM and stops libvirt.  As ``tests/vm/test_vm_3_lab.py``
brings the lab VM up, without its tests.

    sudo .venv/bin/python benchmarks/vagrant_up.py --box /var/cache/labkit/box/<recipe>

Only one lab libvirt can run on a machine: it checks ``/run/labkit/vm/state.json`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.vm.guest import VagrantLab  # noqa: E402
from labkit.vm.libvirtd import LibvirtLab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vm_boot import PROBE  # noqa: E402

def stamped_up(lab: VagrantLab) -> float:
    """``vagrant up lab``, each line of its output printed with the seconds since it started
    (Vagrant's own ``--timestamp`` is not in every version); returns its seconds.

    Raises:
        RuntimeError: it failed.
    """
    argv = lab.libvirt.exec_prefix() + ["vagrant", "up", "--provider=libvirt", "lab"]
    start = time.monotonic()
    print("--- vagrant up lab (seconds since it started)")
    with subprocess.Popen(argv, cwd=lab.root, env=lab.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if "Progress:" not in line or "100%" in line:
                print(f"{time.monotonic() - start:7.1f} {line}", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vagrant up lab failed (exit {proc.returncode})")
    return round(time.monotonic() - start, 1)


def main(argv: list[str] | None = None) -> int:
    """Bring the lab VM up once, print where the time went, tear everything down."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", required=True, type=Path, help="a built box's folder (labkit-debian12.box)")
    parser.add_argument("--work", type=Path, default=Path("/var/cache/labkit/vm-bench"),
                        help="Vagrant's home and state (default %(default)s)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder of the Vagrantfile")
    parser.add_argument("--json", type=Path, help="append the numbers to this file (one JSON object a line)")
    args = parser.parse_args(argv)
    # killed: unwind, so the VM (and libvirt) are stopped by the finally clauses
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if Path("/run/labkit/vm/state.json").exists():
        print("a lab libvirt runs here (/run/labkit/vm/state.json); only one can", file=sys.stderr)
        return 1
    info = json.loads((args.box / "info.json").read_text())
    settings = yaml.safe_load((args.root / "vagrant" / "settings.yaml").read_text())
    settings.update(box_source="local", storage_pool="labkit")
    out: dict = {"box": str(args.box), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="labkit-vagrant-up-") as tmp:
        path = Path(tmp) / "settings.yaml"
        path.write_text(yaml.safe_dump(settings))
        libvirt = LibvirtLab()
        t = time.monotonic()
        libvirt.start()
        out["libvirt_start_s"] = round(time.monotonic() - t, 1)
        lab = VagrantLab(libvirt, args.work, path, root=args.root)
        try:
            lab.known_hosts.unlink(missing_ok=True)
            t = time.monotonic()
            lab.add_box(args.box / "labkit-debian12.box", info["recipe"])
            out["box_add_s"] = round(time.monotonic() - t, 1)
            out["vagrant_up_s"] = stamped_up(lab)
            t = time.monotonic()
            host = lab.host("lab")
            host.run(["true"], timeout=60)
            out["pin_and_first_ssh_s"] = round(time.monotonic() - t, 1)
            out["systemd_analyze"] = host.run(["systemd-analyze"], timeout=120, check=False).stdout.strip()
            print("--- blame\n" + host.run("systemd-analyze blame | head -n 15", timeout=120).stdout.rstrip())
            probe = dict(line.split() for line in host.run(PROBE, timeout=300).stdout.splitlines())
            out["guest_process_start_ms"] = int(probe["proc"])
            out["guest_sudo_true_ms"] = int(probe["sudo"])
            out["guest_cpu"] = host.run("grep -m1 'model name' /proc/cpuinfo; cat "
                                        "/sys/devices/system/cpu/vulnerabilities/meltdown", timeout=60).stdout.strip()
            host.close()
        finally:
            t = time.monotonic()
            try:
                lab.destroy()
            finally:
                libvirt.stop()
            out["teardown_s"] = round(time.monotonic() - t, 1)
    for key, value in out.items():
        print(f"{key:24s} {value}")
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
