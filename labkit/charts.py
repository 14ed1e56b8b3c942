"""labkit's charts (the notebooks', the reports', the monitor's), drawn from the tidy frames of a run.

Iteration charts share one time axis, seconds since the load started, with
the load's span shaded so the cool-down tail is visible (without a load, seconds
since the first sample: a monitor's own recording):

* :func:`conntrack_chart`: the conntrack count of the node and of each pod
  against the global max, drop and early-drop counter deltas per second, and
  the kernel's log lines, stacked on the same axis;
* :func:`expectation_chart`: the node's expectation count against expect_max;
* :func:`transfers_chart`: completed transfers per second and failures by reason.

Summary charts: :func:`throughput_chart` puts the lab's transfers/s per
iteration beside the article's, both relative to iteration 1.

Inputs are long frames: samples ``(time, host, netns, metric, value)``, events
``(time, host, netns, kind, message)``, load ``(time, metric, value)``; times
are seconds (Unix time), ISO timestamps or datetimes.  Each function returns the
matplotlib Figure; ``out`` also writes it as a PNG file (atomically)::

    conntrack_chart(mon.samples, mon.events, out="conntrack.png")
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from labkit.exceptions import MonitorError
from labkit.util import atomic_write

NODE = "node"
EVENT_LABELS = {"table_full": "table full", "expect_table_full": "expectation table full",
                "suppressed": "lines suppressed"}
FAILURE_COLORS = sns.color_palette("Reds_r", 6)
WIDTH = 11.5  # inches: every iteration chart, so their time axes line up on the page
DPI = 85  # legible on a laptop screen; keeps a run's HTML reports small (images are inlined)
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8}


def seconds(times: pd.Series) -> pd.Series:
    """Times as float seconds (Unix time), from numbers or ISO timestamps."""
    if pd.api.types.is_numeric_dtype(times):
        return times.astype(float)
    parsed = pd.to_datetime(times, utc=True, format="ISO8601")
    return (parsed - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds()


def relative(frame: pd.DataFrame, t0: float) -> pd.DataFrame:
    """A copy of ``frame`` with ``t`` = seconds since ``t0``."""
    out = frame.copy()
    out["t"] = seconds(out["time"]) - t0 if not out.empty else pd.Series(dtype=float)
    return out


def _netns_order(names) -> list[str]:
    def key(n: str):
        if n == NODE:
            return (0, 0)
        if n.startswith("pod-") and n[4:].isdigit():
            return (1, int(n[4:]))
        return (2, n)
    return sorted(set(names), key=key)


def _palette(names: list[str]) -> dict[str, tuple]:
    colors = sns.color_palette("tab10", max(len(names), 3))
    return {n: colors[i] for i, n in enumerate(names)}


def _shade_load(ax, load_s: float | None) -> None:
    if load_s:
        ax.axvspan(0, load_s, color="0.92", zorder=0, lw=0)


def _origin(samples: pd.DataFrame, t0: float | None) -> tuple[float, str]:
    """x = 0 and the x axis' label: the load's start, or else the first sample."""
    if t0 is not None:
        return t0, "time since the load started (s)"
    return float(seconds(samples["time"]).min()), "seconds since the first sample"


def _lab_namespaces(samples: pd.DataFrame, roles: Iterable[str] | None) -> list[str]:
    """The namespaces to draw: ``roles``; else the node and the pods; else (a monitor of other
    namespaces) every one whose table held anything, or all of them."""
    if roles is not None:
        return _netns_order(roles)
    names = _netns_order(samples["netns"].unique())
    lab = [n for n in names if n == NODE or n.startswith("pod-")]
    if lab:
        return lab
    counts = samples[samples["metric"] == "nf_conntrack_count"].groupby("netns")["value"].max()
    return [n for n in names if counts.get(n, 0) > 0] or names


def save_png(fig: plt.Figure, out: str | os.PathLike) -> None:
    """Write ``fig`` to ``out`` as PNG, atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out, buf.getvalue())


def counter_rate(samples: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-second increase of a cumulative counter, per namespace.

    Args:
        samples: samples with a ``t`` column (seconds since the load started).
        metric: e.g. ``stat_drop``.

    Returns:
        A frame ``(netns, second, rate)``: the counter's increase within each
        whole second, counted from the first sample (a counter never runs backwards:
        a decrease, after a namespace was recreated, counts as 0).
    """
    rows = samples[samples["metric"] == metric].sort_values("t")
    parts = []
    for netns, group in rows.groupby("netns"):
        delta = group["value"].diff().clip(lower=0).fillna(0)
        second = np.floor(group["t"]).astype(int)
        rate = delta.groupby(second).sum()
        parts.append(pd.DataFrame({"netns": netns, "second": rate.index, "rate": rate.values}))
    if not parts:
        return pd.DataFrame(columns=["netns", "second", "rate"])
    return pd.concat(parts, ignore_index=True)


def conntrack_chart(samples: pd.DataFrame, events: pd.DataFrame | None = None, *, t0: float | None = None,
                    load_s: float | None = None, title: str = "", roles: Iterable[str] | None = None,
                    out: str | os.PathLike | None = None) -> plt.Figure:
    """The conntrack count of node and pods against the max, drops, and log lines.

    Args:
        samples: the monitor's samples (``nf_conntrack_count``, ``nf_conntrack_max``,
            ``stat_drop``, ``stat_early_drop`` per namespace).
        events: the kernel log events (``table_full``, ``expect_table_full``, ``suppressed``), or None.
        t0: Unix time of the load's start (x = 0); None: the first sample.
        load_s: how long the load ran (shaded).
        title: the figure's title.
        roles: the namespaces to draw; default the node and the pods (when the samples have
            neither, every namespace whose table held anything).
        out: also write the figure there as PNG (atomically).

    Raises:
        MonitorError: the samples have no ``nf_conntrack_count``.
    """
    if samples is None or samples.empty or "nf_conntrack_count" not in set(samples["metric"]):
        raise MonitorError("nothing to plot: the samples have no nf_conntrack_count")
    t0, xlabel = _origin(samples, t0)
    events = events if events is not None else pd.DataFrame(columns=["time", "host", "netns", "kind", "message"])
    s = relative(samples, t0)
    lab = _lab_namespaces(s, roles)
    colors = _palette(lab)
    fig, (ax_count, ax_drop, ax_log) = plt.subplots(
        3, 1, sharex=True, figsize=(WIDTH, 7.2), height_ratios=[3, 2, 1.1], constrained_layout=True, dpi=DPI)
    counts = s[(s["metric"] == "nf_conntrack_count") & s["netns"].isin(lab)]
    for netns in lab:
        part = counts[counts["netns"] == netns]
        # the node wide and under the pods: a pod that tracks what the node does still lets it show
        node = netns == NODE
        ax_count.plot(part["t"], part["value"], color=colors[netns], lw=4.0 if node else 1.6,
                      alpha=0.55 if node else 1.0, zorder=2 if node else 3, label=f"{netns} count")
    cmax = s[s["metric"] == "nf_conntrack_max"]["value"]
    if not cmax.empty:
        ax_count.axhline(cmax.max(), color="black", ls="--", lw=1.2,
                         label=f"nf_conntrack_max = {cmax.max():,.0f} (global)")
        ax_count.set_ylim(0, cmax.max() * 1.12)
    ax_count.set_ylabel("conntrack entries")
    ax_count.legend(**OUTSIDE)
    _shade_load(ax_count, load_s)
    for metric, style in (("stat_drop", "-"), ("stat_early_drop", ":")):
        rates = counter_rate(s[s["netns"].isin(lab)], metric)
        for netns in lab:
            part = rates[rates["netns"] == netns]
            if part["rate"].sum() > 0:
                ax_drop.plot(part["second"] + 0.5, part["rate"], ls=style, color=colors[netns], lw=1.4,
                             drawstyle="steps-mid", label=f"{netns} {metric[5:].replace('_', ' ')}s")
    if not ax_drop.get_legend_handles_labels()[0]:
        ax_drop.text(0.5, 0.5, "no drops and no early drops", transform=ax_drop.transAxes,
                     ha="center", va="center", color="0.4")
    else:
        ax_drop.legend(**OUTSIDE)
    ax_drop.set_ylabel("counter increase\n(packets/s)")
    ax_drop.set_ylim(bottom=0)
    _shade_load(ax_drop, load_s)
    _log_strip(ax_log, relative(events, t0) if not events.empty else events, lab, colors)
    _shade_load(ax_log, load_s)
    ax_log.set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    if out is not None:
        save_png(fig, out)
    return fig


def _log_strip(ax, events: pd.DataFrame, lab: list[str], colors: dict) -> None:
    rows = []
    if not events.empty:
        ev = events[events["netns"].isin(lab) & events["kind"].isin(EVENT_LABELS)]
        rows = sorted({(k, n) for k, n in zip(ev["kind"], ev["netns"])},
                      key=lambda kn: (list(EVENT_LABELS).index(kn[0]), _netns_order(lab).index(kn[1])))
        for y, (kind, netns) in enumerate(rows):
            part = ev[(ev["kind"] == kind) & (ev["netns"] == netns)]
            ax.scatter(part["t"], [y] * len(part), marker="|", s=120, color=colors[netns], lw=1.5)
    ax.set_yticks(range(len(rows)), [f"{EVENT_LABELS[k]} ({n})" for k, n in rows], fontsize=8)
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    if not rows:
        ax.text(0.5, 0.5, "no kernel log lines about full tables", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
    ax.set_ylabel("kernel log")


def expectation_chart(samples: pd.DataFrame, *, t0: float | None = None, load_s: float | None = None,
                      netns: str = NODE, title: str = "", out: str | os.PathLike | None = None) -> plt.Figure:
    """The expectation count of the node against ``nf_conntrack_expect_max``.

    ``t0`` None counts seconds from the first sample; ``out`` also writes a PNG file.
    """
    t0, xlabel = _origin(samples, t0)
    s = relative(samples, t0)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.2), constrained_layout=True, dpi=DPI)
    part = s[(s["metric"] == "expect_count") & (s["netns"] == netns)]
    ax.plot(part["t"], part["value"], color="tab:purple", lw=1.6, label=f"{netns} expectations")
    emax = s[(s["metric"] == "nf_conntrack_expect_max")]["value"]
    if not emax.empty:
        ax.axhline(emax.max(), color="black", ls="--", lw=1.2,
                   label=f"nf_conntrack_expect_max = {emax.max():,.0f} (global)")
        ax.set_ylim(0, emax.max() * 1.15)
    _shade_load(ax, load_s)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("expectations")
    ax.legend(**OUTSIDE)
    if title:
        ax.set_title(title)
    if out is not None:
        save_png(fig, out)
    return fig


def transfers_chart(load: pd.DataFrame, *, t0: float, load_s: float | None = None,
                    title: str = "") -> plt.Figure:
    """Completed transfers per second, and failed ones stacked by reason.

    Args:
        load: ``(time, metric, value)`` per second with metrics ``completed`` and
            ``failed_<reason>`` (transfers that ended in that second).
    """
    s = relative(load, t0)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6), constrained_layout=True, dpi=DPI)
    done = s[s["metric"] == "completed"].sort_values("t")
    ax.plot(done["t"], done["value"], color="tab:green", lw=1.8, drawstyle="steps-mid",
            label="completed (verified)")
    failed = s[s["metric"].str.startswith("failed_")]
    bottom = None
    for i, (metric, part) in enumerate(sorted(failed.groupby("metric"), key=lambda kv: -kv[1]["value"].sum())):
        if part["value"].sum() == 0:
            continue
        part = part.set_index("t")["value"]
        base = bottom.reindex(part.index, fill_value=0) if bottom is not None else 0
        ax.bar(part.index, part.values, bottom=base, width=0.9, align="edge",
               color=FAILURE_COLORS[i % len(FAILURE_COLORS)], label=f"failed: {metric[7:].replace('_', ' ')}")
        bottom = part if bottom is None else bottom.add(part, fill_value=0)
    _shade_load(ax, load_s)
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("transfers/s")
    ax.set_ylim(bottom=0)
    ax.legend(**OUTSIDE)
    if title:
        ax.set_title(title)
    return fig


def relative_base(summary: pd.DataFrame) -> pd.Series:
    """The row the others are compared with: iteration 1 when the run has it, else the
    first iteration with a non-zero rate (else simply the first)."""
    frame = summary.sort_values("iteration")
    for candidates in (frame[frame["iteration"] == 1], frame[frame["transfers_per_s"].fillna(0) > 0], frame):
        if not candidates.empty:
            return candidates.iloc[0]
    raise ValueError("an empty summary has no iteration to compare with")


def ratio(values: pd.Series, base: float) -> pd.Series:
    """``values / base``, NaN (not inf) where the base is zero or missing."""
    if not base or not np.isfinite(base):
        return pd.Series(np.nan, index=values.index)
    return values / base


def throughput_chart(summary: pd.DataFrame, title: str = "") -> plt.Figure:
    """Lab transfers/s per iteration beside the article's, both relative to iteration 1.

    Without iteration 1 in the run, both are relative to its first iteration that
    served anything (the axis says which); a lab rate of zero is drawn as no bar.
    """
    frame = summary.sort_values("iteration")
    base = relative_base(frame)
    lab = ratio(frame["transfers_per_s"], base["transfers_per_s"])
    art = ratio(frame["article_transfers_per_s"], base["article_transfers_per_s"])
    x = np.arange(len(frame))
    fig, ax = plt.subplots(figsize=(10, 4.2), constrained_layout=True, dpi=DPI)
    bars_lab = ax.bar(x - 0.2, lab, 0.4, color="tab:blue", label="lab (this machine)")
    bars_art = ax.bar(x + 0.2, art, 0.4, color="tab:orange", label="article")
    for bars, values in ((bars_lab, frame["transfers_per_s"]), (bars_art, frame["article_transfers_per_s"])):
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(x, [f"it. {n}" for n in frame["iteration"]])
    ax.set_ylabel(f"transfers/s relative to iteration {int(base['iteration'])}")
    ax.set_xlabel("iteration (bar labels: absolute transfers/s)")
    finite = [v for v in (*lab, *art) if np.isfinite(v)]
    ax.set_ylim(0, (max(finite) if finite else 1.0) * 1.3)
    ax.legend(loc="upper left", fontsize=9)
    if title:
        ax.set_title(title)
    return fig


def model_chart(check: pd.DataFrame, title: str = "") -> plt.Figure:
    """The sizing model beside the measurement, per iteration (``labkit.capacity.compare``'s frame).

    Left: transfers/s the model lets through against the measured rate.  Right: each
    namespace's predicted steady count against the measured mean (log scale); a filled
    marker is a table that filled, an open one a table that did not, so a marker pair of
    different fill is a wrong call.
    """
    frame = check.reset_index().sort_values("iteration")
    x = np.arange(len(frame))
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH, 4.0), constrained_layout=True, dpi=DPI)
    left.bar(x - 0.2, frame["predicted_transfers_per_s"].astype(float), 0.4, color="tab:gray", label="model")
    left.bar(x + 0.2, frame["transfers_per_s"].astype(float), 0.4, color="tab:blue", label="measured")
    left.set_xticks(x, [f"it. {n}" for n in frame["iteration"]])
    left.set_ylabel("transfers/s")
    left.legend(loc="upper left", fontsize=8)
    for offset, ns, color in ((-0.12, "node", "tab:purple"), (0.12, "pod", "tab:green")):
        calls = frame[f"{ns}_fills predicted/measured"].str.split("/", expand=True)
        for kind, col, marker, dx in (("model", f"{ns}_steady predicted", "s", -0.05),
                                      ("measured", f"{ns}_steady measured", "o", 0.05)):
            values = pd.to_numeric(frame[col], errors="coerce").clip(lower=1)
            full = (calls[0 if kind == "model" else 1] == "fills").to_numpy()
            xs = x + offset + dx
            right.scatter(xs[full], values[full], marker=marker, color=color, s=36,
                          label=f"{ns}, {kind} (filled = table full)")
            right.scatter(xs[~full], values[~full], marker=marker, facecolors="none", edgecolors=color, s=36)
    right.set_yscale("log")
    right.set_xticks(x, [f"it. {n}" for n in frame["iteration"]])
    right.set_ylabel("conntrack entries (steady; per pod)")
    right.legend(**{**OUTSIDE, "fontsize": 7})
    if title:
        fig.suptitle(title)
    return fig
