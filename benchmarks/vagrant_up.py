"""Where the time of ``vagrant up lab`` (or of the kubeadm VMs) goes: labkit's box under the lab's
libvirt (QEMU TCG).

Starts the lab's libvirt (:class:`labkit.vm.libvirtd.LibvirtLab`; refused if one runs),
adds the box in ``--box`` (a built box's folder) to a Vagrant home of its own, runs
``vagrant up lab`` with the project's Vagrantfile and ``box_source: local``, and
prints each line of Vagrant's output with the seconds since ``up`` started, then what the
guest says (``systemd-analyze``, the top of ``blame``, a process start and ``sudo -n true``
timed inside), then destroys the VM and stops libvirt.  As ``tests/vm/test_vm_3_lab.py``
brings the lab VM up, without its tests.  ``--kube``: the three VMs of
``tests/vm/test_vm_4_kubeadm.py`` with their provisioning, and the seconds of each of Vagrant's
steps per machine (each provisioner).

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
KUBE = ["control-plane", "worker-1", "client"]
from vm_boot import PROBE  # noqa: E402

def stamped_up(lab: VagrantLab, machines: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """``vagrant up MACHINES``, each line of its output printed with the seconds since it started
    (Vagrant's own ``--timestamp`` is not in every version).

    Returns:
        its seconds, and its lines as (second, text).

    Raises:
        RuntimeError: it failed.
    """
    argv = lab.libvirt.exec_prefix() + ["vagrant", "up", "--provider=libvirt", *machines]
    start = time.monotonic()
    lines = []
    print(f"--- vagrant up {' '.join(machines)} (seconds since it started)")
    with subprocess.Popen(argv, cwd=lab.root, env=lab.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if "Progress:" not in line or "100%" in line:
                lines.append((time.monotonic() - start, line))
                print(f"{lines[-1][0]:7.1f} {line}", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vagrant up failed (exit {proc.returncode})")
    return round(time.monotonic() - start, 1), lines


def steps(lines: list[tuple[float, str]], machines: list[str], end: float) -> dict[str, list[tuple[float, str]]]:
    """Per machine, each ``==> MACHINE: ...`` line of Vagrant's with the seconds until that
    machine's next such line (the last one: until ``end``)."""
    out = {}
    for machine in machines:
        own = [(t, text.split(":", 1)[1].strip()) for t, text in lines
               if text.lstrip("\x1b[K").startswith(f"==> {machine}:") and " -- " not in text]
        out[machine] = [(round((own[i + 1][0] if i + 1 < len(own) else end) - t, 1), text)
                        for i, (t, text) in enumerate(own)]
    return out


def kube_setup(args: argparse.Namespace, info: dict, settings: dict) -> tuple[Path, Path, str, str]:
    """The kubeadm test's box (labkit's box plus the doubles), settings and project copy, as
    ``tests/vm/test_vm_4_kubeadm.py`` makes them: (box file, Vagrantfile folder, box name, box key)."""
    from labkit.vm.box import BoxBuild
    from tests.vm.kube_box import BOX_NAME, build_kube_box
    from tests.vm.test_vm_4_kubeadm import SETTINGS, project_copy

    kube = build_kube_box(BoxBuild(args.box / "labkit-debian12.box", args.box, info["recipe"], {}))
    settings.update(SETTINGS)
    return kube.box, project_copy(args.work / "project"), BOX_NAME, kube.key


def main(argv: list[str] | None = None) -> int:
    """Bring the lab VM up once, print where the time went, tear everything down."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", required=True, type=Path, help="a built box's folder (labkit-debian12.box)")
    parser.add_argument("--work", type=Path, default=Path("/var/cache/labkit/vm-bench"),
                        help="Vagrant's home and state (default %(default)s)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder of the Vagrantfile")
    parser.add_argument("--json", type=Path, help="append the numbers to this file (one JSON object a line)")
    parser.add_argument("--kube", action="store_true",
                        help="the three kubeadm VMs with their provisioning, as tests/vm/test_vm_4_kubeadm.py "
                             "brings them up (the test box with the doubles is derived from --box)")
    args = parser.parse_args(argv)
    # killed: unwind, so the VM (and libvirt) are stopped by the finally clauses
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if Path("/run/labkit/vm/state.json").exists():
        print("a lab libvirt runs here (/run/labkit/vm/state.json); only one can", file=sys.stderr)
        return 1
    info = json.loads((args.box / "info.json").read_text())
    settings = yaml.safe_load((args.root / "vagrant" / "settings.yaml").read_text())
    settings.update(box_source="local", storage_pool="labkit")
    box_file, root, box_name, box_key = args.box / "labkit-debian12.box", args.root, "labkit/debian12", info["recipe"]
    machines = ["lab"]
    if args.kube:
        box_file, root, box_name, box_key = kube_setup(args, info, settings)
        machines = KUBE
    out: dict = {"box": str(args.box), "machines": machines, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="labkit-vagrant-up-") as tmp:
        path = Path(tmp) / "settings.yaml"
        path.write_text(yaml.safe_dump(settings))
        libvirt = LibvirtLab()
        t = time.monotonic()
        libvirt.start()
        out["libvirt_start_s"] = round(time.monotonic() - t, 1)
        lab = VagrantLab(libvirt, args.work, path, root=root)
        try:
            lab.known_hosts.unlink(missing_ok=True)
            t = time.monotonic()
            lab.add_box(box_file, box_key, box_name)
            out["box_add_s"] = round(time.monotonic() - t, 1)
            out["vagrant_up_s"], lines = stamped_up(lab, machines)
            for machine, done in steps(lines, machines, out["vagrant_up_s"]).items():
                print(f"--- {machine}: seconds until its next step")
                for seconds, text in done:
                    print(f"{seconds:7.1f} {text}")
            for machine in machines:
                t = time.monotonic()
                host = lab.host(machine)
                host.run(["true"], timeout=60)
                out[f"{machine}: pin_and_first_ssh_s"] = round(time.monotonic() - t, 1)
                out[f"{machine}: systemd_analyze"] = host.run(["systemd-analyze"], timeout=120,
                                                              check=False).stdout.strip().splitlines()[0]
                print(f"--- {machine}: blame\n" + host.run("systemd-analyze blame | head -n 15",
                                                           timeout=120).stdout.rstrip())
                probe = dict(line.split() for line in host.run(PROBE, timeout=300).stdout.splitlines())
                out[f"{machine}: guest_process_start_ms"] = int(probe["proc"])
                out[f"{machine}: guest_sudo_true_ms"] = int(probe["sudo"])
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
