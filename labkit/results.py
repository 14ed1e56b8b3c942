"""The layout and the tables of a run folder, ``results/<run-id>/``.

One place names the files a run writes and the columns of ``summary.csv``
(DESIGN.md's contract), reads a table whether it was written plain or
gzip-compressed, and writes tables atomically.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from labkit.exceptions import ReplayError
from labkit.util import atomic_write

# DESIGN.md's summary.csv contract, in its order, then the columns labkit adds.
SUMMARY_COLUMNS = (
    "iteration", "transfers_per_s", "transfers_ok", "transfers_failed", "replicas",
    "conntrack_max", "expect_max", "node_udp_timeout", "pod_udp_timeout",
    "peak_node_count", "peak_pod_count", "peak_expect_count",
    "node_drops", "node_early_drops", "pod_drops", "pod_early_drops",
    "table_full_logs", "expect_full_logs", "article_transfers_per_s",
)
EXTRA_COLUMNS = (
    "title", "setup", "profile", "testbed", "duration_s", "cooldown_s", "concurrency",
    "file_size", "cpu_limit", "pods_track_conntrack", "node_notrack", "node_nodeport_entries", "proxy_mode", "background_flows",
    "node_udp_timeout_stream", "pod_udp_timeout_stream",
    "node_table_full_logs", "pod_table_full_logs", "node_expect_full_logs",
    "pod_insert_failed", "node_insert_failed",
    "mean_node_count", "mean_pod_count", "node_count_at_stop", "node_count_after_stop", "after_stop_s",
    "transfers_per_s_whole_load", "steady_from_s", "failed_by_reason", "latency_p50_ms", "latency_p99_ms", "status",
    # the sizing model beside the measurement (labkit.capacity.predict_row, slab_columns)
    "model_offered_per_s", "predicted_transfers_per_s", "predicted_node_fills", "measured_node_fills",
    "predicted_pod_fills", "measured_pod_fills", "predicted_expect_fills", "predicted_node_count",
    "predicted_pod_count", "predicted_expect_count", "predicted_entry_bytes", "predicted_memory_bytes",
    "slab_bytes_start", "slab_bytes_peak", "slab_lab_bytes_peak",
)
ALL_COLUMNS = SUMMARY_COLUMNS + EXTRA_COLUMNS

ITERATION_DIR = "iteration-{n}"
ROW_FILE = "summary-row.json"
SUMMARY_FILE = "summary.csv"
FINDINGS_FILE = "findings.csv"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.html"
TABLES = ("samples", "events", "transfers", "load")


def iteration_dir(run_dir: str | os.PathLike, number: int) -> Path:
    """The folder of iteration ``number`` in a run folder."""
    return Path(run_dir) / ITERATION_DIR.format(n=number)


def table_path(directory: str | os.PathLike, name: str) -> Path | None:
    """Return ``<name>.csv`` or ``<name>.csv.gz`` in ``directory``, whichever exists, else None."""
    for candidate in (f"{name}.csv", f"{name}.csv.gz"):
        path = Path(directory) / candidate
        if path.exists():
            return path
    return None


def read_table(directory: str | os.PathLike, name: str, *, required: bool = True) -> pd.DataFrame:
    """Read table ``name`` (``.csv`` or ``.csv.gz``) of a result folder.

    Raises:
        ReplayError: ``required`` and the table is not there.
    """
    path = table_path(directory, name)
    if path is None:
        if required:
            raise ReplayError(f"{directory}: no {name}.csv or {name}.csv.gz")
        return pd.DataFrame()
    if path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def write_csv(frame: pd.DataFrame, path: str | os.PathLike, *, compress: bool = False) -> Path:
    """Write ``frame`` as CSV atomically; ``compress`` writes ``<path>.gz`` instead.

    Returns:
        The path written.
    """
    path = Path(path)
    data = frame.to_csv(index=False).encode()
    if compress:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(data)
        path = path.with_name(path.name + ".gz")
        data = buf.getvalue()
    atomic_write(path, data)
    return path


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON atomically."""
    path = Path(path)
    atomic_write(path, (json.dumps(data, indent=1, sort_keys=False, default=str) + "\n").encode())
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file.

    Raises:
        ReplayError: it is missing or not JSON.
    """
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ReplayError(f"{path}: not valid JSON: {exc}") from None


def summary_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Return the summary table for these rows: the contract's columns first, by iteration.

    Raises:
        ReplayError: a row lacks one of DESIGN.md's columns.
    """
    rows = list(rows)
    for row in rows:
        missing = [c for c in SUMMARY_COLUMNS if c not in row]
        if missing:
            raise ReplayError(f"summary row of iteration {row.get('iteration')}: missing {missing}")
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    ordered = [c for c in ALL_COLUMNS if c in frame.columns]
    ordered += [c for c in frame.columns if c not in ordered]
    return frame[ordered].sort_values("iteration").reset_index(drop=True)
