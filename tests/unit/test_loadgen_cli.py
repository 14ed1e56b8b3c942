"""``labkit loadgen`` as a user runs it: progress on a terminal, Ctrl-C, JSON through a Host."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from labkit.host import LocalHost
from labkit.loadgen import LoadSpec, run_load_on
from tests.unit.tftp_peer import ScriptedServer

CONTENT = bytes(range(256)) * 20       # 5120 bytes: ends with an empty block


@pytest.fixture
def slow_server():
    with ScriptedServer(CONTENT, pace=0.02) as server:   # ~0.25 s per transfer
        yield server


def _argv(server, *extra):
    return [sys.executable, "-m", "labkit", "loadgen", "127.0.0.1", str(server.port), "f",
            "--size", str(len(CONTENT)), *extra]


def _wait_for_load(server, requests: int) -> None:
    """Until the load is well under way (a busy machine starts Python slowly)."""
    give_up = time.monotonic() + 20
    while len(server.requests) < requests and time.monotonic() < give_up:
        time.sleep(0.05)
    time.sleep(0.2)


def test_a_terminal_gets_a_live_progress_line(slow_server):
    main, sub = pty.openpty()
    proc = subprocess.Popen(_argv(slow_server, "-c", "4", "-d", "2.2"), stderr=sub,
                            stdout=subprocess.PIPE, text=True)
    os.close(sub)
    seen = b""
    while proc.poll() is None or select.select([main], [], [], 0)[0]:
        if select.select([main], [], [], 0.2)[0]:
            try:
                seen += os.read(main, 4096)
            except OSError:
                break
    os.close(main)
    out = proc.stdout.read()
    assert proc.wait(timeout=10) == 0
    assert seen.count(b"\r\x1b[K") >= 2 and b"in flight" in seen   # redrawn, then cleared
    assert out.startswith("ok ")


def test_ctrl_c_ends_the_run_with_what_it_counted(slow_server):
    proc = subprocess.Popen(_argv(slow_server, "-c", "4", "-d", "30", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_load(slow_server, 8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    s = json.loads(out)["summary"]
    assert s["interrupted"] is True
    assert s["ok"] >= 1
    assert 1 <= s["by_reason"].get("aborted", 0) <= 4
    assert s["started"] == s["ok"] + s["failed"]


def test_ctrl_c_reaches_every_worker(slow_server):
    proc = subprocess.Popen(_argv(slow_server, "-c", "4", "-w", "2", "-d", "30", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_load(slow_server, 8)
    os.kill(proc.pid, signal.SIGINT)        # the parent only: it tells its workers
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["summary"]["interrupted"] is True
    assert [w["ok"] > 0 for w in doc["workers"]] == [True, True]


def test_run_load_on_a_host_parses_the_json_and_the_table(slow_server, monkeypatch):
    import uuid

    fixed = uuid.UUID(int=int(time.time() * 1e6))
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    spec = LoadSpec("127.0.0.1", slow_server.port, "f", expected_size=len(CONTENT), count=6,
                    concurrency=3)
    result = run_load_on(LocalHost(), spec, transfers=True)
    assert result.summary["ok"] == 6
    assert list(result.transfers["outcome"]) == ["ok"] * 6
    assert not os.path.exists(f"/tmp/labkit-loadgen-{fixed.hex}.csv")   # removed there


def test_nothing_ok_exits_3(slow_server):
    proc = subprocess.run(_argv(slow_server, "-n", "2", "-c", "1")[:-2] + ["--size", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 3
    assert "ok 0  failed 2 (oversized 2)" in proc.stdout


def test_a_bad_option_is_refused_with_the_field():
    proc = subprocess.run([sys.executable, "-m", "labkit", "loadgen", "10.0.0.1", "69", "f",
                           "--blksize", "3"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "'blksize': must be a whole number 8-65464" in proc.stderr


def test_out_writes_summary_series_and_transfers(slow_server, tmp_path):
    import pandas as pd

    out = tmp_path / "run"
    proc = subprocess.run(_argv(slow_server, "-n", "6", "-c", "3", "--out", str(out)),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "timeseries.csv",
                                                     "transfers.csv"]
    assert json.loads((out / "summary.json").read_text())["summary"]["ok"] == 6
    table = pd.read_csv(out / "transfers.csv")
    assert list(table["outcome"]) == ["ok"] * 6 and (table["bytes"] == len(CONTENT)).all()
    series = pd.read_csv(out / "timeseries.csv")
    assert series.query("metric == 'completed'")["value"].sum() == 6


def test_run_load_on_hands_the_running_totals_to_a_progress_callback(slow_server):
    seen = []
    feeds = {f for f in os.listdir("/tmp") if f.startswith("labkit-progress-")}
    spec = LoadSpec("127.0.0.1", slow_server.port, "f", expected_size=len(CONTENT), concurrency=4, duration=3.2)
    before = time.time()
    result = run_load_on(LocalHost(), spec, progress=seen.append)
    after = time.time()
    assert len(seen) >= 2, seen   # about once a second, while it ran
    assert [p["elapsed_s"] for p in seen] == sorted(p["elapsed_s"] for p in seen)
    assert all(set(p) == {"elapsed_s", "started", "ok", "failed", "in_flight", "at"} for p in seen)
    assert all(before < p["at"] < after for p in seen)  # when the load had them: a chart places them there
    assert 0 < seen[-1]["ok"] <= result.summary["ok"]
    assert {f for f in os.listdir("/tmp") if f.startswith("labkit-progress-")} <= feeds  # its own was removed


def test_the_progress_file_gets_one_json_line_a_second(slow_server, tmp_path):
    feed = tmp_path / "progress.jsonl"
    proc = subprocess.run(_argv(slow_server, "-c", "4", "-d", "2.5", "--progress", str(feed)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in feed.read_text().splitlines()]
    assert len(lines) >= 2 and lines[-1]["ok"] > 0
    gaps = [b["at"] - a["at"] for a, b in zip(lines, lines[1:])]
    assert all(0.5 < g < 1.6 for g in gaps), gaps


def test_a_load_on_another_machine_joins_its_cgroup_there_before_entering_the_namespace(slow_server, tmp_path):
    """A namespace view of a machine reached over SSH: the loadgen's shell runs on that machine
    (the view's parent), writes itself into the cgroup, then enters the namespace (the prefix)."""
    from labkit.host import Host, run_subprocess

    class Machine(Host):  # runs what it is given (here, locally), like SSHHost does there
        name, commands = "root@lab", []

        def _run(self, cmd, *, timeout, input, env):
            argv = [str(c) for c in cmd]
            Machine.commands.append(argv)
            return run_subprocess(argv, " ".join(argv), self.name, timeout=timeout, input=input, env=env)

        def read_file(self, path):
            with open(path, "rb") as f:
                return f.read()

        def write_file(self, path, data, mode=None):
            raise AssertionError("not used")

    class View(Machine):  # the client namespace there: its commands go through the machine with a prefix
        name = "client"

        def __init__(self, parent):
            self.parent, self.prefix, self.netns = parent, ["env", "LABKIT_TEST_NETNS=client"], "lkx-client"

        def _run(self, cmd, **kw):  # what runs in the namespace: through the machine, after the prefix
            return self.parent._run([*self.prefix, *cmd], **kw)

    cgroup = tmp_path / "lkx-loadabc"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text("")
    spec = LoadSpec("127.0.0.1", slow_server.port, "f", expected_size=len(CONTENT), count=4, concurrency=2)
    result = run_load_on(View(Machine()), spec, transfers=True, cgroup=cgroup, python=sys.executable,
                         transfers_path=str(tmp_path / "load.csv"))
    assert result.summary["ok"] == 4 and len(result.transfers) == 4
    argv = Machine.commands[0]
    assert argv[:4] == ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs")]
    assert argv[4:7] == ["env", "LABKIT_TEST_NETNS=client", sys.executable]
    assert (cgroup / "cgroup.procs").read_text().strip().isdigit()  # the shell, which became the loadgen
    assert not (tmp_path / "load.csv").exists()  # removed there
