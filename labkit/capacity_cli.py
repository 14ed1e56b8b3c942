"""``labkit size``: the conntrack sizing model on the command line (printing only; the model is
:mod:`labkit.capacity`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from labkit import capacity
from labkit.capacity import Lifetime, Tables
from labkit.exceptions import SizingError

SLABINFO = Path("/proc/slabinfo")


def _number(*, positive: bool = True, integer: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite number, > 0 (or >= 0), optionally whole."""
    def convert(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if integer else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if positive else '>= 0'}, got {text!r}")
        return value
    return convert


def _lifetimes(text: str) -> tuple[tuple[float, float], ...]:
    points = []
    for part in text.split(","):
        try:
            t, life = (float(x) for x in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be TIMEOUT:ENTRY_SECONDS[,...], got {part!r}") from None
        if t <= 0 or life <= 0:
            raise argparse.ArgumentTypeError(f"timeouts and entry-seconds must be > 0, got {part!r}")
        points.append((t, life))
    if len(points) < 2:
        raise argparse.ArgumentTypeError("give at least two TIMEOUT:ENTRY_SECONDS points")
    return tuple(points)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``labkit size`` and ``labkit model-check``."""
    m = sub.add_parser(
        "model-check", help="the sizing model against what one or more replays measured",
        description="For each run folder (results/<run-id>), the model's prediction beside the measurement "
                    "per iteration (summary.csv), whether it held (fills calls right, steady counts and "
                    "memory within the tolerance) and the findings past the article (F8-F10). Exit 0 when "
                    "every claim holds in every run, 1 otherwise.")
    m.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a replay's run folder")
    m.add_argument("--tolerance", type=_number(), default=capacity.MODEL_TOLERANCE,
                   help="how far steady counts and memory may be from the measurement (0.25)")
    m.add_argument("--recompute", action="store_true",
                   help="predict each row again with this labkit's model and the calibration of the "
                        "profile the run used (its profile-*.yaml), instead of the columns it wrote")
    m.set_defaults(func=cmd_model_check)
    p = sub.add_parser(
        "size", help="predict the conntrack tables at a rate; recommend sizes; kube-proxy's figure",
        description="Predict each namespace's conntrack count, the expectations and the memory at a "
                    "rate of new transfers (or flows) per second; recommend nf_conntrack_max, the hash "
                    "size, expect_max and UDP timeouts with a headroom; show what kube-proxy would set. "
                    "The model and its sources: docs/capacity.md.")
    num, whole = _number(), _number(integer=True)
    p.add_argument("--rate", type=num, required=True, help="new transfers (or flows) per second")
    p.add_argument("--node-udp-timeout", type=num, default=30.0, help="the node's nf_conntrack_udp_timeout (30)")
    p.add_argument("--pod-udp-timeout", type=num, default=30.0,
                   help="each pod's nf_conntrack_udp_timeout (30, the kernel's default a pod keeps)")
    p.add_argument("--node-udp-timeout-stream", type=num, help="with --stream-entries: the node's stream timeout")
    p.add_argument("--pod-udp-timeout-stream", type=num, help="with --stream-entries: the pods' stream timeout")
    p.add_argument("--pods-untracked", action="store_true",
                   help="the pods' namespaces track nothing (no rule there needs conntrack)")
    p.add_argument("--pods", type=whole, default=1, help="pods behind the service on this node (1)")
    p.add_argument("--headroom", type=_number(positive=False), default=capacity.DEFAULT_HEADROOM,
                   help="room over the predicted count, 0.5 = 50%% (0.5)")
    p.add_argument("--cores", type=whole, default=os.cpu_count() or 1,
                   help="the node's CPUs, for kube-proxy's figure (this machine's)")
    p.add_argument("--max", type=whole, help="nf_conntrack_max to check (default: what kube-proxy sets)")
    p.add_argument("--expect-max", type=whole, help="nf_conntrack_expect_max to check (default: the kernel's)")
    p.add_argument("--buckets", type=whole, help="conntrack hash size (default: = the max)")
    p.add_argument("--cap", type=whole, help="the largest max you allow: the timeouts are shortened to fit")
    p.add_argument("--min-udp-timeout", type=num, default=float(capacity.MIN_UDP_TIMEOUT),
                   help="the shortest UDP timeout a recommendation may use (5 s: TFTP's retransmit gap)")
    p.add_argument("--node-entries", type=num, default=capacity.NODE_ENTRIES, help="entries per transfer in the node (2)")
    p.add_argument("--pod-entries", type=num, default=capacity.POD_ENTRIES, help="entries per transfer in a pod (2)")
    p.add_argument("--stream-entries", type=_number(positive=False), default=0.0,
                   help="entries per transfer that live the stream timeout (0 on 6.x; 1 on the article's 3.10)")
    p.add_argument("--reap-lag", type=_number(positive=False), default=capacity.REAP_LAG_S,
                   help="seconds an expired entry stays counted until reaped (1)")
    p.add_argument("--lifetimes", type=_lifetimes,
                   help="measured entry-seconds per transfer in the node, e.g. 30:57.7,10:20.6,3:7.3 "
                        "(replaces the formula)")
    p.add_argument("--profile", help="take the measured lifetimes from this profile's calibration (e.g. lab)")
    p.add_argument("--expect-wait-ms", type=_number(positive=False), default=capacity.EXPECT_WAIT_S * 1000,
                   help="ms an expectation waits for the server's first reply (10)")
    p.add_argument("--slabinfo", type=Path, help="a /proc/slabinfo capture for the entry size "
                                                  "(default: this machine's, where readable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_size)


def _slab(path: Path | None) -> tuple[dict, str]:
    source = path or SLABINFO
    try:
        text = source.read_text()
    except OSError as exc:
        if path is not None:
            raise SizingError(f"cannot read {path}: {exc.strerror}", field="slabinfo") from None
        return {}, f"{capacity.ENTRY_BYTES:.0f} B (Linux 6.18's; {SLABINFO} not readable)"
    caches = capacity.parse_slabinfo(text, source=str(source))
    if "nf_conntrack" not in caches:
        return caches, f"{capacity.ENTRY_BYTES:.0f} B (Linux 6.18's; no nf_conntrack cache in {source})"
    return caches, f"{capacity.entry_bytes(caches):.0f} B (nf_conntrack slab in {source})"


def _lifetime(args) -> tuple[Lifetime, str]:
    kwargs = dict(entries=args.node_entries, reap_lag_s=args.reap_lag, stream_entries=args.stream_entries)
    if args.lifetimes:
        return Lifetime(measured=args.lifetimes, **kwargs), "measured (--lifetimes)"
    if args.profile:
        from labkit.scenario import load_scenario

        prof = load_scenario().profiles.get(args.profile)
        if prof is None:
            raise SizingError(f"no profile {args.profile!r}", field="profile")
        life = capacity.lifetime_from_profile((prof.extra or {}).get("calibration"), **kwargs)
        if len(life.measured) < 2:
            raise SizingError(f"profile {args.profile!r} has no measured lifetimes (labkit calibrate)",
                              field="profile")
        return life, f"measured by profile {args.profile}'s calibration"
    return Lifetime(**kwargs), (f"{args.node_entries:g} entries x (timeout + {args.reap_lag:g} s reaping lag)"
                                + (f", {args.stream_entries:g} at the stream timeout" if args.stream_entries else ""))


def _lines(pred: capacity.Prediction, tables: Tables) -> list[str]:
    out = [f"  node: {pred.node_count:,.0f} entries ({pred.node_entry_s:.1f} entry-s per transfer)"
           f" of max {tables.conntrack_max:,}: {'FILLS' if pred.node_fills else 'fits'}"]
    if tables.pod_udp_timeout is None or tables.replicas == 0:
        out.append("  pods: track nothing")
    else:
        out.append(f"  each pod: {pred.pod_count:,.0f} entries ({pred.pod_entry_s:.1f} entry-s per transfer) "
                   f"of the same max: {'FILLS' if pred.pod_fills else 'fits'}")
    out.append(f"  expectations: {pred.expect_count:,.1f} of {tables.expect_max:,}: "
               f"{'FILLS' if pred.expect_fills else 'fits'}")
    if pred.served_per_s < pred.rate:
        out.append(f"  the tables let through about {pred.served_per_s:,.0f} transfers/s of {pred.rate:,.0f}")
    out.append(f"  memory: {capacity.memory_text(pred.memory_bytes)} "
               f"(entries {pred.entry_bytes:.0f} B each, hash {capacity.memory_text(pred.hash_bytes)})")
    return out


def cmd_size(args) -> int:
    """Print the prediction at the given tables, the recommendation and kube-proxy's figure."""
    slab, slab_note = _slab(args.slabinfo)
    life, life_note = _lifetime(args)
    kp_max = capacity.kube_proxy_max(args.cores)
    current_max = args.max or kp_max
    buckets = capacity.kernel_buckets(args.buckets or current_max)
    pod_timeout = None if args.pods_untracked else args.pod_udp_timeout
    tables = Tables(current_max, args.expect_max or capacity.kernel_expect_max(buckets), args.node_udp_timeout,
                    pod_timeout, args.pods, args.node_udp_timeout_stream, args.pod_udp_timeout_stream, buckets)
    common = dict(pod_entries=0.0 if args.pods_untracked else args.pod_entries,
                  expect_wait_s=args.expect_wait_ms / 1000.0, slab=slab)
    now = capacity.predict(args.rate, tables, life, **common)
    try:
        rec = capacity.recommend(args.rate, tables, life, headroom=args.headroom, cap=args.cap,
                                 min_udp_timeout=args.min_udp_timeout, **common)
    except SizingError as exc:
        if exc.field != "max":
            raise
        rec, rec_error = None, str(exc)
    kp_tables = Tables(kp_max, capacity.kernel_expect_max(capacity.kernel_buckets(kp_max)), args.node_udp_timeout,
                       pod_timeout, args.pods, buckets=capacity.kube_proxy_buckets(kp_max, buckets))
    kp = capacity.predict(args.rate, kp_tables, life, **common)
    if args.json:
        doc = {"inputs": {k: v for k, v in vars(args).items() if k != "func" and not callable(v)},
               "entry_bytes_source": slab_note, "lifetime": life_note, "prediction": now.as_dict(),
               "recommendation": None if rec is None else {
                   "conntrack_max": rec.conntrack_max, "buckets": rec.buckets, "expect_max": rec.expect_max,
                   "node_udp_timeout": rec.node_udp_timeout, "pod_udp_timeout": rec.pod_udp_timeout,
                   "prediction": rec.prediction.as_dict(), "why": rec.why},
               "kube_proxy": {"cores": args.cores, "conntrack_max": kp_max, "buckets": kp_tables.buckets,
                              "prediction": kp.as_dict()}}
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(f"At {args.rate:,.0f} transfers/s, {args.pods} pod(s), UDP timeouts node {args.node_udp_timeout:g} s, "
          f"pods {'-' if pod_timeout is None else f'{pod_timeout:g} s'}; lifetime: {life_note}; "
          f"entry size {slab_note}")
    print(f"\nWith max {tables.conntrack_max:,}{' (kube-proxy sets it)' if not args.max else ''}, "
          f"expect_max {tables.expect_max:,}, {tables.buckets:,} buckets:")
    print("\n".join(_lines(now, tables)))
    if rec is None:
        print(f"\nRecommended: nothing fits: {rec_error}")
    else:
        print(f"\nRecommended for {args.rate:,.0f}/s with {args.headroom:.0%} headroom:")
        print(f"  net.netfilter.nf_conntrack_max = {rec.conntrack_max}")
        print(f"  nf_conntrack hashsize (module parameter) = {rec.buckets}")
        print(f"  net.netfilter.nf_conntrack_expect_max = {rec.expect_max}")
        print(f"  net.netfilter.nf_conntrack_udp_timeout = {rec.node_udp_timeout:g} on the node"
              + ("" if rec.pod_udp_timeout is None else f", {rec.pod_udp_timeout:g} in each pod"))
        if args.stream_entries:
            print(f"  net.netfilter.nf_conntrack_udp_timeout_stream = {rec.node_udp_timeout:g} (as short: "
                  f"{args.stream_entries:g} entry per transfer lives it)")
        for line in rec.why:
            print(f"    - {line}")
        final = Tables(rec.conntrack_max, rec.expect_max, rec.node_udp_timeout, rec.pod_udp_timeout,
                       args.pods, buckets=rec.buckets)
        print("\n".join(_lines(rec.prediction, final)))
    print(f"\nkube-proxy on {args.cores} core(s) sets nf_conntrack_max = max(32768 x {args.cores}, 131072) = "
          f"{kp_max:,} (raising the hash size to max/4 where it is smaller: {kp_tables.buckets:,} here), in the "
          "node's namespace only; it sets "
          "TCP timeouts (established 24 h, close_wait 1 h) and UDP timeouts only when configured (default: "
          "the kernel's); the pods keep the kernel's UDP timeouts.")
    print("\n".join(_lines(kp, kp_tables)))
    return 0



CHECK_COLUMNS = ["node_fills predicted/measured", "pod_fills predicted/measured", "node_steady predicted",
                 "node_steady measured", "node_steady_error", "pod_steady predicted", "pod_steady measured",
                 "pod_steady_error", "predicted_entry_bytes", "slab_lab_bytes_peak", "memory_error"]


def _run_calibration(run: Path) -> dict | None:
    """The calibration block of the profile a replay used (the profile file it keeps), if any."""
    from labkit.scenario import load_profile

    files = sorted(run.glob("profile-*.yaml"))
    if not files:
        return None  # a built-in profile: looked up by the rows' profile name
    return dict((load_profile(files[0]).extra or {}).get("calibration") or {})


def cmd_model_check(args) -> int:
    """Print the model's check of each run, and the past-the-article findings; 0 when all hold."""
    import pandas as pd

    from labkit.findings import check as findings
    from labkit.results import SUMMARY_FILE

    frames = []
    for run in args.runs:
        path = run / SUMMARY_FILE
        if not path.is_file():
            raise SizingError(f"{path}: no such file (a run folder holds summary.csv)", field="RUN_DIR")
        frames.append((run, pd.read_csv(path)))
    all_hold = True
    with pd.option_context("display.width", 200, "display.max_columns", None):
        for run, summary in frames:
            table = capacity.compare(summary, recompute=args.recompute,
                                     calibration=_run_calibration(run) if args.recompute else None)
            print(f"== {run}\n{table[CHECK_COLUMNS].to_string()}\n")
            for claim, holds, evidence in capacity.verdict(table, args.tolerance):
                all_hold &= holds
                print(f"  {'holds ' if holds else 'FAILS '} {claim}: {evidence}")
            past = [f for f in findings(summary) if f.id in ("F8", "F9", "F10")]
            for f in past:
                all_hold &= f.passed
                print(f"  {f.id:<6} {f.result}: {f.evidence}")
            if not past:
                all_hold = False
                print("  F8-F10 not run: the run has no iteration past 9 (replay --iterations 1-12)")
            print()
    print("every claim holds in every run" if all_hold else "NOT every claim holds: see FAILS / fail above")
    return 0 if all_hold else 1
