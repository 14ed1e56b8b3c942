"""What one loadgen worker counts: outcomes, per-second series, latencies, the transfer table.

:class:`Tally` is the bookkeeping half of :mod:`labkit.loadgen.engine`: the
engine's loop decides when a transfer starts and how it ends; the tally counts
it (per outcome, per second, in the latency histogram), writes its row of the
per-transfer CSV, samples in-flight transfers and resident memory at the end
of each second, and turns it all into the JSON-able record parts that
:mod:`labkit.loadgen.result` reads.
"""

from __future__ import annotations

import csv
import logging
import math
import os

log = logging.getLogger(__name__)

OK = "ok"
HIST_SCALE = 100          # latency histogram: bucket = int(ln(microseconds) * HIST_SCALE), ~1 %
HIST_BUCKETS = 2400       # up to e**24 us: far beyond any deadline
TRANSFER_COLUMNS = ["worker", "transfer", "start_s", "end_s", "latency_ms", "outcome", "bytes",
                    "retransmits", "client_port", "server_port"]


class Tally:
    """The counters, series and per-transfer table of one worker's run.

    Args:
        t0: ``time.monotonic()`` of the run's second 0.
        worker: the worker's index (first column of the table).
        stop_at: the end of the run's window (``ok_in_window`` counts ends up to it).
        capture: keep the bytes of the first ok transfer (:attr:`content`, hex).
        transfers_path: write one CSV row per transfer there (None: no table).
    """

    def __init__(self, t0: float, worker: int, stop_at: float, capture: bool,
                 transfers_path: str | None) -> None:
        self.t0 = t0
        self.worker = worker
        self.stop_at = stop_at
        self.capture = capture
        self.counts = {"started": 0, OK: 0, "ok_in_window": 0, "skipped": 0, "retransmits": 0,
                       "duplicates": 0, "wrong_sender": 0, "ignored": 0}
        self.failed: dict[str, int] = {}
        self.series = {"started": [0], "completed": [0], "in_flight": [0], "rss_bytes": [0]}
        self.failed_series: dict[str, list] = {}
        self.hist = [0] * HIST_BUCKETS
        self.content = None
        self.end = None          # monotonic time of the last transfer's end
        self.closed = 0          # seconds before this one are sampled
        self.out = None
        self.writer = None
        if transfers_path:
            self.out = open(transfers_path, "w", newline="")
            self.writer = csv.writer(self.out)
            self.writer.writerow(TRANSFER_COLUMNS)

    @property
    def wants_ports(self) -> bool:
        """Whether :meth:`record` writes ports (the caller need not look them up otherwise)."""
        return self.writer is not None

    def record(self, t, outcome: str, now: float, client_port, server_port) -> None:
        """Count transfer ``t``'s one ``outcome`` (already verified), ended at ``now``."""
        sec = int(now - self.t0)
        self.end = now
        latency = now - t.start
        if outcome == OK:
            self.counts[OK] += 1
            if now <= self.stop_at:
                self.counts["ok_in_window"] += 1
            _bin(self.series["completed"], sec)
            micros = latency * 1e6
            bucket = int(math.log(micros) * HIST_SCALE) if micros > 1 else 0
            self.hist[min(bucket, HIST_BUCKETS - 1)] += 1
            if self.capture and self.content is None:
                self.content = bytes(t.buf).hex()
        else:
            self.failed[outcome] = self.failed.get(outcome, 0) + 1
            bins = self.failed_series.get(outcome)
            if bins is None:
                bins = self.failed_series[outcome] = [0] * len(self.series["started"])
            _bin(bins, sec)
        if self.writer is not None:
            self.writer.writerow([self.worker, t.id, round(t.start - self.t0, 6),
                                  round(now - self.t0, 6), round(latency * 1000, 3), outcome,
                                  t.nbytes, t.retransmits, client_port, server_port])

    def local_failure(self, now: float, exc: OSError) -> None:
        """Count a transfer that could not even open its socket as started and failed."""
        log.debug("cannot open a socket: %s", exc)
        self.counts["started"] += 1
        _bin(self.series["started"], int(now - self.t0))
        self.failed["local_error"] = self.failed.get("local_error", 0) + 1
        bins = self.failed_series.setdefault("local_error", [0] * len(self.series["started"]))
        _bin(bins, int(now - self.t0))

    def close_seconds(self, sec: int, in_flight: int) -> None:
        """Extend every series to second ``sec``; sample the seconds before it."""
        series = self.series
        for bins in (*series.values(), *self.failed_series.values()):
            if len(bins) <= sec:
                bins.extend([0] * (sec + 1 - len(bins)))
        rss = _rss_bytes()
        for i in range(self.closed, sec):
            series["in_flight"][i] = in_flight
            series["rss_bytes"][i] = rss
        self.closed = max(self.closed, sec)

    def close(self, now: float) -> None:
        """Sample the last second, cut the series to the seconds sampled, close the table."""
        self.close_seconds(int((self.end or now) - self.t0) + 1, 0)
        for series in (self.series, self.failed_series):
            for bins in series.values():
                del bins[self.closed:]
        if self.out:
            self.out.close()

    def progress(self, now: float, in_flight: int) -> dict:
        """The running totals a progress callback gets."""
        return {"worker": self.worker, "elapsed_s": now - self.t0,
                "started": self.counts["started"], "ok": self.counts[OK],
                "failed": sum(self.failed.values()), "in_flight": in_flight}

    def record_parts(self) -> dict:
        """The counting part of the engine's record (see :mod:`labkit.loadgen.result`)."""
        return {
            "counts": self.counts,
            "failed": self.failed,
            "series": self.series,
            "failed_series": self.failed_series,
            "latency_hist": {str(i): n for i, n in enumerate(self.hist) if n},
        }


def _bin(bins: list, sec: int) -> None:
    if sec >= len(bins):
        bins.extend([0] * (sec + 1 - len(bins)))
    bins[sec] += 1


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
