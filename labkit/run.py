"""One iteration run end to end: testbed configured, monitor running, load, cool-down tail.

:func:`run_iteration` brings the testbed up for the iteration, starts the
monitor on the node, the pods and the machine's own namespace, runs the load
from the client namespace for the iteration's duration, keeps sampling for the
cool-down tail after the load stops (the article's "count stays up after the
test ends"), and writes the iteration's tidy data: ``samples.csv``,
``events.csv``, ``transfers.csv`` (one row per transfer), ``load.csv`` (per
second), ``load-summary.json`` and ``summary-row.json`` (its summary.csv row).

:func:`summarize` is the pure part: it turns those frames into the row.
Nothing here throttles, sleeps inside, or caps the load: the numbers are set
by the iteration's declared setup (sysctls, replicas, CPU limits) alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd

from labkit import background, capacity
from labkit.charts import seconds
from labkit.results import ROW_FILE, write_csv, write_json

log = logging.getLogger(__name__)

NODE = "node"
AFTER_STOP_S = 1.0  # "the seconds after the load stops": where I4 reads the count
MONITOR_HZ = 10.0
TRANSFER_TIMEOUT_S = 1.0  # per-packet timeout of the load (RFC 1350 clients use 1-5 s)
TRANSFER_RETRIES = 3
TRANSFER_DEADLINE_S = 6.0


def background_flows(testbed: Any, iteration: Any) -> int:
    """The iteration's background flows where they can run: on the machine whose kernel is the node.

    The flows must share the node's conntrack garbage collector, so they run on the
    testbed's :meth:`~labkit.testbed.base.Testbed.node_machine` (this machine or one
    reached over SSH).  The article profile, whose loads last ten minutes, needs none,
    and a lab profile on a cluster, whose node labkit does not drive, runs without them
    (logged).
    """
    flows = int(getattr(iteration, "background_flows", 0) or 0)
    if flows and testbed.node_machine() is None:
        log.warning("background flows run on a netns testbed's machine only; %s runs without them",
                    testbed.name)
        return 0
    return flows


@contextmanager
def flows_for(testbed: Any, iteration: Any, *, use: Any = None, on_wait: Callable[[str], None] | None = None,
              wait: bool = True) -> Iterator[dict | None]:
    """The iteration's background flows on the testbed's machine for the block (see :func:`background.ensure`).

    Args:
        use: flows the caller owns (a replay's, a notebook session's), used instead of new ones.

    Yields:
        Their marker (None: the iteration runs without).
    """
    count = background_flows(testbed, iteration)
    where = testbed.node_machine() if count else None
    if where is None:
        yield None
        return
    with background.ensure(count, host=where.host, directory=where.state_dir, python=where.python, use=use,
                           on_wait=on_wait, wait=wait) as info:
        yield info


def _lab_roles(names) -> list[str]:
    return [n for n in names if n == NODE or str(n).startswith("pod-")]


def _counter_delta(samples: pd.DataFrame, netns: str, metric: str) -> int:
    part = samples[(samples["netns"] == netns) & (samples["metric"] == metric)].sort_values("t")
    if part.empty:
        return 0
    # a counter never runs backwards; sum positive steps (robust to a namespace re-created)
    return int(part["value"].diff().clip(lower=0).fillna(0).sum())


def _value_at(samples: pd.DataFrame, netns: str, metric: str, t: float) -> float | None:
    part = samples[(samples["netns"] == netns) & (samples["metric"] == metric)]
    if part.empty:
        return None
    return float(part.iloc[(part["t"] - t).abs().argmin()]["value"])


def _median(samples: pd.DataFrame, netns: str, metric: str) -> float | None:
    part = samples[(samples["netns"] == netns) & (samples["metric"] == metric)]["value"]
    return float(part.median()) if not part.empty else None


def steady_rate(load: pd.DataFrame, duration_s: float) -> float | None:
    """Completed transfers per second over the second half of the load.

    The article's rates are averages over 10-minute tests, where the few
    seconds a table takes to fill do not count; a lab load lasts a minute, so
    its first half is taken as warm-up (the tables fill and turn over once) and
    the rate is the mean of the whole seconds of the second half.

    Args:
        load: the loadgen's per-second tidy series (``elapsed_s, metric, value``).
        duration_s: the load's planned duration.

    Returns:
        Transfers/s, or None when the series has no whole second in that half.
    """
    if load is None or load.empty:
        return None
    done = load[load["metric"] == "completed"]
    lo, hi = math.ceil(duration_s / 2.0), math.floor(duration_s)
    window = done[(done["elapsed_s"] >= lo) & (done["elapsed_s"] < hi)]
    return float(window["value"].mean()) if not window.empty else None


def summarize(iteration: Any, load_summary: Mapping[str, Any], samples: pd.DataFrame,
              events: pd.DataFrame, *, load_start: float, load_stop: float,
              load: pd.DataFrame | None = None, testbed: str = "netns",
              calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return an iteration's summary.csv row from its tidy data (pure).

    Args:
        iteration: the :class:`~labkit.scenario.Iteration` that ran.
        load_summary: the loadgen's summary (``ok``, ``failed``, ``by_reason``,
            ``transfers_per_s``, latency percentiles).
        samples: the monitor's samples ``(time, host, netns, metric, value)``.
        events: the monitor's events ``(time, host, netns, kind, message)``.
        load_start, load_stop: Unix times the load began and ended.
        load: the loadgen's per-second series; ``transfers_per_s`` is then the
            steady rate of :func:`steady_rate` (else the whole load's average).
        testbed: the testbed's name.
        calibration: the ``calibration`` block of the profile the iteration ran with,
            for the sizing model's columns (None: the committed profile of that name;
            a profile derived for this machine must be passed, as it shares the name).

    Returns:
        The row: DESIGN.md's columns plus labkit's (see :mod:`labkit.results`).
        Drops are counter deltas over the whole sampled window; ``peak_pod_count``
        is the highest count of any one pod (each is held against the global max);
        ``pod_*`` counters sum over the pods.
    """
    s = samples.copy()
    s["t"] = seconds(s["time"]) if not s.empty else pd.Series(dtype=float)
    roles = sorted(set(s["netns"])) if not s.empty else []
    pods = [r for r in _lab_roles(roles) if r != NODE]
    lab = set(_lab_roles(roles))
    ev = events[events["netns"].isin(lab)] if not events.empty else events

    def peak(netns: str, metric: str) -> int:
        part = s[(s["netns"] == netns) & (s["metric"] == metric)]["value"]
        return int(part.max()) if not part.empty else 0

    half = load_start + (load_stop - load_start) / 2.0

    def steady_mean(netns: str) -> float:
        """The mean count over the second half of the load (Little's law: rate x lifetime)."""
        part = s[(s["netns"] == netns) & (s["metric"] == "nf_conntrack_count")
                 & (s["t"] >= half) & (s["t"] <= load_stop)]["value"]
        return round(float(part.mean()), 1) if not part.empty else 0.0

    sampled_max = _median(s, NODE, "nf_conntrack_max") or _median(s, "init", "nf_conntrack_max")
    sampled_emax = _median(s, NODE, "nf_conntrack_expect_max") or _median(s, "init", "nf_conntrack_expect_max")
    node_sys = dict(iteration.node_sysctls)
    after_s = min(AFTER_STOP_S, float(iteration.cooldown_s))
    count_kind = lambda kind, where: int(((ev["kind"] == kind) & ev["netns"].isin(where)).sum()) \
        if not ev.empty else 0  # noqa: E731
    steady = steady_rate(load, float(iteration.duration_s)) if load is not None else None
    overall = float(load_summary["transfers_per_s"])
    row = {
        "iteration": iteration.number,
        "transfers_per_s": round(steady if steady is not None else overall, 2),
        "transfers_ok": int(load_summary["ok"]),
        "transfers_failed": int(load_summary["failed"]),
        "replicas": iteration.replicas if iteration.setup == "nodeport" else 0,
        "conntrack_max": int(node_sys.get("net.netfilter.nf_conntrack_max") or sampled_max or 0),
        "expect_max": int(node_sys.get("net.netfilter.nf_conntrack_expect_max") or sampled_emax or 0),
        "node_udp_timeout": _median(s, NODE, "udp_timeout"),
        "pod_udp_timeout": _median(s, pods[0], "udp_timeout") if pods else None,
        "peak_node_count": peak(NODE, "nf_conntrack_count"),
        "peak_pod_count": max((peak(p, "nf_conntrack_count") for p in pods), default=0),
        "peak_expect_count": peak(NODE, "expect_count"),
        "node_drops": _counter_delta(s, NODE, "stat_drop"),
        "node_early_drops": _counter_delta(s, NODE, "stat_early_drop"),
        "pod_drops": sum(_counter_delta(s, p, "stat_drop") for p in pods),
        "pod_early_drops": sum(_counter_delta(s, p, "stat_early_drop") for p in pods),
        "table_full_logs": count_kind("table_full", lab),
        "expect_full_logs": count_kind("expect_table_full", lab),
        "article_transfers_per_s": iteration.article_tps,
        "title": iteration.title,
        "setup": iteration.setup,
        "profile": iteration.profile,
        "testbed": testbed,
        "duration_s": round(load_stop - load_start, 2),
        "cooldown_s": iteration.cooldown_s,
        "concurrency": iteration.concurrency,
        "file_size": iteration.file_size,
        "cpu_limit": iteration.cpu_limit,
        "pods_track_conntrack": iteration.pods_track_conntrack,
        "node_notrack": getattr(iteration, "node_notrack", False),
        "proxy_mode": getattr(iteration, "proxy_mode", "iptables"),
        "node_udp_timeout_stream": _median(s, NODE, "udp_timeout_stream"),
        "pod_udp_timeout_stream": _median(s, pods[0], "udp_timeout_stream") if pods else None,
        "node_table_full_logs": count_kind("table_full", {NODE}),
        "pod_table_full_logs": count_kind("table_full", set(pods)),
        "node_expect_full_logs": count_kind("expect_table_full", {NODE}),
        "node_insert_failed": _counter_delta(s, NODE, "stat_insert_failed"),
        "pod_insert_failed": sum(_counter_delta(s, p, "stat_insert_failed") for p in pods),
        "mean_node_count": steady_mean(NODE),
        "mean_pod_count": max((steady_mean(p) for p in pods), default=0.0),
        "node_count_at_stop": _value_at(s, NODE, "nf_conntrack_count", load_stop),
        "node_count_after_stop": _value_at(s, NODE, "nf_conntrack_count", load_stop + after_s),
        "after_stop_s": after_s,
        "transfers_per_s_whole_load": round(overall, 2),
        "steady_from_s": math.ceil(float(iteration.duration_s) / 2.0) if steady is not None else 0,
        "failed_by_reason": json.dumps(load_summary.get("by_reason", {}), sort_keys=True),
        "latency_p50_ms": load_summary.get("latency_p50_ms"),
        "latency_p99_ms": load_summary.get("latency_p99_ms"),
        "status": "ok",
    }
    row.update(capacity.slab_columns(s, load_start, load_stop))
    row.update(capacity.predict_row(row, calibration))  # the sizing model beside the measurement
    return row


def nodeport_entries_on_node(testbed) -> int:
    """Entries in the node's table for the NodePort (original destination port), listed now.

    Iteration 11 (NOTRACK on the node) lists them when its load stops: a tracked request
    would still be there (its 30 s timeout), and the node's whole count may hold the
    node's own traffic (an IGMP report of the pods' bridge: one entry of protocol 2).
    Only there: a listing reaps the expired entries it walks past, which would change
    what the other iterations measure after their load.

    Raises:
        CommandFailed: ``conntrack`` failed.
    """
    _, port = testbed.service
    out = testbed.host("node").run(["conntrack", "-L", "-p", "udp", "--orig-port-dst", str(port)]).stdout
    return sum(1 for line in out.splitlines() if line.startswith("udp"))


def load_spec(testbed, iteration):
    """The load of an iteration: closed loop at the profile's concurrency for its duration."""
    from labkit.loadgen import LoadSpec

    node_ip, node_port = testbed.service
    served = testbed.file
    return LoadSpec(node_ip, node_port, served.name, expected_size=served.size, sha256=served.sha256,
                    concurrency=iteration.concurrency, duration=float(iteration.duration_s),
                    timeout=TRANSFER_TIMEOUT_S, retries=TRANSFER_RETRIES, deadline=TRANSFER_DEADLINE_S)


def run_iteration(testbed, iteration, out_dir: str | os.PathLike, *, hz: float = MONITOR_HZ,
                  compress: bool = False, on_step: Callable[[str], None] | None = None,
                  wait_warm: bool | None = None, live: Any = None,
                  calibration: Mapping[str, Any] | None = None, flows: Any = None) -> dict[str, Any]:
    """Run one iteration end to end and write its tidy data into ``out_dir``.

    Args:
        testbed: a :class:`~labkit.testbed.base.Testbed` (up or down; it is brought
            up, or reconfigured, for ``iteration``).  It is left up: the caller
            (the notebook's last cell, the replay driver) brings it down.
        iteration: the :class:`~labkit.scenario.Iteration`.
        out_dir: the iteration's folder.
        hz: monitor samples per second and namespace.
        compress: write the CSV tables gzip-compressed (``*.csv.gz``).
        on_step: receives a line as each step starts (for a progress display).
        wait_warm: wait until the background flows have the garbage collector on their
            cycle before the load; default: unless the iteration is the plain server,
            where no conntrack table is in play (its flows run all the same, so that
            their CPU is spent in every iteration alike).
        live: a live view of the load (:class:`labkit.live.LiveChart`): its
            ``start(monitor)`` is called once the monitor samples, ``progress(totals)``
            about once a second with the load's running totals, ``stop()`` when
            sampling ends.
        calibration: the profile's ``calibration`` block for the model's columns
            (see :func:`summarize`).
        flows: background flows the caller keeps (a replay's, a notebook session's; their
            folder, marker or :class:`~labkit.background.BackgroundFlows`); None starts the
            iteration's own on the testbed's machine for the run.  Flows of another run are
            never used.

    Returns:
        The summary.csv row (also written to ``summary-row.json``).

    Raises:
        TestbedError, MonitorError, LoadgenError, CommandFailed: a part failed.
    """
    from labkit.loadguard import run_load as run_guarded_load
    from labkit.monitor import Monitor

    step = on_step or (lambda line: log.info("%s", line))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step(f"iteration {iteration.number}: testbed up ({iteration.setup}, {iteration.replicas} replica(s))")
    testbed.up(iteration)
    spec = load_spec(testbed, iteration)
    warm = iteration.setup != "plain" if wait_warm is None else wait_warm
    with flows_for(testbed, iteration, use=flows, on_wait=step, wait=warm) as in_use:
        monitor = Monitor(testbed.monitor_targets(), hz=hz, netns_roles=testbed.netns_roles())
        monitor.start()
        try:
            if live is not None:
                live.start(monitor)
            # the flows' failure ends the load at once: the cycle would no longer be the declared one
            with background.watch(in_use, host=testbed.node_machine().host if in_use else None):
                step(f"iteration {iteration.number}: load for {iteration.duration_s:g} s at concurrency "
                     f"{iteration.concurrency}")
                # `down` refuses meanwhile; `clean` can end it
                result = run_guarded_load(testbed, spec,
                                          progress=live.progress if live is not None else None)
                load_start = float(result.summary["started_at"])
                load_stop = load_start + float(result.summary["duration_s"])
                nodeport_entries = (nodeport_entries_on_node(testbed) if getattr(iteration, "node_notrack", False)
                                    else None)
                step(f"iteration {iteration.number}: cool-down tail, {iteration.cooldown_s:g} s sampled")
                # The tail is observation only: the load has ended; the monitor keeps sampling.
                time.sleep(max(0.0, load_stop + float(iteration.cooldown_s) - time.time()))
        finally:
            try:
                monitor.stop()
            finally:
                if live is not None:
                    live.stop()
    samples, events = monitor.samples, monitor.events
    row = summarize(iteration, result.summary, samples, events, load_start=load_start,
                    load_stop=load_stop, load=result.timeseries, testbed=testbed.name,
                    calibration=calibration)
    row["background_flows"] = int(in_use["flows"]) if in_use else 0
    row["node_nodeport_entries"] = nodeport_entries
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    for name, frame in (("samples", samples), ("events", events)):
        frame = frame.copy()
        if not frame.empty:
            frame["time"] = frame["time"].dt.strftime(fmt)
        write_csv(frame, out / f"{name}.csv", compress=compress)
    if result.transfers is not None:
        write_csv(result.transfers, out / "transfers.csv", compress=compress)
    write_csv(result.timeseries, out / "load.csv", compress=compress)
    write_json({"summary": result.summary, "spec": result.spec, "workers": result.workers,
                "iteration": iteration.to_dict(), "load_start": load_start, "load_stop": load_stop,
                "testbed": testbed.status(),
                "lost_kernel_records": monitor.lost_kernel_records},
               out / "load-summary.json")
    write_json(row, out / ROW_FILE)
    return row
