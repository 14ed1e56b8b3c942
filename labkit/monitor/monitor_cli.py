"""``labkit monitor``: watch conntrack in the lab's namespaces from a terminal, or serve it.

Prints one line per namespace and second (count against the max, expectations,
drops and early drops since the start) and each kernel drop line as it comes;
with ``--out DIR`` writes ``samples.csv`` and ``events.csv`` there at the end.
With ``--serve [ADDR:]PORT`` it is a Prometheus exporter instead
(:mod:`labkit.monitor.exporter`), of the lab's namespaces or, with
``--all-netns``, of every namespace of the machine.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
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
    p.add_argument("--hz", type=_hz, default=None,
                   help="samples per second and namespace (default 10; 1 with --serve)")
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
    p.add_argument("--serve", type=_listen, default=None, metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (ADDR default 127.0.0.1) "
                   "until Ctrl-C, SIGTERM or --duration, instead of printing and writing tables")
    p.add_argument("--all-netns", action="store_true",
                   help="with --serve: every network namespace of this machine (named ones under "
                   "/run/netns and those of running processes), followed as they come and go")
    p.add_argument("--rescan", type=_seconds, default=None, metavar="S",
                   help="with --serve: look for namespaces that came or went every S seconds (default 5)")
    p.set_defaults(func=cmd_monitor)


def _hz(text: str) -> float:
    """``--hz``: a number of samples per second in (0, 1000]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of samples per second") from None
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"{text} samples per second: must be more than 0 and at most 1000")
    return value


def _seconds(text: str) -> float:
    """``--rescan``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} s: must be more than 0")
    return value


def _listen(text: str) -> tuple[str, int]:
    """``--serve``: ``[ADDR:]PORT``."""
    from labkit.monitor.exporter import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    _check_flags(args)
    if args.serve is not None:
        return cmd_serve(args)
    from labkit.monitor.monitor import Monitor

    args.hz = args.hz or 10.0
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


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do not go together, naming them.

    Raises:
        MonitorError: which flag, and what it needs or excludes.
    """
    if args.serve is None:
        for flag, given in (("--all-netns", args.all_netns), ("--rescan", args.rescan is not None)):
            if given:
                raise MonitorError(f"{flag} is for the exporter: add --serve [ADDR:]PORT")
        return
    for flag, given in (("--out", args.out), ("--gzip", args.gzip)):
        if given:
            raise MonitorError(f"{flag} cannot be used with --serve: the exporter keeps only the newest "
                               "sample of each namespace (run a second `labkit monitor --out DIR`)")
    if args.all_netns and args.netns:
        raise MonitorError("--all-netns and --netns exclude each other: --all-netns already samples "
                           "every namespace")


def cmd_serve(args: argparse.Namespace) -> int:
    """``labkit monitor --serve``: a Prometheus endpoint until Ctrl-C, SIGTERM or ``--duration``."""
    from labkit.monitor.discover import all_netns, static_source, testbed_source
    from labkit.monitor.exporter import (
        DEFAULT_HZ, DEFAULT_RESCAN_S, ConntrackExporter, make_registry, run_until, serve,
    )

    host, port = args.serve
    live = threading.Event()

    def changed(added, removed) -> None:
        if not live.is_set() or args.quiet:
            return
        for f in added:
            print(f"labkit monitor: + netns {f.label} ({f.source}, inode {f.inode})", flush=True)
        for f in removed:
            print(f"labkit monitor: - netns {f.label} (inode {f.inode})", flush=True)

    if args.all_netns:
        source = all_netns()
    elif args.netns:
        source = static_source({role: getattr(h, "netns", None)
                                for role, h in parse_netns_args(args.netns).items()})
    else:
        source = testbed_source(args.testbed)
    exporter = ConntrackExporter(source, hz=args.hz or DEFAULT_HZ, rescan=args.rescan or DEFAULT_RESCAN_S,
                                 kmsg=not args.no_kmsg, keep_foreign=args.all_netns, on_change=changed)
    server, _, bound = serve(make_registry(exporter), host, port)   # a taken port fails before any sampling
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    ok = False
    try:
        exporter.start()
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/metrics"
        print(f"labkit monitor: serving {url} ({exporter.hz:g} Hz, rescan every {exporter.rescan_s:g} s); "
              f"namespaces: {', '.join(exporter.labels)}", flush=True)
        live.set()
        run_until(stop, exporter, None if args.duration is None else time.monotonic() + args.duration)
        ok = True
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        server.shutdown()
        server.server_close()
        exporter.stop(raise_errors=ok)
    print("labkit monitor: stopped", flush=True)
    return 0
