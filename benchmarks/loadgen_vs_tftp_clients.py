#!/usr/bin/env python3
"""Benchmark: labkit's loadgen against tftp-hpa and atftp client loops, side by side.

One set-up (labkit.loadgen.pair.TftpPair): in.tftpd serves a 5,000-byte file
in one namespace, the clients run in another, one veth between them, no NAT.
Each round runs, one after the other for the same time:

- ``labkit loadgen`` (closed loop): 1 worker checking sizes, 1 worker checking
  sizes and SHA-256, and ``--workers 2``;
- ``tftp`` (tftp-hpa) in parallel shell loops;
- ``atftp`` in parallel shell loops.

For each it prints completed transfers, transfers/s end to end, and
transfers per client CPU-second (user+sys).  The loadgen's CPU is given twice:
its engine (the thread that runs the load, from the result) and its whole
process including interpreter start (waited-for children's rusage).  The
client loops' CPU includes the shells that start each client.  Completed
transfers of every client are also counted on the server side by an iptables
counter of the last DATA packet of each transfer; the loadgen's ``ok`` is
checked against it (within 1 %).  The tftp loops are counted by that counter
(tftp-hpa exits 0 even on an error).

Optionally (``--nodeport``) the load goes through the netns testbed's NodePort
with the tuned sysctls of iteration 8 (needs labkit.testbed; profile ``article`` by
default: no CPU limit on the pod).

Run as root:  .venv/bin/python benchmarks/loadgen_vs_tftp_clients.py [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from labkit.exceptions import LabkitError  # noqa: E402
from labkit.host import LocalHost  # noqa: E402
from labkit.loadgen import LoadSpec, run_load_on  # noqa: E402
from labkit.loadgen.pair import TftpPair  # noqa: E402

LOOP = r"""
end=$(( ${EPOCHREALTIME/./} + %(us)d ))
while (( ${EPOCHREALTIME/./} < end )); do
    %(cmd)s >/dev/null 2>&1
done
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_loadgen(pair: TftpPair, seconds: float, concurrency: int, workers: int,
                sha256: bool = False) -> dict:
    spec = LoadSpec(pair.host, pair.port, pair.filename, expected_size=pair.size,
                    sha256=pair.sha256 if sha256 else None, concurrency=concurrency,
                    duration=seconds, workers=workers)
    server0, cpu0 = pair.last_data_count(), _children_cpu()
    result = run_load_on(pair.client, spec)
    cpu = _children_cpu() - cpu0
    s = result.summary
    server = pair.last_data_count() - server0
    engine_cpu = s["cpu_user_s"] + s["cpu_sys_s"]
    return {"ok": s["ok"], "failed": s["failed"], "server": server, "per_s": s["transfers_per_s"],
            "per_cpu_s": s["ok"] / engine_cpu, "per_process_cpu_s": s["ok"] / cpu,
            "sys_share": s["cpu_sys_s"] / engine_cpu}


def run_loops(pair: TftpPair, seconds: float, loops: int, cmd: str) -> dict:
    server0, cpu0 = pair.last_data_count(), _children_cpu()
    start = time.monotonic()
    script = LOOP % {"us": int(seconds * 1e6), "cmd": cmd}
    procs = [subprocess.Popen(["ip", "netns", "exec", pair.client_ns, "bash", "-c", script])
             for _ in range(loops)]
    for p in procs:
        p.wait()
    wall = time.monotonic() - start
    cpu = _children_cpu() - cpu0
    server = pair.last_data_count() - server0
    return {"ok": server, "server": server, "per_s": server / wall, "per_cpu_s": server / cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--loops", type=int, default=4, help="parallel shell loops per tftp client")
    ap.add_argument("--nodeport", action="store_true",
                    help="also load the netns testbed's NodePort (iteration 8, tuned)")
    ap.add_argument("--nodeport-globals", action="store_true",
                    help="let the NodePort iteration set the global conntrack table sizes too "
                         "(needs the machine-wide claim: no other lab run up)")
    ap.add_argument("--nodeport-profile", default="article",
                    help="scenario profile for the NodePort run (default article: no pod CPU limit)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    rows: dict[str, list[dict]] = {}
    with TftpPair(f"lkb{os.getpid() % 100000}") as pair:
        host, f = pair.host, pair.filename
        methods = {
            "loadgen": lambda: run_loadgen(pair, args.seconds, args.concurrency, 1),
            "loadgen --sha256": lambda: run_loadgen(pair, args.seconds, args.concurrency, 1,
                                                    sha256=True),
            "loadgen --workers 2": lambda: run_loadgen(pair, args.seconds, args.concurrency, 2),
            "tftp-hpa loops": lambda: run_loops(pair, args.seconds, args.loops,
                                                f"tftp -m binary {host} -c get {f} /dev/null"),
            "atftp loops": lambda: run_loops(pair, args.seconds, args.loops,
                                             f"atftp -g -r {f} -l /dev/null {host}"),
        }
        for r in range(args.rounds):
            for name, fn in methods.items():
                row = fn()
                rows.setdefault(name, []).append(row)
                print(f"round {r + 1} {name:20s} " + "  ".join(
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                    flush=True)
    print(f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each, 5,000-byte file, "
          f"loadgen concurrency {args.concurrency}, {args.loops} loops per tftp client:")
    print(f"{'client':22s} {'transfers/s':>12s} {'per CPU-s':>10s} {'per process CPU-s':>18s} "
          f"{'ok vs server':>13s}")
    base = statistics.median(r["per_cpu_s"] for r in rows["tftp-hpa loops"])
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        proc = f"{med['per_process_cpu_s']:18.0f}" if "per_process_cpu_s" in med else f"{'':18s}"
        agree = max(abs(r["ok"] - r["server"]) / max(r["server"], 1) for r in runs)
        print(f"{name:22s} {med['per_s']:12.0f} {med['per_cpu_s']:10.0f} {proc} "
              f"{agree * 100:12.2f}%  ({med['per_cpu_s'] / base:.1f}x tftp-hpa per CPU-s)")
    if args.nodeport:
        nodeport(args)
    return 0


def nodeport(args) -> None:
    """End-to-end transfers/s through the netns testbed's NodePort, tuned sysctls."""
    try:
        from labkit.scenario import load_scenario
        from labkit.testbed import get_testbed
    except ImportError as exc:
        print(f"\nNodePort: skipped, the netns testbed is not available here ({exc})")
        return
    iteration = load_scenario().iteration(8, profile=args.nodeport_profile)
    local = LocalHost()
    current = {name: local.read_sysctl(name) for name in iteration.global_sysctls}
    if not args.nodeport_globals:
        # leave the machine-wide tables as they are (another lab run may hold them):
        # the node and pods still get the tuned, namespaced UDP timeouts
        iteration = dataclasses.replace(iteration, node_sysctls=iteration.namespaced_node_sysctls)
    # a state directory of our own: never attach to (and tear down) someone else's run
    state = tempfile.mkdtemp(prefix="labkit-bench-state-")
    testbed = get_testbed("netns", state_dir=state)
    try:
        try:
            testbed.up(iteration)
        except LabkitError as exc:
            print(f"\nNodePort: skipped, the testbed could not come up: {exc}")
            return
        node_ip, node_port = testbed.service
        f = testbed.file
        rates, per_cpu = [], []
        for _ in range(args.rounds):
            spec = LoadSpec(node_ip, node_port, f.name, expected_size=f.size,
                            concurrency=args.concurrency, duration=args.seconds)
            s = run_load_on(testbed.host("client"), spec).summary
            rates.append(s["transfers_per_s"])
            per_cpu.append(s["ok_per_cpu_s"])
        tables = ("set by the iteration" if args.nodeport_globals else
                  "left as they were: " + ", ".join(f"{k.rsplit('.', 1)[1]}={v}"
                                                    for k, v in current.items()))
        print(f"\nNodePort (iteration 8, profile {args.nodeport_profile}, {iteration.replicas} pod(s), "
              f"pod CPU limit {iteration.cpu_limit}, node sysctls {iteration.node_sysctls}, "
              f"pod sysctls {dict(iteration.pod_sysctls)}, global tables {tables}; "
              f"loadgen concurrency "
              f"{args.concurrency}): median {statistics.median(rates):.0f} transfers/s of "
              f"{[round(r) for r in rates]}; loadgen {statistics.median(per_cpu):.0f} per CPU-s")
    finally:
        testbed.down()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
