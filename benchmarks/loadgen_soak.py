#!/usr/bin/env python3
"""Soak: a long closed-loop load at the machine's maximum; does the loadgen's memory stay flat?

Runs ``labkit loadgen`` (in a client namespace, against in.tftpd in a server
namespace: labkit.loadgen.pair.TftpPair) for ``--seconds`` (default 600) and
prints its resident memory once a minute (from the result's per-second
``rss_bytes`` series), the peak (ru_maxrss), the transfers, and the agreement
of ``ok`` with the server-side count.  Not a test: run it by hand, as root.

    .venv/bin/python benchmarks/loadgen_soak.py [--seconds 600] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from labkit.loadgen import LoadSpec, run_load_on  # noqa: E402
from labkit.loadgen.pair import TftpPair  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with TftpPair(f"lks{os.getpid() % 100000}") as pair:
        spec = LoadSpec(pair.host, pair.port, pair.filename, expected_size=pair.size,
                        concurrency=args.concurrency, duration=args.seconds, workers=args.workers)
        result = run_load_on(pair.client, spec)
        server = pair.last_data_count()
    s = result.summary
    rss = result.series["rss_bytes"]
    print(f"{s['ok']} ok, {s['failed']} failed {s['by_reason']} in {s['duration_s']:.0f} s: "
          f"{s['transfers_per_s']:.0f}/s; server counted {server} "
          f"({(s['ok'] - server) / max(server, 1) * 100:+.2f} %)")
    print(f"loadgen CPU {s['cpu_user_s'] + s['cpu_sys_s']:.1f} s: {s['ok_per_cpu_s']:.0f} "
          f"transfers per CPU-second; ru_maxrss {s['maxrss_kb'] / 1024:.1f} MiB")
    print("resident memory (MiB) at the end of each minute:")
    marks = sorted(set(range(0, len(rss), 60)) | {len(rss) - 1})
    print("  " + "  ".join(f"{m}s:{rss[m] / 2**20:.1f}" for m in marks))
    steady = rss[60:-1] or rss
    print(f"after the first minute: min {min(steady) / 2**20:.1f} MiB, max "
          f"{max(steady) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
