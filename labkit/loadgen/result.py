"""What a load counted: :class:`LoadResult`, merged from one record per worker.

A result has a ``summary`` dict (ok, failed, by_reason, started, duration_s,
transfers_per_s, latency_p50/p90/p99_ms, CPU and memory of the load generator;
``transfers_per_s`` is ``ok_in_window / window_s``: for a ``duration`` load the
transfers that ended ok within the duration, over the duration, so stragglers
finishing after it do not stretch the rate; for a ``count`` load, all ok over
``duration_s``, first start to last end),
a tidy per-second ``timeseries`` DataFrame (``time, elapsed_s, metric, value``;
metrics ``started``, ``completed``, ``failed``, ``failed_<reason>``,
``in_flight``, ``rss_bytes``), and, when asked, a per-transfer ``transfers``
DataFrame.  It round-trips through JSON (what ``labkit loadgen --json`` prints)
and writes ``summary.json``, ``timeseries.csv`` and ``transfers.csv`` atomically.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.exceptions import LoadgenError
from labkit.loadgen.engine import HIST_SCALE, OK, TRANSFER_COLUMNS
from labkit.util import atomic_write

if TYPE_CHECKING:  # pandas is imported when a table is made: the CLI starts faster without it
    import pandas as pd

SERIES = ("started", "completed", "in_flight", "rss_bytes")
PERCENTILES = (50, 90, 99)


@dataclass
class LoadResult:
    """The outcome of one load, all workers merged.

    Attributes:
        summary: counters and rates (see the module docstring); ``summary["ok"]``
            is the number of verified transfers.
        series: per-second counts as lists (``started``, ``completed``,
            ``in_flight``, ``rss_bytes``, and ``failed`` {reason: list}), with
            ``t0_wall`` the epoch time of second 0.
        latency_hist: ok transfers' latency histogram {bucket: count}
            (bucket = int(ln(microseconds) * HIST_SCALE)).
        spec: the load spec as a dict.
        workers: one small summary per worker (ok, failed, CPU, memory).
        transfers: the per-transfer table, when asked for.
    """

    summary: dict
    series: dict
    latency_hist: dict
    spec: dict
    workers: list = field(default_factory=list)
    transfers: pd.DataFrame | None = None

    @property
    def ok(self) -> int:
        """Verified transfers."""
        return self.summary["ok"]

    @property
    def timeseries(self) -> pd.DataFrame:
        """Per-second counts as a tidy frame: ``time, elapsed_s, metric, value``.

        ``time`` is the epoch time the second began (to line up with monitor
        samples); ``failed`` is the sum of every ``failed_<reason>`` metric.
        """
        t0 = self.series["t0_wall"]
        rows = []
        n = len(self.series["started"])
        failed = self.series["failed"]
        total = [sum(bins[i] for bins in failed.values()) for i in range(n)]
        columns = {name: self.series[name] for name in SERIES}
        columns["failed"] = total
        for reason, bins in sorted(failed.items()):
            columns[f"failed_{reason}"] = bins
        for metric, values in columns.items():
            for i, value in enumerate(values):
                rows.append((t0 + i, i, metric, value))
        import pandas as pd

        return pd.DataFrame(rows, columns=["time", "elapsed_s", "metric", "value"])

    def to_json(self) -> str:
        """Return everything but the per-transfer table as one JSON document."""
        return json.dumps({"summary": self.summary, "series": self.series,
                           "latency_hist": self.latency_hist, "spec": self.spec,
                           "workers": self.workers})

    @classmethod
    def from_json(cls, text: str, transfers: pd.DataFrame | None = None) -> "LoadResult":
        """Rebuild a result from :meth:`to_json`'s output.

        Raises:
            LoadgenError: the text is not a loadgen result (the start of it is quoted).
        """
        try:
            doc = json.loads(text)
            return cls(summary=doc["summary"], series=doc["series"],
                       latency_hist={int(k): v for k, v in doc["latency_hist"].items()},
                       spec=doc["spec"], workers=doc.get("workers", []), transfers=transfers)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LoadgenError(f"not a loadgen JSON result ({exc}): {text[:200]!r}") from None

    def write(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``summary.json``, ``timeseries.csv`` and ``transfers.csv`` (if any) atomically.

        Returns:
            {name: path} of the files written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = {"summary": out / "summary.json", "timeseries": out / "timeseries.csv"}
        atomic_write(written["summary"], (json.dumps(
            {"summary": self.summary, "spec": self.spec, "workers": self.workers,
             "latency_hist": self.latency_hist}, indent=2) + "\n").encode())
        atomic_write(written["timeseries"], self.timeseries.to_csv(index=False).encode())
        if self.transfers is not None:
            written["transfers"] = out / "transfers.csv"
            atomic_write(written["transfers"], self.transfers.to_csv(index=False).encode())
        return written

    def __repr__(self) -> str:
        s = self.summary
        return (f"<LoadResult ok={s['ok']} failed={s['failed']} "
                f"{s['transfers_per_s']:.0f}/s over {s['duration_s']:.1f}s>")


def merge_records(records: list[dict], transfers: pd.DataFrame | None = None,
                  probe: dict | None = None) -> LoadResult:
    """Merge the engine records of a run's workers into one :class:`LoadResult`.

    Args:
        records: one :func:`~labkit.loadgen.engine.run_engine` record per worker,
            all started from the same ``t0``.
        transfers: the per-transfer table, if one was kept.
        probe: what the first transfer learned about the file (size, sha256), if it ran.
    """
    if not records:
        raise LoadgenError("no worker returned a result")
    records = sorted(records, key=lambda r: r["worker"])
    n = max(len(r["series"]["started"]) for r in records)
    series: dict = {"t0_wall": min(r["t0_wall"] for r in records)}
    for name in SERIES:
        series[name] = _sum_lists([r["series"][name] for r in records], n)
    reasons = sorted({k for r in records for k in r["failed_series"]})
    series["failed"] = {k: _sum_lists([r["failed_series"].get(k, []) for r in records], n)
                        for k in reasons}
    hist: dict[int, int] = {}
    for r in records:
        for bucket, count in r["latency_hist"].items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + count
    counts = {k: sum(r["counts"][k] for r in records) for k in records[0]["counts"]}
    by_reason: dict[str, int] = {}
    for r in records:
        for k, v in r["failed"].items():
            by_reason[k] = by_reason.get(k, 0) + v
    duration = max(r["duration_s"] for r in records)
    # a duration load is judged over its window: stragglers that end (after resends)
    # past it count as ok but do not stretch the rate
    spec_duration = records[0]["spec"].get("duration")
    if spec_duration:
        window, in_window = min(spec_duration, duration), counts["ok_in_window"]
    else:
        window, in_window = duration, counts[OK]
    cpu_user = sum(r["cpu_user_s"] for r in records)
    cpu_sys = sum(r["cpu_sys_s"] for r in records)
    spec = dict(records[0]["spec"])
    for key in ("concurrency", "count", "max_in_flight"):
        if spec.get(key) is not None:
            spec[key] = sum(r["spec"][key] for r in records)
    if spec.get("rate") is not None:
        spec["rate"] = sum(r["spec"]["rate"] for r in records)
    if spec.get("ports") is not None:
        spec["ports"] = [min(r["spec"]["ports"][0] for r in records),
                         max(r["spec"]["ports"][1] for r in records)]
    spec["workers"] = len(records)
    ok = counts[OK]
    failed = sum(by_reason.values())
    summary = {
        "ok": ok,
        "failed": failed,
        "by_reason": dict(sorted(by_reason.items())),
        "started": counts["started"],
        "skipped": counts["skipped"],
        "retransmits": counts["retransmits"],
        "duplicates": counts["duplicates"],
        "wrong_sender": counts["wrong_sender"],
        "ignored": counts["ignored"],
        "started_at": series["t0_wall"],
        "duration_s": duration,
        "window_s": window,
        "ok_in_window": in_window,
        "transfers_per_s": in_window / window,
        **{f"latency_p{p}_ms": percentile(hist, p) for p in PERCENTILES},
        "cpu_user_s": cpu_user,
        "cpu_sys_s": cpu_sys,
        "ok_per_cpu_s": ok / (cpu_user + cpu_sys) if cpu_user + cpu_sys > 0 else None,
        "maxrss_kb": max(r["maxrss_kb"] for r in records),
        "workers": len(records),
        "mode": "closed" if spec.get("concurrency") is not None else "open",
        "expected_size": spec.get("expected_size"),
        "verified": "size+sha256" if spec.get("sha256") else "size",
        "interrupted": any(r["interrupted"] for r in records),
    }
    if probe:
        summary["probe"] = probe
    workers = [{"worker": r["worker"], "ok": r["counts"][OK], "failed": sum(r["failed"].values()),
                "cpu_user_s": r["cpu_user_s"], "cpu_sys_s": r["cpu_sys_s"],
                "maxrss_kb": r["maxrss_kb"]} for r in records]
    return LoadResult(summary=summary, series=series, latency_hist=hist, spec=spec,
                      workers=workers, transfers=transfers)


def percentile(hist: dict[int, int], p: float) -> float | None:
    """Return the ``p``-th percentile (ms) of a latency histogram, None when empty."""
    total = sum(hist.values())
    if not total:
        return None
    rank = math.ceil(total * p / 100.0)
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(math.exp((bucket + 0.5) / HIST_SCALE) / 1000.0, 3)
    return None  # pragma: no cover - rank <= total


def read_transfers(text: str) -> pd.DataFrame:
    """Parse per-transfer CSV text (as the engine writes it) into a DataFrame.

    Raises:
        LoadgenError: the columns are not the loadgen's.
    """
    import pandas as pd

    frame = pd.read_csv(io.StringIO(text)) if text.strip() else pd.DataFrame(columns=TRANSFER_COLUMNS)
    if list(frame.columns) != TRANSFER_COLUMNS:
        raise LoadgenError(f"not a loadgen transfers table: columns {list(frame.columns)}, "
                           f"expected {TRANSFER_COLUMNS}")
    return frame


def _sum_lists(lists: list[list], n: int) -> list:
    total = [0] * n
    for values in lists:
        for i, v in enumerate(values):
            total[i] += v
    return total
