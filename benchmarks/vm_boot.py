"""Boot time of labkit's box under plain QEMU (TCG): to the host key on the console, to SSH, and
what ``systemd-analyze`` says inside.

Boots the box in ``--box`` (a built box's folder: ``box.img``, ``vmlinuz``, ``initrd.img``)
with :class:`labkit.vm.qemu.QemuGuest` (user networking with ``restrict=on``, a throw-away
overlay), optionally with another kernel command line or initrd, and prints:

- seconds from QEMU's start to the host key line on the console and to the first SSH
  command answered;
- ``systemd-analyze`` (kernel + initrd + userspace), the top of ``blame`` and the
  critical chain of ``multi-user.target``;
- the kernel's own milestones from ``dmesg`` (initrd unpacked, ``/init`` run, root mounted,
  systemd started);
- the cost of a process start and of ``sudo -n true`` inside the guest;
- QEMU's CPU seconds up to the first SSH answer (the boot's work: steadier than wall time
  when other load shares the machine).

    sudo .venv/bin/python benchmarks/vm_boot.py --box /var/cache/labkit/box/<recipe> --cpus 2 --memory 2048

``--runs N`` boots N times one after the other; ``--json FILE`` keeps the numbers.  Compare
two boxes (or command lines) under the same load: the machine's load average is printed
before each boot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.vm.qemu import QemuGuest  # noqa: E402

MILESTONES = (("initrd unpacked", r"Freeing initrd memory"), ("/init run", r"Run /init as init process"),
              ("root mounted", r"EXT4-fs \(vda\): mounted"), ("systemd starts", r"systemd\[1\]: systemd \d+"),
              ("kernel init done", r"Freeing unused kernel image"))
# the process-start and sudo costs, measured in the guest (its own clock)
PROBE = ("s=$(date +%s%N); for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done; e=$(date +%s%N); "
         "echo proc $(( (e - s) / 10000000 )); "
         "s=$(date +%s%N); for i in 1 2 3; do sudo -n true; done; e=$(date +%s%N); "
         "echo sudo $(( (e - s) / 3000000 ))")


def qemu_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user + system) QEMU has used so far: the boot's work, less sensitive than
    wall time to other load on the machine."""
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


def boot_once(box: Path, work: Path, args: argparse.Namespace) -> dict:
    """One boot: the numbers of it (seconds), and the guest's analysis text."""
    guest = QemuGuest(box, work, cpus=args.cpus, memory=args.memory, cmdline=args.cmdline, initrd=args.initrd)
    out: dict = {"load_before": os.getloadavg()[0]}
    start = time.monotonic()
    try:
        guest.start()
        guest.host_key_line(timeout=600)
        out["to_host_key_s"] = round(time.monotonic() - start, 1)
        host = guest.host(timeout=600)
        out["to_ssh_s"] = round(time.monotonic() - start, 1)
        out["qemu_cpu_to_ssh_s"] = qemu_cpu_seconds(guest.pid)
        # systemd-analyze refuses while jobs still run: wait for the boot to finish
        for _ in range(120):
            done = host.run(["systemd-analyze"], timeout=120, check=False)
            if done.ok:
                break
            time.sleep(2)
        out["to_boot_finished_s"] = round(time.monotonic() - start, 1)
        out["systemd_analyze"] = done.stdout.strip() or done.stderr.strip()
        out["blame"] = host.run("systemd-analyze blame | head -n 25", timeout=120).stdout.rstrip()
        out["critical_chain"] = host.run("systemd-analyze critical-chain multi-user.target", timeout=120,
                                         check=False).stdout.rstrip()
        dmesg = host.run(["dmesg"], timeout=120).stdout
        for name, pattern in MILESTONES:
            found = re.search(r"^\[\s*([\d.]+)\][^\n]*" + pattern, dmesg, re.M)
            out[f"dmesg: {name}"] = float(found.group(1)) if found else None
        probe = dict(line.split() for line in host.run(PROBE, timeout=300).stdout.splitlines())
        out["guest_process_start_ms"] = int(probe["proc"])
        out["guest_sudo_true_ms"] = int(probe["sudo"])
        out["failed_units"] = host.run("systemctl --failed --no-legend --plain", timeout=120).stdout.strip()
        out["cmdline"] = host.run(["cat", "/proc/cmdline"], timeout=60).stdout.strip()
        out["initrd_bytes"] = (args.initrd or box / "initrd.img").stat().st_size
        out["console_bytes"] = guest.console.stat().st_size
    finally:
        guest.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    """Boot the box ``--runs`` times and print each boot's numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", required=True, type=Path, help="a built box's folder")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", type=int, default=2048, help="MiB")
    parser.add_argument("--cmdline", help="another kernel command line than the box's")
    parser.add_argument("--initrd", type=Path, help="another initrd than the box's")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="append the numbers to this file (one JSON object a line)")
    parser.add_argument("--quiet", action="store_true", help="only the numbers, not blame and the chain")
    args = parser.parse_args(argv)
    # killed: unwind, so the VM (and libvirt) are stopped by the finally clauses
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="labkit-vm-boot-") as work:
            out = boot_once(args.box, Path(work), args)
        out.update(box=str(args.box), run=run + 1, cpus=args.cpus, memory=args.memory)
        for key, value in out.items():
            if isinstance(value, str) and "\n" in value:
                if not args.quiet:
                    print(f"--- {key}\n{value}")
            else:
                print(f"{key:28s} {value}")
        print()
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
