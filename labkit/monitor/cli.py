"""``labkit monitor``: watch conntrack in the lab's namespaces from a terminal.

Prints one line per namespace and second (count against the max, expectations,
drops and early drops since the start) and each kernel drop line as it comes;
with ``--out DIR`` writes ``samples.csv`` and ``events.csv`` there at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

from labkit.exceptions import MonitorError
from labkit.host import Host, LocalHost, NetnsHost


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``monitor`` command."""
    p = subparsers.add_parser(
        "monitor", help="sample conntrack counts, counters and kernel drop lines per namespace",
        description="Sample nf_conntrack_count, the expectation count, the conntrack stat "
        "counters and sysctls in each namespace, and follow /dev/kmsg for 'table full' lines. "
        "Without --netns: the lab's namespaces when a netns testbed is up, else this machine's.")
    p.add_argument("--hz", type=float, default=10.0, help="samples per second (default 10)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--out", default=None, metavar="DIR", help="write samples.csv and events.csv here")
    p.add_argument("--gzip", action="store_true", help="write samples.csv.gz and events.csv.gz")
    p.add_argument("--netns", action="append", default=[], metavar="ROLE=NAME",
                   help="a named network namespace to sample as ROLE (repeatable); "
                   "ROLE=- samples this machine's own namespace")
    p.add_argument("--testbed", default="netns",
                   help="without --netns, sample this testbed's namespaces when it is up (default netns)")
    p.add_argument("--no-kmsg", action="store_true", help="do not follow the kernel log")
    p.add_argument("--quiet", action="store_true", help="no live lines, only the summary")
    p.set_defaults(func=cmd_monitor)


def parse_netns_args(items: list[str]) -> dict[str, Host]:
    """Turn ``ROLE=NAME`` arguments into monitor targets.

    Raises:
        MonitorError: an item is not ``ROLE=NAME`` or a role repeats.
    """
    targets: dict[str, Host] = {}
    for item in items:
        role, sep, name = item.partition("=")
        if not sep or not role or not name:
            raise MonitorError(f"--netns {item!r}: expected ROLE=NAME, e.g. node=lk-ab12-node")
        if role in targets:
            raise MonitorError(f"--netns {item!r}: role {role!r} given twice")
        targets[role] = LocalHost() if name == "-" else NetnsHost(name, name=role)
    return targets


def default_targets(testbed_name: str = "netns") -> tuple[dict[str, Host], dict[int, str]]:
    """The running testbed's monitor targets and namespace roles, or this machine's namespace."""
    try:
        from labkit.testbed import get_testbed
    except ImportError:
        return {"init": LocalHost()}, {}
    testbed = get_testbed(testbed_name)
    if not testbed.is_up:
        return {"init": LocalHost()}, {}
    return dict(testbed.monitor_targets()), dict(testbed.netns_roles())


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor until the duration ends or Ctrl-C; print and write the results."""
    from labkit.monitor.monitor import Monitor

    if args.netns:
        targets, roles = parse_netns_args(args.netns), {}
    else:
        targets, roles = default_targets(args.testbed)
    mon = Monitor(targets, hz=args.hz, kmsg=not args.no_kmsg, netns_roles=roles)
    mon.start()
    start = time.monotonic()
    first: dict[tuple[str, str], dict[str, int]] = {}
    seen = 0
    try:
        while args.duration is None or time.monotonic() - start < args.duration:
            time.sleep(min(1.0, max(0.05, (args.duration or 1e9) - (time.monotonic() - start))))
            if not args.quiet:
                seen = _print_live(mon, first, seen, time.monotonic() - start)
    except KeyboardInterrupt:
        pass
    finally:
        mon.stop()
    samples, events = mon.samples, mon.events
    print(f"monitor: {samples['time'].nunique() if len(samples) else 0} sample times, "
          f"{len(samples)} rows over {len(targets)} namespaces; {len(events)} kernel lines "
          f"({', '.join(f'{k} {n}' for k, n in events['kind'].value_counts().items()) or 'none'})")
    if args.out:
        paths = mon.write(args.out, compress=args.gzip)
        print(f"monitor: wrote {paths['samples']} and {paths['events']}")
    return 0


def _print_live(mon, first: dict, seen: int, elapsed: float) -> int:
    for (host, role), (_, v) in sorted(mon.latest().items()):
        base = first.setdefault((host, role), v)
        print(f"{elapsed:7.1f}s {role:>8} count {v.get('nf_conntrack_count', 0):>7}/"
              f"{v.get('nf_conntrack_max', 0):<7} expect {v.get('expect_count', 0):>5}/"
              f"{v.get('nf_conntrack_expect_max', 0):<5} drop +{v.get('stat_drop', 0) - base.get('stat_drop', 0):<6}"
              f" early_drop +{v.get('stat_early_drop', 0) - base.get('stat_early_drop', 0):<6}"
              f" insert_failed +{v.get('stat_insert_failed', 0) - base.get('stat_insert_failed', 0)}")
    new = mon.new_events(seen)
    for host, wall, ev in new:
        stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
        print(f"{stamp} {host} kernel: {ev.message}")
    sys.stdout.flush()
    return seen + len(new)
