"""Run a load here (:func:`run_load`) or on any :class:`~labkit.host.Host` (:func:`run_load_on`).

:func:`run_load` runs in the calling process and its network namespace: one
worker in the calling thread, or ``spec.workers`` forked processes whose
records are merged.  :func:`run_load_on` runs ``python -m labkit loadgen ...
--json`` through ``host.run`` (``ip netns exec`` for a client namespace, SSH for
a remote client) and parses what it prints.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

from labkit.exceptions import CommandFailed, LabkitError, LoadgenError
from labkit.host import Host, LocalHost, NetnsHost
from labkit.loadgen.engine import OK, TRANSFER_COLUMNS, run_engine
from labkit.loadgen.result import LoadResult, merge_records, read_transfers
from labkit.util import atomic_write
from labkit.loadgen.spec import LoadSpec

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
# `labkit loadgen` exits with this when the run finished but no transfer was ok
NOTHING_OK_EXIT = 3
_PROGRESS_FIELDS = ("elapsed_s", "started", "ok", "failed", "in_flight")


def probe_file(spec: LoadSpec) -> dict:
    """Read the file once to learn its size and SHA-256.

    Returns:
        {"size": bytes, "sha256": hex digest}.

    Raises:
        LoadgenError: the one transfer failed (the reason is named).
    """
    once = spec.replace(concurrency=1, rate=None, count=1, duration=None, workers=1,
                        expected_size=None, sha256=None)
    record = run_engine(once, capture=True)
    if record["counts"][OK] != 1 or record["content"] is None:
        reason = ", ".join(record["failed"]) or "no outcome"
        raise LoadgenError(f"cannot read {spec.filename!r} from {spec.host}:{spec.port} "
                           f"to learn its size: {reason}")
    content = bytes.fromhex(record["content"])
    return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def run_load(spec: LoadSpec, *, transfers: bool | str = False,
             progress: Progress | None = None, keep_table: bool = False) -> LoadResult:
    """Run a load from this process (and its network namespace) and return its result.

    Args:
        spec: the load.  With ``expected_size`` None, one first transfer learns
            the size (reported as ``summary["probe"]``) and every transfer is
            checked against it.
        transfers: keep the per-transfer table (True), or write it as CSV to this
            path (atomically; no pandas needed: a lab machine's plain ``python3`` runs this).
        keep_table: keep the table in the result also when ``transfers`` is a path.
        progress: called about once a second with the running totals
            (elapsed_s, started, ok, failed, in_flight).

    Returns:
        The merged :class:`LoadResult`.

    Raises:
        LoadgenError: the spec cannot run here, the probe transfer failed, or
            a worker died.
    """
    probe = None
    if spec.expected_size is None:
        probe = probe_file(spec)
        spec = spec.replace(expected_size=probe["size"])
    # the workers' tables go beside the CSV asked for (a run's state folder, which `labkit clean`
    # empties after a crash), else to the temporary folder
    beside = os.path.dirname(os.path.abspath(transfers)) if isinstance(transfers, (str, os.PathLike)) else None
    tmpdir = tempfile.mkdtemp(prefix=".labkit-loadgen-", dir=beside) if transfers else None
    try:
        paths = [os.path.join(tmpdir, f"transfers-{i}.csv") if tmpdir else None
                 for i in range(spec.workers)]
        if spec.workers == 1:
            records = [run_engine(spec, transfers_path=paths[0], progress=progress)]
        else:
            records = _run_workers(spec, paths, progress)
        table = None
        if tmpdir:
            text = _concat_tables(paths)
            if isinstance(transfers, (str, os.PathLike)):
                atomic_write(transfers, text.encode())
            if transfers is True or keep_table:
                table = read_transfers(text)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return merge_records(records, table, probe)


def _concat_tables(paths: list[str | None]) -> str:
    """The workers' CSV tables as one, ordered by start time, worker and transfer (stdlib only).

    Raises:
        LoadgenError: a table's columns are not the loadgen's.
    """
    rows = []
    for path in paths:
        if not path or not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                continue
            if header != TRANSFER_COLUMNS:
                raise LoadgenError(f"not a loadgen transfers table: {path} has columns {header}, "
                                   f"expected {TRANSFER_COLUMNS}")
            rows.extend(reader)
    start, worker, transfer = (TRANSFER_COLUMNS.index(c) for c in ("start_s", "worker", "transfer"))
    rows.sort(key=lambda r: (float(r[start]), int(r[worker]), int(r[transfer])))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TRANSFER_COLUMNS)
    writer.writerows(rows)
    return out.getvalue()


def _run_workers(spec: LoadSpec, paths: list, progress: Progress | None) -> list[dict]:
    """Start one process per worker (same namespace), collect and return their records.

    Workers are forked when this process has one thread; with other threads
    alive (a notebook kernel, a monitor, ``in_netns``) they are spawned, since a
    fork could copy a lock another thread holds.  Either way a child starts
    from the calling thread and so in its network namespace.  Each worker sends
    ``("progress", totals)`` about once a second and ``("record", record)`` at the end.
    """
    forked = threading.active_count() == 1
    ctx = multiprocessing.get_context("fork" if forked else "spawn")
    parts = spec.split()
    # every worker starts its first second at the same moment (spawned ones need longer)
    t0 = time.monotonic() + (0.05 if forked else 2.0)
    procs, conns = [], []
    for i, part in enumerate(parts):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, name=f"labkit-loadgen-{i}",
                           args=(part, t0, i, paths[i], send))
        proc.start()
        send.close()
        procs.append(proc)
        conns.append(recv)
    records: dict[int, dict] = {}
    board: dict[int, dict] = {}
    pending = dict(zip(conns, range(len(parts))))
    interrupted = False
    try:
        while pending:
            try:
                for conn in multiprocessing.connection.wait(list(pending), timeout=1.0):
                    index = pending[conn]
                    try:
                        kind, body = conn.recv()
                    except EOFError:
                        del pending[conn]   # died without a record: reported below
                        continue
                    if kind == "record":
                        records[index] = body
                        del pending[conn]
                    else:
                        board[index] = body
                if progress is not None and board:
                    progress(_board_totals(board))
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True   # the workers end their transfers as "aborted" and report
                for proc in procs:
                    if proc.is_alive():
                        os.kill(proc.pid, signal.SIGINT)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()
    missing = [i for i in range(len(parts)) if i not in records]
    if missing:
        codes = {i: procs[i].exitcode for i in missing}
        raise LoadgenError(f"loadgen worker(s) {missing} died without a result (exit codes {codes})")
    failures = [r for r in records.values() if "error" in r]
    if failures:
        raise LoadgenError(f"loadgen worker {failures[0]['worker']}: {failures[0]['error']}")
    return [records[i] for i in range(len(parts))]


def _worker(spec: LoadSpec, t0: float, index: int, path: str | None, conn) -> None:
    """A worker process: run its share, report progress and then the record."""
    def report(p: dict) -> None:
        conn.send(("progress", p))

    try:
        record = run_engine(spec, t0=t0, worker=index, transfers_path=path, progress=report)
    except KeyboardInterrupt:
        record = {"worker": index, "error": "interrupted before it could start"}
    except Exception as exc:   # handed to the parent, which raises it as a LoadgenError
        record = {"worker": index, "error": str(exc)}
    conn.send(("record", record))
    conn.close()


def _board_totals(board: dict[int, dict]) -> dict:
    totals = {name: sum(p[name] for p in board.values()) for name in _PROGRESS_FIELDS}
    totals["elapsed_s"] = max(p["elapsed_s"] for p in board.values())
    return totals


def run_load_on(host: Host, spec: LoadSpec, *, transfers: bool = False, python: str | None = None,
                timeout: float | None = None, cgroup: str | os.PathLike | None = None,
                transfers_path: str | None = None, progress: Progress | None = None,
                progress_path: str | None = None) -> LoadResult:
    """Run a load on ``host`` (a client namespace, a remote machine) and return its result.

    Runs ``PYTHON -m labkit loadgen ... --json`` there; labkit must be
    importable by that Python.  The per-transfer table, when asked for, is
    written to a temporary file there, read back and removed.

    Args:
        host: where the load runs.
        spec: the load.
        transfers: also return the per-transfer table.
        python: the interpreter there; default this one for local hosts and
            namespaces, ``python3`` elsewhere.
        timeout: seconds before the command is ended; default the load's
            duration plus the transfer deadline plus a minute (None for a
            ``count`` load: it ends when its transfers do).
        cgroup: a cgroup of ``host``'s machine to run the loadgen in, so that whoever
            removes the cgroup ends it (and all it forks).  The command's shell writes
            itself into it before it enters the namespace (``ip netns exec`` hides
            ``/sys/fs/cgroup``) and becomes the loadgen.
        transfers_path: where the per-transfer CSV goes (default a file in ``/tmp``).
        progress: called from a helper thread with the running totals
            (elapsed_s, started, ok, failed, in_flight) about once a second
            while the load runs (read from a ``--progress`` file there).
        progress_path: where that file goes (default a file in ``/tmp``).

    Returns:
        The :class:`LoadResult`.

    Raises:
        CommandFailed: the command failed (its stderr is in the message).
        CommandTimedOut: it ran past ``timeout``.
        LoadgenError: its output was not a loadgen result.
    """
    local = isinstance(host, (LocalHost, NetnsHost))
    if python is None:
        python = sys.executable if local else "python3"
    argv = [python, "-m", "labkit", "loadgen", *spec.to_argv(), "--json"]
    path = None
    if transfers:
        path = transfers_path or f"/tmp/labkit-loadgen-{uuid.uuid4().hex}.csv"
        argv += ["--transfers", path]
    feed = None
    if progress is not None:
        feed = _ProgressFeed(host, progress_path or f"/tmp/labkit-progress-{uuid.uuid4().hex}.jsonl", progress)
        argv += ["--progress", feed.path]
    if timeout is None and spec.duration is not None:
        timeout = spec.duration + spec.deadline + 60.0
    runner = host
    if cgroup is not None:
        # the shell joins the cgroup, then becomes the loadgen (ip netns exec hides /sys/fs/cgroup):
        # run on the machine itself, with the namespace's prefix inside
        if isinstance(host, NetnsHost):
            argv, runner = ["ip", "netns", "exec", host.netns, *argv], LocalHost(host.name)
        elif local:
            runner = LocalHost(host.name)
        elif getattr(host, "parent", None) is not None and getattr(host, "prefix", None) is not None:
            argv, runner = [*host.prefix, *argv], host.parent  # a namespace view of a remote machine
        argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(os.fspath(cgroup), "cgroup.procs"),
                *argv]
    try:
        if feed:
            feed.start()
        result = runner.run(argv, timeout=timeout, check=False)
        if result.exit_code not in (0, NOTHING_OK_EXIT):
            raise CommandFailed(result)
        table = read_transfers(host.read_file(path).decode()) if path else None
    finally:
        try:
            if feed:
                feed.stop()
        finally:
            leftovers = [p for p in (path, feed.path if feed else None) if p]
            if leftovers and local:
                # removed here, not through the host: its namespace may be gone by now
                for leftover in leftovers:
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass
            elif leftovers:
                host.run(["rm", "-f", *leftovers], check=False, timeout=30)
    return LoadResult.from_json(result.stdout, transfers=table)


class _ProgressFeed(threading.Thread):
    """Follows a ``--progress`` file on a host and hands each new line to ``progress``.

    Reads the whole file about once a second (through ``host.read_file``: a
    local read for a namespace, SFTP for a remote host) and passes on the lines
    it has not passed on yet.  A missing file (the load has not started) is
    simply not read yet.  A callback that raises ends the thread, and the same
    error is raised again by :meth:`stop`'s last read, in the caller's thread.
    """

    def __init__(self, host: Host, path: str, progress: Progress, interval: float = 0.5):
        super().__init__(name="labkit-loadgen-progress", daemon=True)
        self.host, self.path, self.progress, self.interval = host, path, progress, interval
        self._halted = threading.Event()
        self._seen = 0

    def run(self) -> None:
        while not self._halted.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        import json

        try:
            text = self.host.read_file(self.path).decode()
        except (OSError, LabkitError):
            return  # not written yet
        lines = text.splitlines()
        complete = lines if text.endswith("\n") else lines[:-1]
        for line in complete[self._seen:]:
            self.progress(json.loads(line))
        self._seen = max(self._seen, len(complete))

    def stop(self) -> None:
        """Stop following (after one last read)."""
        self._halted.set()
        if self.is_alive():
            self.join(5)
        self._poll()
