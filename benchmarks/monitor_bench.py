"""Benchmark of the conntrack monitor: its CPU cost, and whether it keeps up with a drop storm.

    sudo .venv/bin/python benchmarks/monitor_bench.py [--duration 60] [--hz 10] [--storm 12]

1. Cost: the monitor samples 5 network namespaces at ``--hz`` for ``--duration``
   seconds, in process (one thread per namespace) and through the agent (one
   process streaming JSON lines, as on a remote node).  It prints the CPU seconds
   it used and that as a share of one core (the target: at most 3% at 10 Hz).
2. Drop storm: with the global ``nf_conntrack_max`` lowered for ``--storm``
   seconds (through GlobalSysctls, restored after), a sender floods a namespace
   with new UDP flows.  The kernel lines the monitor recorded for that namespace
   are compared one by one (by their kernel timestamp) with what ``dmesg`` shows
   for the same window: none may be missing.  The ``drop`` counter is printed
   beside them: the kernel's rate limiter makes the lines undercount the drops.

Not a test: it prints numbers.  Needs root; makes only ``lk``-prefixed namespaces.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit.monitor import Monitor, parse_dmesg_line  # noqa: E402
from labkit.monitor.parse import TABLE_FULL  # noqa: E402
from labkit.sysctls import GlobalSysctls  # noqa: E402
from tests.integration.pressure import PressureLab  # noqa: E402


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_cost(lab: PressureLab, hz: float, duration: float, agent: bool) -> dict:
    """CPU seconds the monitor used sampling 5 namespaces for ``duration`` s."""
    hosts = lab.hosts()
    assert len(hosts) == 5, hosts
    mon = Monitor(hosts, hz=hz, agent=agent)
    self0, child0, wall0 = cpu_self(), cpu_children(), time.monotonic()
    mon.start()
    time.sleep(duration)
    mon.stop()
    wall = time.monotonic() - wall0
    used_self, used_child = cpu_self() - self0, cpu_children() - child0
    t0 = time.process_time()
    rows = len(mon.samples)
    frame_s = time.process_time() - t0
    ticks = mon.samples.groupby("netns")["time"].nunique()
    return {"mode": "agent" if agent else "in-process", "wall_s": wall, "cpu_s": used_self + used_child,
            "cpu_self_s": used_self, "cpu_agent_s": used_child,
            "share_of_core": (used_self + used_child) / wall, "rows": rows,
            "ticks_per_ns_min": int(ticks.min()), "ticks_expected": int(hz * duration),
            "frame_build_s": frame_s}


def dmesg_usecs(inode: int, usec_from: int, usec_to: int) -> set[int]:
    out = subprocess.run(["dmesg", "-r"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        event = parse_dmesg_line(line)
        if event and event.kind == TABLE_FULL and event.netns_inode == inode \
                and usec_from <= event.usec <= usec_to:
            found.add(event.usec)
    return found


def drop_storm(lab: PressureLab, hz: float, seconds: float, rate: float) -> dict:
    """Flood ``node`` with new flows under a lowered max; compare the events with dmesg."""
    inode = lab.inode(lab.node)
    state = tempfile.TemporaryDirectory(prefix=f"{lab.tag}-state-")
    globals_ = GlobalSysctls(f"bench-{lab.tag}", directory=Path(state.name))
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        while not stop.is_set():
            lab.send(500, port=5000, rate=rate)
            sent[0] += 500

    mono0 = time.monotonic()
    with Monitor(lab.hosts(), hz=hz) as mon:
        globals_.set({"net.netfilter.nf_conntrack_max": 300}, wait=300)
        try:
            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            time.sleep(seconds)
            stop.set()
            sender.join()
        finally:
            globals_.restore()
            state.cleanup()
        time.sleep(0.5)
    mono1 = time.monotonic()
    kmsg = {ev.usec for _, _, ev in mon.new_events() if ev.kind == TABLE_FULL and ev.netns_inode == inode}
    reference = dmesg_usecs(inode, int(mono0 * 1e6), int(mono1 * 1e6))
    samples, events = mon.samples, mon.events
    drops = samples[(samples.netns == "node") & (samples.metric == "stat_drop")]["value"]
    suppressed = events[events.kind == "suppressed"]["message"].str.extract(r"(\d+)")[0].astype(int).sum()
    return {"seconds": seconds, "sent": sent[0], "drops_counted": int(drops.max() - drops.min()),
            "dmesg_lines": len(reference), "events_recorded": len(kmsg),
            "missing": len(reference - kmsg), "extra": len(kmsg - reference),
            "events_for_node_in_table": int(((events.kind == TABLE_FULL) & (events.netns == "node")).sum()),
            "suppressed_reported": int(suppressed), "lost_records": mon.lost_kernel_records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--storm", type=float, default=12.0, help="seconds of drop storm (0: skip)")
    parser.add_argument("--rate", type=float, default=5000.0, help="new flows per second in the storm")
    parser.add_argument("--skip-agent", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("monitor_bench: needs root", file=sys.stderr)
        return 2
    lab = PressureLab(f"lkb{os.getpid() % 100000}", extra=3)
    try:
        print(f"machine: {os.cpu_count()} CPUs, kernel {os.uname().release}")
        for agent in ([False] if args.skip_agent else [False, True]):
            r = measure_cost(lab, args.hz, args.duration, agent)
            print(f"cost {r['mode']:>10}: {args.hz:g} Hz x 5 namespaces x {r['wall_s']:.1f} s: "
                  f"{r['cpu_s']:.3f} CPU-s (this process {r['cpu_self_s']:.3f}, agent process "
                  f"{r['cpu_agent_s']:.3f}) = {100 * r['share_of_core']:.2f}% of one core; "
                  f"{r['ticks_per_ns_min']}/{r['ticks_expected']} ticks per namespace; "
                  f"{r['rows']} rows, table built in {r['frame_build_s']:.2f} CPU-s")
        if args.storm > 0:
            s = drop_storm(lab, args.hz, args.storm, args.rate)
            print(f"storm: {s['seconds']:g} s, {s['sent']} new flows, {s['drops_counted']} drops counted "
                  f"by the kernel; dmesg shows {s['dmesg_lines']} table-full lines for the namespace, "
                  f"the monitor recorded {s['events_recorded']} ({s['events_for_node_in_table']} in the "
                  f"events table as 'node'): missing {s['missing']}, extra {s['extra']}, records lost "
                  f"{s['lost_records']}; the rate limiter reported {s['suppressed_reported']} suppressed")
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
