"""``labkit doctor``: what the netns testbed needs on this machine, and how to get it.

Kernel features are checked the way the testbed uses them: in a throw-away
network namespace (named ``lkdoc<pid>``, removed before returning) the doctor
makes a veth pair and a bridge, loads a NAT rule and the explicit TFTP helper
rule, so a check is green only when the real thing works.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass

from labkit.exceptions import TestbedError
from labkit.host import Host, LocalHost, NetnsHost

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


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def check_binaries() -> list[Check]:
    """Check the programs the testbed runs (``in.tftpd`` must be tftpd-hpa's)."""
    out = []
    for cmd, pkg, required in BINARIES:
        if cmd == "in.tftpd":
            out.append(check_tftpd())
            continue
        path = _which(cmd)
        out.append(Check(f"program {cmd}", bool(path), path or "not found",
                         f"{APT} {pkg}", required))
    return out


TFTPD_HPA = "tftp-hpa"  # what tftpd-hpa's `in.tftpd -V` prints first


def tftpd_version(path: str, host: Host | None = None) -> str:
    """What ``PATH -V`` prints (tftpd-hpa: ``tftp-hpa 5.2, with remap, ...``), first line."""
    res = (host or LocalHost()).run([path, "-V"], check=False, timeout=10)
    return ((res.stdout or res.stderr).strip().splitlines() or [f"exit {res.exit_code}, no output"])[0]


def check_tftpd() -> Check:
    """``in.tftpd`` is there and is tftpd-hpa's: the pods run it with its options
    (``--foreground``, ``--secure``, ``--address``), which other servers' ``in.tftpd``
    (atftpd's, for one) refuse."""
    path = _which("in.tftpd")
    if not path:
        return Check("program in.tftpd", False, "not found", f"{APT} tftpd-hpa")
    version = tftpd_version(path)
    if not version.startswith(TFTPD_HPA):
        return Check("program in.tftpd", False, f"not tftpd-hpa's: {version} ({path})",
                     f"labkit runs tftpd-hpa's in.tftpd: {APT} --reinstall tftpd-hpa, and remove "
                     f"the other one ({path}; atftpd's: apt-get remove atftpd) or put "
                     "tftpd-hpa's first on the PATH")
    return Check("program in.tftpd", True, f"{path} ({version})")


def check_root() -> Check:
    """The testbed makes namespaces and sets global sysctls: it needs root."""
    root = os.geteuid() == 0
    return Check("root", root, "uid 0" if root else f"uid {os.geteuid()}",
                 "run as root (sudo make lab)")


def check_kernel() -> list[Check]:
    """Check Linux, /proc/sys/net/netfilter and cgroup CPU control."""
    linux = platform.system() == "Linux"
    checks = [Check("Linux kernel", linux, platform.release() if linux else platform.system(),
                    "the netns testbed needs Linux; use --testbed vagrant elsewhere")]
    nf = os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max")
    checks.append(Check("/proc/sys/net/netfilter", nf, "present" if nf else "absent",
                        "modprobe nf_conntrack"))
    checks.append(check_cgroup_cpu())
    return checks


def check_cgroup_cpu() -> Check:
    """Pods get a CPU limit through cgroups, v2 or v1: the check asks the code that makes them."""
    from labkit.cgroups import cpu_root

    try:
        root, version = cpu_root()
    except TestbedError as exc:
        fix = ("echo +cpu > /sys/fs/cgroup/cgroup.subtree_control" if "subtree_control" in str(exc)
               else "enable the cgroup cpu controller (v2) or mount it (v1)")
        return Check("cgroup CPU control", False, str(exc), fix)
    return Check("cgroup CPU control", True, f"cgroup v{version} at {root}")


def probe_namespace_features(host: Host | None = None) -> list[Check]:
    """Try namespaces, veth, bridge, NAT and the TFTP helper in a throw-away namespace."""
    host = host or LocalHost()
    ns = f"lkdoc{os.getpid()}"
    made = host.run(["ip", "netns", "add", ns], check=False)
    checks = [Check("network namespaces", made.ok, "ip netns add works" if made.ok else made.stderr.strip(),
                    "a kernel with CONFIG_NET_NS; run as root")]
    if not made.ok:
        return checks
    inside = NetnsHost(ns)
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


def run_checks() -> list[Check]:
    """Run every check; the namespace probe only when root and the tools are there."""
    checks = [check_root(), *check_kernel(), *check_binaries()]
    if checks[0].ok and _which("ip") and _which("iptables"):
        checks.extend(probe_namespace_features())
    else:
        checks.append(Check("namespace features", False, "not probed (needs root, ip and iptables)",
                            "fix the items above, then run labkit doctor again"))
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
    checks = run_checks()
    print(format_table(checks))
    bad = missing(checks)
    if bad:
        print(f"\n{len(bad)} required item(s) missing: " + ", ".join(c.name for c in bad))
        return 1
    print("\nall required items are there: the netns testbed can run on this machine.")
    return 0


def register(sub) -> None:
    """Add ``labkit doctor`` to the CLI."""
    p = sub.add_parser("doctor", help="check what the netns testbed needs on this machine")
    p.set_defaults(func=_cmd_doctor)


