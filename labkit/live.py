"""A live chart of a running load, redrawn in place about once a second.

:class:`LiveChart` is the ``live`` view that :func:`labkit.run.run_iteration`
accepts: it is started with the running :class:`~labkit.monitor.Monitor`, fed
the load generator's running totals, and stopped when sampling ends.  A thread
of its own reads the monitor's newest sample of each namespace and its new
kernel log lines once a second (no full table is rebuilt while the load runs)
and redraws one figure: each namespace's conntrack count against the max, drops
and early drops per second, transfers per second with a mark for every kernel
log line about a full table.

In a Jupyter kernel the figure is one PNG output, replaced in place
(``update_display_data``): JupyterLab shows it move, and papermill or an HTML
report keeps the last one, a static image that needs no widget state or
script.  Outside a kernel nothing is displayed; :meth:`LiveChart.figure` still
draws it (tests, screenshots).
"""

from __future__ import annotations

import io
import logging
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

NODE = "node"
LOG_KINDS = {"table_full": ("table full", "tab:red"),
             "expect_table_full": ("expectation table full", "tab:purple")}
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


@dataclass
class Series:
    """What the live chart has seen so far (times are seconds since the monitor started).

    Attributes:
        counts: ``{namespace: [(t, count)]}``.
        maxima: ``[(t, nf_conntrack_max)]``.
        drops, early_drops: ``{namespace: [(t, per second)]}``.
        transfers: ``[(t, completed per second, failed per second)]``.
        marks: ``[(t, kind)]`` of kernel log lines.
    """

    counts: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    maxima: list[tuple[float, int]] = field(default_factory=list)
    drops: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    early_drops: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    transfers: list[tuple[float, float, float]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def points(self) -> int:
        """How many count points there are (0 before the first sample)."""
        return sum(len(v) for v in self.counts.values())


def _lab_role(role: str) -> bool:
    return role == NODE or role.startswith("pod-")


def _order(role: str) -> tuple[int, int]:
    return (0, 0) if role == NODE else (1, int(role[4:]) if role[4:].isdigit() else 0)


class LiveChart:
    """The live view of one load (the ``live`` argument of :func:`labkit.run.run_iteration`).

    Args:
        title: the figure's title.
        interval: seconds between two redraws.
        show: display in the Jupyter kernel this runs in (if any).
        live: redraw while the load runs; False samples the same way but draws only
            once, when sampling ends (a batch replay: no drawing competes with the load).
        expected_s: the load's planned duration plus cool-down: the x axis spans at least this.
    """

    def __init__(self, title: str = "", *, interval: float = 1.0, show: bool = True, live: bool = True,
                 expected_s: float | None = None):
        self.title = title
        self.interval = float(interval)
        self.expected_s = expected_s
        self.status = "starting"
        self.series = Series()
        self.redraws = 0
        self._show = show
        self.live = live
        self._handle = None
        self._monitor = None
        self._t0: float | None = None
        self._last: dict[str, tuple[float, dict[str, int]]] = {}
        self._events_seen = 0
        self._load_last: tuple[float, int, int] | None = None
        self._load_offset: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what run_iteration calls --------------------------------------------------------

    def begin(self) -> "LiveChart":
        """Show the (empty) chart at once, so the cell shows something from its first second."""
        if self.live:
            self._redraw()
        return self

    def step(self, line: str) -> None:
        """A step of the run started (the ``on_step`` of run_iteration): shown in the title."""
        self.status = line
        log.info("%s", line)
        if self._thread is None and self.live:
            self._redraw()

    def start(self, monitor: Any) -> None:
        """The monitor samples: start reading it and redrawing."""
        self._monitor = monitor
        self._t0 = time.time()
        self._sample()
        if self.live:
            self._redraw()
        self._thread = threading.Thread(target=self._loop, name="labkit-live-chart", daemon=True)
        self._thread.start()

    def progress(self, totals: dict) -> None:
        """The load's running totals (``elapsed_s``, ``ok``, ``failed``, and ``at``, the wall
        time they were written): transfers per second, placed where the load had them."""
        now = float(totals["elapsed_s"])
        ok, failed = int(totals["ok"]), int(totals["failed"])
        with self._lock:
            if self._load_offset is None:  # the load's second 0 on the chart's axis (lines come in batches)
                at = totals.get("at")
                arrived = time.time()
                # its own clock when it is this one's (a namespace); else when the line arrived
                wall = float(at) if at is not None and arrived - 30 < float(at) <= arrived + 1 else arrived
                self._load_offset = self._rel(wall) - now
            if self._load_last is not None and now > self._load_last[0]:
                dt = now - self._load_last[0]
                t = self._load_offset + now
                self.series.transfers.append((t, (ok - self._load_last[1]) / dt, (failed - self._load_last[2]) / dt))
            self._load_last = (now, ok, failed)

    def stop(self) -> None:
        """Sampling ended: one last read and the final drawing (the static chart that stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._monitor is not None:
            self._sample()
        self.status = "done"
        self._redraw()

    # -- sampling ------------------------------------------------------------------------

    def _rel(self, wall: float) -> float:
        return wall - (self._t0 or wall)

    def _loop(self) -> None:
        # on a fixed beat: the drawing's own time (a few tenths of a second) does not add up
        beat = time.monotonic()
        while True:
            beat += self.interval
            if self._stop.wait(max(0.0, beat - time.monotonic())):
                return
            beat = max(beat, time.monotonic() - self.interval)  # a slow drawing: skip, do not catch up
            self._sample()
            if self.live:
                self._redraw()

    def _sample(self) -> None:
        latest = self._monitor.latest()
        events = self._monitor.new_events(self._events_seen)
        with self._lock:
            for (_host, role), (wall, values) in sorted(latest.items(), key=lambda kv: kv[0][1]):
                if not _lab_role(role) or "nf_conntrack_count" not in values:
                    continue
                t = self._rel(wall)
                prev = self._last.get(role)
                if prev is not None and wall <= prev[0]:
                    continue
                self.series.counts.setdefault(role, []).append((t, int(values["nf_conntrack_count"])))
                if role == NODE and "nf_conntrack_max" in values:
                    self.series.maxima.append((t, int(values["nf_conntrack_max"])))
                if prev is not None:
                    dt = wall - prev[0]
                    for metric, into in (("stat_drop", self.series.drops),
                                         ("stat_early_drop", self.series.early_drops)):
                        if metric in values and metric in prev[1]:
                            rate = max(0, values[metric] - prev[1][metric]) / dt
                            into.setdefault(role, []).append((t, rate))
                self._last[role] = (wall, dict(values))
            for _machine, wall, event in events:
                if event.kind in LOG_KINDS:
                    self.series.marks.append((self._rel(wall), event.kind))
            self._events_seen += len(events)

    # -- drawing -------------------------------------------------------------------------

    def figure(self) -> Figure:
        """The chart as it stands (a new matplotlib Figure, not registered with pyplot)."""
        with self._lock:
            s = Series({k: list(v) for k, v in self.series.counts.items()}, list(self.series.maxima),
                       {k: list(v) for k, v in self.series.drops.items()},
                       {k: list(v) for k, v in self.series.early_drops.items()},
                       list(self.series.transfers), list(self.series.marks))
        return draw(s, title=self.title, status=self.status, span=self.expected_s)

    def png(self) -> bytes:
        """The chart as PNG bytes."""
        fig = self.figure()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        return buf.getvalue()

    def _redraw(self) -> None:
        self.redraws += 1
        if not self._show:
            return
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return
        if get_ipython() is None:
            return
        image = Image(data=self.png(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def draw(s: Series, *, title: str = "", status: str = "", span: float | None = None) -> Figure:
    """Draw the live chart from what was seen (pure: a Series in, a Figure out).

    Top: each namespace's conntrack count against the global max.  Middle: drops
    (solid) and early drops (dotted) per second.  Bottom: completed transfers per
    second (failed ones in red) and a vertical mark per kernel log line.
    """
    # a fixed layout: constrained_layout costs a third more per redraw, once a second
    fig = Figure(figsize=(10, 6.2), dpi=72)
    fig.subplots_adjust(left=0.08, right=0.78, top=0.94, bottom=0.08, hspace=0.1)
    ax_count, ax_drop, ax_tps = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
    roles = sorted(s.counts, key=_order)
    colors = {r: COLORS[i % len(COLORS)] for i, r in enumerate(roles)}
    for role in roles:
        t, v = zip(*s.counts[role]) if s.counts[role] else ((), ())
        # the node wide and under the pods: a pod that tracks what the node does still lets it show
        node = role == NODE
        ax_count.plot(t, v, color=colors[role], lw=4.0 if node else 1.6, alpha=0.55 if node else 1.0,
                      zorder=2 if node else 3, label=f"{role} count")
    if s.maxima:
        cmax = s.maxima[-1][1]
        ax_count.axhline(cmax, color="black", ls="--", lw=1.2, label=f"nf_conntrack_max = {cmax:,}")
        ax_count.set_ylim(0, cmax * 1.12)
    ax_count.set_ylabel("conntrack entries")
    for into, style, what in ((s.drops, "-", "drops"), (s.early_drops, ":", "early drops")):
        for role in sorted(into, key=_order):
            if any(v for _t, v in into[role]):
                t, v = zip(*into[role])
                ax_drop.plot(t, v, ls=style, color=colors.get(role, "0.3"), lw=1.5, label=f"{role} {what}/s")
    ax_drop.set_ylabel("packets/s")
    ax_drop.set_ylim(bottom=0)
    if s.transfers:
        t, ok, failed = zip(*s.transfers)
        ax_tps.plot(t, ok, color="tab:green", lw=1.8, label="transfers/s (verified)")
        if any(failed):
            ax_tps.plot(t, failed, color="tab:red", lw=1.2, label="failed/s")
    for kind, (label, color) in LOG_KINDS.items():
        times = [t for t, k in s.marks if k == kind]
        for i, t in enumerate(times):
            ax_tps.axvline(t, color=color, lw=0.8, alpha=0.6,
                           label=f"kernel: {label} ({len(times)})" if i == 0 else None)
    ax_tps.set_ylabel("transfers/s")
    ax_tps.set_ylim(bottom=0)
    ax_tps.set_xlabel("seconds since sampling started")
    right = max([span or 0.0] + [pts[-1][0] for pts in s.counts.values() if pts] + [1.0])
    ax_tps.set_xlim(0, right * 1.02)
    for ax, empty in ((ax_count, "waiting for the first sample ..."), (ax_drop, "no drops, no early drops"),
                      (ax_tps, "no transfers yet")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        else:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="0.4")
    heading = textwrap.fill(f"{title}  [{status}]" if status else title, 110)  # a long step line wraps
    fig.subplots_adjust(top=0.94 - 0.035 * heading.count("\n"))
    fig.suptitle(heading, fontsize=11)
    return fig
