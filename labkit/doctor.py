"""``labkit doctor``: what the netns testbed needs on a machine, and how to get it.

The machine is this one, or another reached over SSH (``labkit doctor --on
vagrant:lab``, see :mod:`labkit.remote.targets`): every check then runs there,
and one more checks that labkit's own source can run there
(:func:`labkit.remote.deploy.deploy_labkit`).

Kernel features are checked the way the testbed uses them: in a throw-away
network namespace (named ``lkdoc<pid>``, removed before returning) the doctor
makes a veth pair and a bridge, loads a NAT rule and the explicit TFTP helper
rule, so a check is green only when the real thing works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from labkit.exceptions import TestbedError
from labkit.host import Host, LocalHost

APT = "apt-get install"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table.

    Attributes:
        name: what was checked.
        ok: whether it is there and works.
        detail: what was found (a version, a path, the error).
        fix: how to get it when it is missing.
        required: whether the netns testbed needs it (else it only helps).
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


BINARIES = (
    ("ip", "iproute2", True),
    ("iptables", "iptables", True),
    ("iptables-restore", "iptables", True),
    ("conntrack", "conntrack", True),
    ("in.tftpd", "tftpd-hpa", True),
    ("tftp", "tftp-hpa", False),
    ("atftp", "atftp", False),
    ("nft", "nftables", False),  # iteration 12: kube-proxy's nftables mode
)


def _which(machine: Host, cmd: str) -> str | None:
    found = machine.run(["sh", "-c", 'PATH="$PATH:/usr/sbin:/sbin" command -v "$1"', "sh", cmd],
                        check=False, timeout=30)
    return found.stdout.strip() or None if found.ok else None


def check_binaries(machine: Host | None = None) -> list[Check]:
    """Check the programs the testbed runs (``in.tftpd`` must be tftpd-hpa's)."""
    machine = machine or LocalHost()
    out = []
    for cmd, pkg, required in BINARIES:
        if cmd == "in.tftpd":
            out.append(check_tftpd(machine))
            continue
        path = _which(machine, cmd)
        out.append(Check(f"program {cmd}", bool(path), path or "not found",
                         f"{APT} {pkg}", required))
    return out


TFTPD_HPA = "tftp-hpa"  # what tftpd-hpa's `in.tftpd -V` prints first


def tftpd_version(path: str, host: Host | None = None) -> str:
    """What ``PATH -V`` prints (tftpd-hpa: ``tftp-hpa 5.2, with remap, ...``), first line."""
    res = (host or LocalHost()).run([path, "-V"], check=False, timeout=10)
    return ((res.stdout or res.stderr).strip().splitlines() or [f"exit {res.exit_code}, no output"])[0]


def check_tftpd(machine: Host | None = None) -> Check:
    """``in.tftpd`` is there and is tftpd-hpa's: the pods run it with its options
    (``--foreground``, ``--secure``, ``--address``), which other servers' ``in.tftpd``
    (atftpd's, for one) refuse."""
    machine = machine or LocalHost()
    path = _which(machine, "in.tftpd")
    if not path:
        return Check("program in.tftpd", False, "not found", f"{APT} tftpd-hpa")
    version = tftpd_version(path, machine)
    if not version.startswith(TFTPD_HPA):
        return Check("program in.tftpd", False, f"not tftpd-hpa's: {version} ({path})",
                     f"labkit runs tftpd-hpa's in.tftpd: {APT} --reinstall tftpd-hpa, and remove "
                     f"the other one ({path}; atftpd's: apt-get remove atftpd) or put "
                     "tftpd-hpa's first on the PATH")
    return Check("program in.tftpd", True, f"{path} ({version})")


def check_root(machine: Host | None = None) -> Check:
    """The testbed makes namespaces and sets global sysctls: it needs root (there: directly or
    through ``sudo -n``)."""
    machine = machine or LocalHost()
    uid = machine.run(["id", "-u"], check=False, timeout=30)
    root = uid.ok and uid.stdout.strip() == "0"
    found = f"uid {uid.stdout.strip()}" if uid.ok else (uid.stderr.strip() or f"id -u: exit {uid.exit_code}")
    return Check("root", root, found, "run as root (sudo make lab); on another machine log in as root "
                 "or as a user who may sudo without a password")


def check_kernel(machine: Host | None = None) -> list[Check]:
    """Check Linux, /proc/sys/net/netfilter and cgroup CPU control."""
    machine = machine or LocalHost()
    uname = machine.run(["uname", "-sr"], check=False, timeout=30)
    system, _, release = uname.stdout.strip().partition(" ")
    linux = uname.ok and system == "Linux"
    checks = [Check("Linux kernel", linux, release if linux else (system or uname.stderr.strip()),
                    "the netns testbed needs Linux; use the lab VM (--on vagrant:lab) or --testbed vagrant")]
    nf = machine.exists("/proc/sys/net/netfilter/nf_conntrack_max")
    checks.append(Check("/proc/sys/net/netfilter", nf, "present" if nf else "absent",
                        "modprobe nf_conntrack"))
    checks.append(check_cgroup_cpu(machine))
    return checks


def check_cgroup_cpu(machine: Host | None = None) -> Check:
    """Pods get a CPU limit through cgroups, v2 or v1: the check asks the code that makes them."""
    from labkit.cgroups import cpu_root

    try:
        root, version = cpu_root(machine)
    except TestbedError as exc:
        fix = ("echo +cpu > /sys/fs/cgroup/cgroup.subtree_control" if "subtree_control" in str(exc)
               else "enable the cgroup cpu controller (v2) or mount it (v1)")
        return Check("cgroup CPU control", False, str(exc), fix)
    return Check("cgroup CPU control", True, f"cgroup v{version} at {root}")


def check_labkit_runs(machine: Host) -> Check:
    """labkit's source copied to another machine, and a Python there that runs its load generator."""
    from labkit.remote.deploy import deploy_labkit

    try:
        python = deploy_labkit(machine)
    except TestbedError as exc:
        return Check("labkit's Python parts", False, str(exc), "install python3 there (Debian: python3)")
    return Check("labkit's Python parts", True, f"runs with {python}")


def probe_namespace_features(host: Host | None = None) -> list[Check]:
    """Try namespaces, veth, bridge, NAT and the TFTP helper in a throw-away namespace."""
    host = host or LocalHost()
    ns = f"lkdoc{os.getpid()}"
    made = host.run(["ip", "netns", "add", ns], check=False)
    checks = [Check("network namespaces", made.ok, "ip netns add works" if made.ok else made.stderr.strip(),
                    "a kernel with CONFIG_NET_NS; run as root")]
    if not made.ok:
        return checks
    inside = host.netns(ns)
    try:
        steps: list[tuple[str, list[str], str]] = [
            ("veth", ["ip", "link", "add", "lkd0", "type", "veth", "peer", "name", "lkd1"],
             "modprobe veth"),
            ("bridge", ["ip", "link", "add", "lkdbr", "type", "bridge"], "modprobe bridge"),
            ("netfilter NAT", ["iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"],
             "modprobe nf_nat iptable_nat (and install iptables)"),
            ("conntrack in namespaces", ["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate",
                                         "NEW", "-j", "ACCEPT"], "modprobe nf_conntrack xt_conntrack"),
            ("TFTP conntrack helper", ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp",
                                       "--dport", "69", "-j", "CT", "--helper", "tftp"],
             "modprobe nf_conntrack_tftp nf_nat_tftp"),
        ]
        for name, argv, fix in steps:
            res = inside.run(argv, check=False, timeout=20)
            checks.append(Check(name, res.ok, "works" if res.ok else (res.stderr.strip() or "failed"), fix))
    finally:
        host.run(["ip", "netns", "del", ns], check=False)
    return checks


def run_checks(machine: Host | None = None) -> list[Check]:
    """Run every check on ``machine`` (default this one); the namespace probe only when root
    and the tools are there."""
    machine = machine or LocalHost()
    checks = [check_root(machine), *check_kernel(machine), *check_binaries(machine)]
    tools = {c.name: c.ok for c in checks}
    if checks[0].ok and tools.get("program ip") and tools.get("program iptables"):
        checks.extend(probe_namespace_features(machine))
    else:
        checks.append(Check("namespace features", False, "not probed (needs root, ip and iptables)",
                            "fix the items above, then run labkit doctor again"))
    if not machine.is_local:
        checks.append(check_labkit_runs(machine))
    return checks


def format_table(checks: list[Check]) -> str:
    """Render the checks as a plain-text table: check, state, detail, how to fix."""
    rows = [("check", "state", "found", "how to fix")]
    for c in checks:
        state = "ok" if c.ok else ("MISSING" if c.required else "optional")
        rows.append((c.name, state, c.detail.splitlines()[0][:60] if c.detail else "", "" if c.ok else c.fix))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    lines.insert(1, "-" * min(100, max(len(line) for line in lines)))
    return "\n".join(lines)


def missing(checks: list[Check]) -> list[Check]:
    """The required checks that failed."""
    return [c for c in checks if c.required and not c.ok]


def _cmd_doctor(args) -> int:
    if args.on:
        from labkit.remote.targets import machine_for

        with machine_for(args.on, inventory=args.inventory) as machine:
            checks = run_checks(machine)
        where = f"on {args.on}"
    else:
        checks, where = run_checks(), "on this machine"
    print(format_table(checks))
    bad = missing(checks)
    if bad:
        print(f"\n{len(bad)} required item(s) missing {where}: " + ", ".join(c.name for c in bad))
        return 1
    print(f"\nall required items are there: the netns testbed can run {where}.")
    return 0


def register(sub) -> None:
    """Add ``labkit doctor`` to the CLI."""
    p = sub.add_parser("doctor", help="check what the netns testbed needs on this machine (or --on another)")
    p.add_argument("--on", metavar="MACHINE", help="check another Linux machine over SSH: vagrant:NAME, "
                   "a host of the inventory, or [user@]host[:port]")
    p.add_argument("--inventory", help="the inventory file for --on (default: $LABKIT_INVENTORY or ./inventory.yaml)")
    p.set_defaults(func=_cmd_doctor)


