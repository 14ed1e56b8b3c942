"""Watch the netns testbed under real pressure, check the monitor against conntrack(8), draw it.

    python examples/monitor_must_show.py [--iteration 4] [--profile lab] [--load-s 20] [--out DIR]

Brings the netns testbed up for the iteration (the lab profile's global max is
small), starts the monitor on init, node and the pods, drives real TFTP
transfers through the NodePort with labkit's load generator, and every two
seconds reads ``conntrack -C``, ``conntrack -S`` and ``conntrack -L expect`` in
the node, noting the time before and after each command.  Then it brings the
testbed down (restoring the global sysctls), writes ``samples.csv``,
``events.csv``, ``reference.csv`` and ``conntrack.png``, and prints how the
monitor's figures agree with the reference ones: each reference value must lie
between the monitor's samples taken just before and just after it.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from pathlib import Path

import pandas as pd

from labkit.charts import conntrack_chart
from labkit.monitor import Monitor, parse_conntrack_S
from labkit.scenario import load_scenario
from labkit.testbed import get_testbed

S_TO_METRIC = {"drop": "stat_drop", "early_drop": "stat_early_drop", "insert_failed": "stat_insert_failed",
               "found": "stat_found", "invalid": "stat_invalid"}


def reference_reading(node) -> dict:
    """conntrack -C, -S and -L expect in the node, with the times around them."""
    before = time.time()
    count = int(node.run(["conntrack", "-C"]).stdout)
    stats = parse_conntrack_S(node.run(["conntrack", "-S"]).stdout)
    listed = node.run(["conntrack", "-L", "expect"], check=False)
    after = time.time()
    shown = re.search(r"(\d+) expectations have been shown", listed.stderr + listed.stdout)
    row = {"before": before, "after": after, "nf_conntrack_count": count,
           "expect_count": int(shown.group(1)) if shown else None}
    row.update({metric: stats[name] for name, metric in S_TO_METRIC.items()})
    return row


def agreement(samples: pd.DataFrame, reference: pd.DataFrame, hz: float) -> pd.DataFrame:
    """For each reference value: the monitor's range around it, and whether it lies inside."""
    node = samples[samples["netns"] == "node"]
    node = node.assign(t=node["time"].astype("int64") / 1e9)
    rows = []
    for _, ref in reference.iterrows():
        # the monitor sample just before the command started, and just after it ended
        for metric in ["nf_conntrack_count", "expect_count", *S_TO_METRIC.values()]:
            if pd.isna(ref[metric]):
                continue
            series = node[node["metric"] == metric].sort_values("t")
            before = series[series["t"] <= ref["before"]].tail(1)
            after = series[series["t"] >= ref["after"]].head(1)
            window = pd.concat([before, after, series[(series["t"] > ref["before"]) & (series["t"] < ref["after"])]])
            low, high = window["value"].min(), window["value"].max()
            rows.append({"time": pd.to_datetime(ref["before"], unit="s", utc=True), "metric": metric,
                         "reference": int(ref[metric]), "monitor_low": low, "monitor_high": high,
                         "inside": bool(low <= ref[metric] <= high)})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, default=4)
    parser.add_argument("--profile", default="lab")
    parser.add_argument("--load-s", type=float, default=20.0)
    parser.add_argument("--cooldown-s", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--out", default="results/monitor-must-show")
    args = parser.parse_args()
    from labkit.loadgen import LoadSpec, run_load_on

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iteration = load_scenario().iteration(args.iteration, args.profile)
    testbed = get_testbed("netns", global_wait=300)
    references, load_result = [], {}
    try:
        testbed.up(iteration)
        roles = testbed.netns_roles()
        node = testbed.host("node")
        node_ip, node_port = testbed.service
        spec = LoadSpec(node_ip, node_port, testbed.file.name, expected_size=testbed.file.size,
                        concurrency=args.concurrency, duration=args.load_s)
        with Monitor(testbed.monitor_targets(), hz=args.hz, netns_roles=roles) as mon:
            time.sleep(1.0)
            loader = threading.Thread(
                target=lambda: load_result.update(r=run_load_on(testbed.host("client"), spec)))
            loader.start()
            while loader.is_alive():
                references.append(reference_reading(node))
                loader.join(2.0)
            end = time.monotonic() + args.cooldown_s
            while time.monotonic() < end:
                references.append(reference_reading(node))
                time.sleep(2.0)
    finally:
        testbed.down()
    samples, events = mon.samples, mon.events
    mon.write(out)
    reference = pd.DataFrame(references)
    reference.to_csv(out / "reference.csv", index=False)
    check = agreement(samples, reference, args.hz)
    check.to_csv(out / "agreement.csv", index=False)
    conntrack_chart(samples, events, out=out / "conntrack.png",
                    title=f"netns testbed, iteration {iteration.number} ({iteration.profile} profile): "
                    f"{iteration.title}")

    summary = load_result["r"].summary if "r" in load_result else {}
    node_rows = samples[samples["netns"] == "node"]
    peak = node_rows[node_rows["metric"] == "nf_conntrack_count"]["value"].max()
    cmax = node_rows[node_rows["metric"] == "nf_conntrack_max"]["value"].min()
    print(f"load: {summary.get('ok')} ok, {summary.get('failed')} failed, "
          f"{summary.get('transfers_per_s')} transfers/s")
    print(f"node: peak count {peak} against max {cmax}; expectations peak "
          f"{node_rows[node_rows['metric'] == 'expect_count']['value'].max()}")
    for role, group in samples[samples["metric"].isin(["stat_drop", "stat_early_drop"])].groupby(["netns", "metric"]):
        print(f"{role[0]:>6} {role[1]:<16} +{group['value'].max() - group['value'].min()}")
    print("events:", events.groupby(["netns", "kind"]).size().to_dict())
    print(f"agreement with conntrack -C/-S/-L expect: {check['inside'].sum()}/{len(check)} reference "
          f"values inside the monitor's range around them")
    print("by metric:", check.groupby("metric")["inside"].agg(["sum", "count"]).to_dict("index"))
    print(f"wrote {out}/samples.csv events.csv reference.csv agreement.csv conntrack.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
