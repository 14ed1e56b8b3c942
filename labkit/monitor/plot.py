"""The monitor's chart: conntrack counts against the max, with drops and log lines, one time axis.

    fig = plot_conntrack(mon.samples, mon.events, out="conntrack.png")

Three panels share the time axis (seconds since the first sample): the
conntrack count of each namespace against ``nf_conntrack_max`` (and, when there
are expectations, the expectation count against ``nf_conntrack_expect_max``);
the kernel counters ``drop``, ``early_drop`` and ``insert_failed`` as deltas
per second; and each kernel log line as a mark, coloured by namespace.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import matplotlib
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from labkit.exceptions import MonitorError
from labkit.util import atomic_write

COUNTERS = ("stat_drop", "stat_early_drop", "stat_insert_failed")
KIND_ORDER = ["table_full", "expect_table_full", "suppressed"]


def counter_rates(samples: pd.DataFrame, metrics: Iterable[str] = COUNTERS, *,
                  bin_s: float = 1.0, start=None) -> pd.DataFrame:
    """Per-second deltas of kernel counters, tidy: ``t, host, netns, metric, value``.

    Args:
        samples: the monitor's samples table.
        metrics: counter metrics to turn into rates.
        bin_s: width of a time bin in seconds.
        start: the time that is t=0 (the first sample by default).

    Returns:
        One row per bin, namespace and counter: ``value`` is how much the counter
        rose in that bin, divided by ``bin_s`` (a rate per second).
    """
    rows = samples[samples["metric"].isin(list(metrics))].sort_values("time")
    if rows.empty:
        return pd.DataFrame(columns=["t", "host", "netns", "metric", "value"])
    start = rows["time"].min() if start is None else start
    rows = rows.assign(delta=rows.groupby(["host", "netns", "metric"])["value"].diff().fillna(0).clip(lower=0))
    rows = rows.assign(t=((rows["time"] - start).dt.total_seconds() // bin_s) * bin_s)
    out = rows.groupby(["t", "host", "netns", "metric"], as_index=False)["delta"].sum()
    return out.rename(columns={"delta": "value"}).assign(value=lambda f: f["value"] / bin_s)


def plot_conntrack(samples: pd.DataFrame, events: pd.DataFrame | None = None, *,
                   roles: Iterable[str] | None = None, out: str | os.PathLike | None = None,
                   title: str | None = None) -> Figure:
    """Draw counts against the max, counter deltas and log lines on one time axis.

    Args:
        samples: the monitor's samples table (``time, host, netns, metric, value``).
        events: the monitor's events table, or None.
        roles: the namespaces to draw (default: every one that tracked anything,
            ``init`` included only when it did).
        out: write the figure there as PNG (atomically) when given.
        title: the figure's title.

    Returns:
        The matplotlib figure.

    Raises:
        MonitorError: the samples table is empty or lacks the count metric.
    """
    if samples is None or samples.empty or "nf_conntrack_count" not in set(samples["metric"]):
        raise MonitorError("nothing to plot: the samples have no nf_conntrack_count")
    start = samples["time"].min()
    data = samples.assign(t=(samples["time"] - start).dt.total_seconds())
    counts = data[data["metric"] == "nf_conntrack_count"]
    if roles is None:
        busy = counts.groupby("netns")["value"].max()
        roles = [r for r in busy.index if busy[r] > 0] or list(busy.index)
    roles = sorted(set(roles), key=_role_key)
    data = data[data["netns"].isin(roles)]
    palette = dict(zip(roles, sns.color_palette("tab10", len(roles))))
    has_expect = data.loc[data["metric"] == "expect_count", "value"].max() > 0

    fig = Figure(figsize=(11, 9 if has_expect else 7.5), layout="constrained")
    heights = [3, 2, 2, 1.2] if has_expect else [3, 2, 1.2]
    axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    ax_count, rest = axes[0], list(axes[1:])
    ax_expect = rest.pop(0) if has_expect else None
    ax_rate, ax_events = rest

    _against_max(ax_count, data, "nf_conntrack_count", "nf_conntrack_max", palette, "conntrack entries")
    if ax_expect is not None:
        _against_max(ax_expect, data, "expect_count", "nf_conntrack_expect_max", palette, "expectations")

    rates = counter_rates(data, start=start)
    if rates.empty or not rates["value"].any():
        ax_rate.text(0.5, 0.5, "no drops, early drops or failed inserts", transform=ax_rate.transAxes,
                     ha="center", va="center", color="gray")
    else:
        rates = rates.assign(counter=rates["metric"].str.replace("stat_", "", regex=False))
        sns.lineplot(data=rates, x="t", y="value", hue="netns", style="counter", palette=palette,
                     drawstyle="steps-post", ax=ax_rate, errorbar=None)
        ax_rate.legend(loc="upper left", fontsize="small", ncols=2)
    ax_rate.set_ylabel("counter delta / s")

    _events(ax_events, events, start, palette)
    ax_events.set_xlabel("seconds since the first sample")
    fig.suptitle(title or f"conntrack from {start:%Y-%m-%d %H:%M:%S} UTC")
    if out is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write(out, buf.getvalue())
    return fig


def _role_key(role: str) -> tuple:
    order = {"init": 0, "node": 1, "client": 9}
    if role.startswith("pod-") and role[4:].isdigit():
        return (2, int(role[4:]))
    return (order.get(role, 5), role)


def _against_max(ax, data: pd.DataFrame, metric: str, max_metric: str, palette: dict, label: str) -> None:
    rows = data[data["metric"] == metric]
    # the node drawn wider, so a pod pinned at the same max does not hide it
    sizes = {role: (3.0 if role == "node" else 1.5) for role in palette}
    sns.lineplot(data=rows, x="t", y="value", hue="netns", size="netns", sizes=sizes, palette=palette,
                 ax=ax, errorbar=None, drawstyle="steps-post", alpha=0.85)
    limits = data[data["metric"] == max_metric].groupby("t", as_index=False)["value"].max()
    if not limits.empty:
        ax.plot(limits["t"], limits["value"], color="black", linestyle="--", linewidth=1,
                drawstyle="steps-post", label=max_metric.replace("nf_conntrack_", "") + " (global)")
    ax.set_ylabel(label)
    # scale to the counts and the lowest max: a max far above (the default
    # 262144 against a few hundred entries) is named, not drawn flat on the axis
    peak = float(rows["value"].max()) if not rows.empty else 0.0
    low = float(limits["value"].min()) if not limits.empty else 0.0
    top = max(peak, low, 1.0) * 1.15
    ax.set_ylim(0, top)
    if not limits.empty and limits["value"].max() > top:
        ax.text(0.99, 0.97, f"{max_metric} up to {int(limits['value'].max())} (off scale)",
                transform=ax.transAxes, ha="right", va="top", fontsize="small", color="black")
    ax.legend(loc="upper left", fontsize="small")


def _events(ax, events: pd.DataFrame | None, start, palette: dict) -> None:
    ax.set_ylabel("kernel log")
    if events is None or events.empty:
        ax.text(0.5, 0.5, "no kernel log lines", transform=ax.transAxes, ha="center", va="center",
                color="gray")
        ax.set_yticks([])
        return
    rows = events.assign(t=(events["time"] - start).dt.total_seconds(),
                         netns=events["netns"].fillna("").replace("", "(any)"))
    kinds = [k for k in KIND_ORDER if k in set(rows["kind"])]
    pal = {**palette, "(any)": (0.5, 0.5, 0.5)}
    pal.update({r: matplotlib.colors.to_rgb("C7") for r in set(rows["netns"]) if r not in pal})
    sns.stripplot(data=rows, x="t", y="kind", hue="netns", order=kinds, palette=pal, native_scale=True,
                  marker="|", size=14, linewidth=1.5, jitter=False, ax=ax, legend=False)
    ax.set_ylabel("kernel log")
