"""Where results go, the layout and the tables of a run folder, ``results/<run-id>/``.

One place names the default folders (the results folder, a replay run's folder,
an iteration's folder, a replay run's state folder), the files a run writes and
the columns of ``summary.csv`` (DESIGN.md's contract), reads a table whether it
was written plain or gzip-compressed, and writes tables atomically.

Words: a *replay run* is one ``labkit replay`` (its id names ``results/<run-id>/``);
an *iteration run* is one iteration end to end (:func:`labkit.run.run_iteration`),
into an iteration's folder; a *testbed run* is one netns testbed's life, from
``up`` to ``down`` (its own id, ``netns-<id>/`` in a state folder).
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

REPO = Path(__file__).resolve().parents[1]
RESULTS_ENV = "LABKIT_RESULTS_DIR"
REFERENCE_RUN = REPO / "results" / "reference"  # the committed replay run the notebooks compare with
ITERATION_DIR = "iteration-{n}"
ROW_FILE = "summary-row.json"
SUMMARY_FILE = "summary.csv"
FINDINGS_FILE = "findings.csv"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.html"
TABLES = ("samples", "events", "transfers", "load")


def results_root() -> Path:
    """The folder run folders go in by default: ``$LABKIT_RESULTS_DIR``, else the repository's ``results/``."""
    return Path(os.environ.get(RESULTS_ENV) or REPO / "results")


def replay_run_dir(run_id: str) -> Path:
    """The default folder of the replay run ``run_id``: ``results/<run-id>/``."""
    return results_root() / run_id


def iteration_dir(run_dir: str | os.PathLike, number: int) -> Path:
    """The folder of iteration ``number`` in a replay run's folder."""
    return Path(run_dir) / ITERATION_DIR.format(n=number)


def single_iteration_dir(kind: str, profile: str, number: int) -> Path:
    """The default folder of an iteration run outside a replay: ``results/<kind>-<profile>/iteration-<N>/``.

    Args:
        kind: who runs it: ``run`` (``labkit run``), ``notebook`` (a notebook run by hand).
        profile: how the folder names the profile (its name, or a profile file's stem).
        number: the iteration.
    """
    return iteration_dir(results_root() / f"{kind}-{profile}", number)


def replay_state_dir(run_id: str) -> Path:
    """The state folder of the replay run ``run_id``: ``replay-<run-id>/`` of the state directory.

    It holds the replay's own records (its process, its notebooks' kernels) and the
    state of the testbeds its notebooks build, so that tearing it down finds exactly them.
    """
    from labkit.cleanup import REPLAY_PREFIX
    from labkit.sysctls import state_dir

    return state_dir() / f"{REPLAY_PREFIX}{run_id}"


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
