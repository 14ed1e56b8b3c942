"""Benchmark of `labkit monitor --serve`: the exporter's CPU cost at 1 Hz over 5 namespaces.

    sudo .venv/bin/python benchmarks/exporter_bench.py [--duration 60] [--hz 1]

Makes 5 network namespaces (``lk``-prefixed, removed at the end), starts the
exporter as a user would (``labkit monitor --serve 127.0.0.1:0 --netns ...``, in
a process of its own, following ``/dev/kmsg``), lets it settle, and reads its
CPU time (``/proc/PID/stat``: user + system, all its threads) over ``--duration``
seconds, three ways:

1. not scraped;
2. scraped every second (Prometheus at ``scrape_interval: 1s``, as the tests run it);
3. ``--all-netns``, rescanning every 5 s, scraped every second: every namespace
   of this machine (the 5 and whatever else there is), found from ``/run/netns``
   and every process's ``/proc/PID/ns/net``.

It prints CPU seconds and the share of one core (the goal: under 1 %), the
samples each namespace got, and how long a scrape took.  Not a test: it prints
numbers.  Needs root.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.pressure import PressureLab  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "monitor", "--serve", "127.0.0.1:0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"serving (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"exporter did not start: {line!r} {proc.stderr.read()}")
    return proc, match.group(1)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def measure(args: list[str], duration: float, scrape_every: float | None, settle: float = 3.0) -> dict:
    proc, url = start(args)
    try:
        time.sleep(settle)
        before = fetch(url)
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        scrapes, scrape_s = 0, 0.0
        next_scrape = wall0
        while time.monotonic() - wall0 < duration:
            if scrape_every is not None and time.monotonic() >= next_scrape:
                t = time.perf_counter()
                text = fetch(url)
                scrape_s += time.perf_counter() - t
                scrapes += 1
                next_scrape += scrape_every
            time.sleep(0.05)
        cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
        after = fetch(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    stamps = lambda text: {m.group(1): float(m.group(2)) for m in re.finditer(  # noqa: E731
        r'labkit_netns_sample_timestamp_seconds\{netns="([^"]+)"\} (\S+)', text)}
    t0, t1 = stamps(before), stamps(after)
    lines = len([ln for ln in (text if scrapes else after).splitlines() if ln and not ln.startswith("#")])
    return {"cpu_s": cpu1 - cpu0, "wall_s": wall1 - wall0, "namespaces": len(t1),
            "share": (cpu1 - cpu0) / (wall1 - wall0), "scrapes": scrapes,
            "scrape_ms": 1000 * scrape_s / scrapes if scrapes else None, "series": lines,
            "sampled_s": min(t1[k] - t0[k] for k in t1 if k in t0), "exit": proc.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured per way (default 60)")
    parser.add_argument("--hz", type=float, default=1.0, help="samples per second (default 1)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("exporter_bench: needs root", file=sys.stderr)
        return 2
    lab = PressureLab(f"lke{os.getpid() % 100000}", extra=3)
    try:
        targets = [a for role, host in lab.hosts().items() for a in ("--netns", f"{role}={host.netns}")]
        print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}; "
              f"{sum(1 for p in os.listdir('/proc') if p.isdigit())} processes")
        ways = [("5 namespaces, not scraped", [*targets, "--hz", str(args.hz)], None),
                ("5 namespaces, scraped every 1 s", [*targets, "--hz", str(args.hz)], 1.0),
                ("--all-netns (rescan 5 s), scraped every 1 s", ["--all-netns", "--hz", str(args.hz)], 1.0)]
        for name, argv, every in ways:
            r = measure(argv, args.duration, every)
            scrape = f", {r['scrapes']} scrapes of {r['series']} series, {r['scrape_ms']:.1f} ms each" \
                if r["scrapes"] else ""
            print(f"{name}: {args.hz:g} Hz x {r['namespaces']} namespaces x {r['wall_s']:.1f} s: "
                  f"{r['cpu_s']:.2f} CPU-s = {100 * r['share']:.2f}% of one core{scrape}; "
                  f"samples kept coming for {r['sampled_s']:.1f} s; exit {r['exit']}", flush=True)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
