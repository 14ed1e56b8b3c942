"""``labkit loadgen``: run a TFTP load from here and print what it counted.

On a terminal a live progress line is drawn on stderr; elsewhere (pipes,
``Host.run``) nothing but the result is printed.  ``--json`` prints the whole
result as one JSON document (what :func:`labkit.loadgen.run_load_on` parses).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from labkit.exceptions import LoadgenError
from labkit.loadgen.runner import NOTHING_OK_EXIT, run_load
from labkit.loadgen.spec import DEFAULT_CONCURRENCY, DEFAULT_DURATION, LoadSpec
from labkit.util import writable_dir, writable_file


def register(subparsers) -> None:
    """Add the ``loadgen`` sub-command."""
    p = subparsers.add_parser(
        "loadgen", help="run a TFTP load (many concurrent reads, each from a fresh port)",
        description="Read FILE from a TFTP server over and over, many transfers at once, each "
                    "from a fresh client port; verify every transfer and count outcomes. "
                    f"Default: closed loop, {DEFAULT_CONCURRENCY} in flight, "
                    f"{DEFAULT_DURATION:g} s. Exit 0 when done, {NOTHING_OK_EXIT} when no "
                    "transfer was ok, 1 on an error.")
    p.add_argument("host", help="server IPv4 address")
    p.add_argument("port", type=int, help="server UDP port (69, or a NodePort)")
    p.add_argument("file", help="file name to read")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", "-c", type=int, help="closed loop: transfers in flight")
    load.add_argument("--rate", "-r", type=float, help="open loop: transfers started per second")
    p.add_argument("--max-in-flight", type=int, default=1000,
                   help="open loop: cap on transfers in flight; starts beyond it are skipped "
                        "and counted (default 1000)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", "-d", type=float, help="seconds to start transfers for")
    stop.add_argument("--count", "-n", type=int, help="number of transfers to start")
    p.add_argument("--workers", "-w", type=int, default=1,
                   help="processes to spread the load over (default 1)")
    p.add_argument("--timeout", type=float, default=1.0,
                   help="seconds before the last packet is resent (default 1)")
    p.add_argument("--retries", type=int, default=3, help="resends per packet (default 3)")
    p.add_argument("--deadline", type=float, default=10.0,
                   help="seconds a transfer may take in all (default 10)")
    p.add_argument("--size", type=int, help="expected file size in bytes (default: learned "
                                            "from a first transfer)")
    p.add_argument("--sha256", help="expected SHA-256 of the file (hex)")
    p.add_argument("--blksize", type=int, help="request RFC 2348 blksize (off by default)")
    p.add_argument("--windowsize", type=int, help="request RFC 7440 windowsize (off by default)")
    p.add_argument("--option-timeout", type=int,
                   help="request the RFC 2349 timeout option, seconds (off by default)")
    p.add_argument("--tsize", action="store_true", help="request the RFC 2349 tsize option")
    p.add_argument("--bind", help="source IPv4 address")
    p.add_argument("--ports", metavar="LOW-HIGH", type=_port_range,
                   help="client ports to take in turn, one per transfer (default: a random "
                        "free ephemeral port each time)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--transfers", metavar="CSV", help="write one row per transfer to this CSV file")
    p.add_argument("--progress", metavar="FILE",
                   help="append the running totals to FILE as one JSON line about once a second "
                        "(elapsed_s, started, ok, failed, in_flight, and at: the wall time; what a live chart reads)")
    p.add_argument("--out", metavar="DIR",
                   help="write summary.json, timeseries.csv (and transfers.csv) to DIR")
    p.set_defaults(func=_loadgen)


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """Build the LoadSpec the parsed arguments describe (validated)."""
    return LoadSpec(host=args.host, port=args.port, filename=args.file, expected_size=args.size,
                    sha256=args.sha256, concurrency=args.concurrency, rate=args.rate,
                    max_in_flight=args.max_in_flight, duration=args.duration, count=args.count,
                    timeout=args.timeout, retries=args.retries, deadline=args.deadline,
                    workers=args.workers, blksize=args.blksize, windowsize=args.windowsize,
                    option_timeout=args.option_timeout, tsize=args.tsize, bind=args.bind,
                    ports=args.ports)


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range such as 1024-65535")
    return int(low), int(high)


def _loadgen(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    try:  # before the load, not after it: a bad path must not cost the results
        if args.out:
            writable_dir(args.out, "--out")
        if args.transfers:
            writable_file(args.transfers, "--transfers")
    except ValueError as exc:
        raise LoadgenError(str(exc)) from None
    live = sys.stderr.isatty()
    line = _ProgressLine(sys.stderr) if live else None
    keep = args.transfers or bool(args.out)
    feed = open(args.progress, "a", buffering=1) if args.progress else None
    progress = _fan_out(line, feed)
    try:
        result = run_load(spec, transfers=args.transfers or keep, progress=progress, keep_table=bool(args.out))
    finally:
        if line:
            line.clear()
        if feed:
            feed.close()
    if args.out:
        result.write(args.out)
    if args.json:
        print(result.to_json())
    else:
        print(format_summary(result.summary))
    return 0 if result.ok or not result.summary["started"] else NOTHING_OK_EXIT


def _fan_out(line, feed):
    """One progress callback for the terminal line and the JSON-lines file (either may be None)."""
    if line is None and feed is None:
        return None

    def progress(p: dict) -> None:
        if line is not None:
            line(p)
        if feed is not None:
            totals = {k: p[k] for k in ("elapsed_s", "started", "ok", "failed", "in_flight")}
            feed.write(json.dumps({**totals, "at": round(time.time(), 3)}) + "\n")

    return progress


class _ProgressLine:
    """One line on a terminal, redrawn about once a second."""

    def __init__(self, stream):
        self.stream = stream
        self.last_ok = 0
        self.last_t = 0.0

    def __call__(self, p: dict) -> None:
        dt = p["elapsed_s"] - self.last_t
        rate = (p["ok"] - self.last_ok) / dt if dt > 0 else 0.0
        self.last_ok, self.last_t = p["ok"], p["elapsed_s"]
        self.stream.write(f"\r\x1b[K{p['elapsed_s']:6.1f}s  ok {p['ok']:>9}  failed {p['failed']:>7}"
                          f"  in flight {p['in_flight']:>5}  {rate:8.0f}/s")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def format_summary(s: dict) -> str:
    """Return the human-readable summary of a result's summary dict."""
    reasons = ", ".join(f"{k} {v}" for k, v in s["by_reason"].items()) or "none"
    lat = " / ".join("-" if s[f"latency_p{p}_ms"] is None else f"{s[f'latency_p{p}_ms']:.2f}"
                     for p in (50, 90, 99))
    cpu = s["cpu_user_s"] + s["cpu_sys_s"]
    lines = [
        f"ok {s['ok']}  failed {s['failed']} ({reasons})  started {s['started']}"
        + (f"  skipped {s['skipped']}" if s["skipped"] else ""),
        f"{s['transfers_per_s']:.1f} verified transfers/s over {s['duration_s']:.2f} s "
        f"({s['workers']} worker{'s' if s['workers'] != 1 else ''}, {s['mode']} loop, "
        f"{s['verified']} checked)",
        f"latency p50/p90/p99 {lat} ms   retransmits {s['retransmits']}  duplicates "
        f"{s['duplicates']}  wrong sender {s['wrong_sender']}",
        f"loadgen CPU {cpu:.2f} s (user {s['cpu_user_s']:.2f}, sys {s['cpu_sys_s']:.2f})"
        + (f": {s['ok_per_cpu_s']:.0f} transfers per CPU-second" if s["ok_per_cpu_s"] else ""),
    ]
    if s.get("interrupted"):
        lines.append("interrupted: transfers in flight were counted as aborted")
    return "\n".join(lines)
