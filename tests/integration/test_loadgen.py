"""The load generator against a real in.tftpd in its own namespace, counted on both sides."""

import json
import subprocess
import sys

import pytest

from tests.conftest import need_program, need_root, unique_name
from labkit.host import in_netns
from labkit.loadgen import LoadSpec, run_load, run_load_on
from labkit.loadgen.pair import TftpPair

pytestmark = pytest.mark.integration


@pytest.fixture
def pair():
    need_root()
    need_program("ip", "iptables", "in.tftpd", "ss")
    with TftpPair(unique_name("lk")[:9]) as p:
        yield p


def _spec(pair, **kw):
    kw.setdefault("expected_size", pair.size)
    return LoadSpec(pair.host, pair.port, pair.filename, **kw)


def test_ok_count_matches_the_servers_last_data_packets(pair):
    result = run_load_on(pair.client, _spec(pair, sha256=pair.sha256, count=3000, concurrency=32),
                         transfers=True)
    s = result.summary
    assert s["started"] == 3000
    assert s["ok"] + s["failed"] == 3000
    assert s["ok"] >= 2970, s["by_reason"]
    server_count = pair.last_data_count()
    assert abs(server_count - s["ok"]) <= 0.01 * s["ok"], (server_count, s["ok"])
    table = result.transfers
    assert len(table) == 3000
    assert (table["outcome"] == "ok").sum() == s["ok"]
    assert (table.loc[table["outcome"] == "ok", "bytes"] == pair.size).all()
    # every transfer from its own socket: concurrent transfers never share a client port
    assert table["client_port"].nunique() > 32
    assert s["verified"] == "size+sha256"


def test_workers_merge_and_series_add_up(pair):
    result = run_load_on(pair.client, _spec(pair, duration=1.5, concurrency=16, workers=2),
                         transfers=True)
    s = result.summary
    assert s["workers"] == 2 and len(result.workers) == 2
    table = result.transfers
    assert len(table) == s["started"] and set(table["worker"]) == {0, 1}
    assert (table["outcome"] == "ok").sum() == s["ok"]
    assert all(w["ok"] > 0 for w in result.workers)
    assert s["ok"] == sum(w["ok"] for w in result.workers)
    ts = result.timeseries
    assert set(ts.columns) == {"time", "elapsed_s", "metric", "value"}
    per_metric = ts.groupby("metric")["value"].sum()
    assert per_metric["started"] == s["started"]
    assert per_metric["completed"] == s["ok"]
    assert per_metric["failed"] == s["failed"]
    assert 1.4 < s["duration_s"] < 5 and s["window_s"] == 1.5
    assert s["ok"] - 16 <= s["ok_in_window"] <= s["ok"]   # at most those in flight at the end
    assert s["transfers_per_s"] == pytest.approx(s["ok_in_window"] / 1.5)


def test_missing_file_is_counted_as_error_1(pair):
    result = run_load_on(pair.client, LoadSpec(pair.host, 69, "no-such-file", expected_size=5,
                                               count=20, concurrency=4))
    assert result.summary["ok"] == 0
    assert result.summary["by_reason"] == {"error_1": 20}


def test_wrong_expected_size_fails_every_transfer(pair):
    result = run_load_on(pair.client, _spec(pair, expected_size=pair.size + 1, count=10,
                                            concurrency=2))
    assert result.summary["by_reason"] == {"short": 10}


def test_options_are_negotiated_with_in_tftpd(pair):
    result = run_load_on(pair.client, _spec(pair, count=200, concurrency=8, blksize=1428,
                                            tsize=True, sha256=pair.sha256))
    # 1428-byte DATA packets would be 'oversized' had the OACK not been taken up
    assert result.summary["ok"] == 200
    assert result.summary["by_reason"] == {}


def test_python_api_in_a_namespace_thread_with_spawned_workers(pair):
    # other threads are alive here, so the workers are spawned; they reach the server only
    # from the client namespace, which they inherit from the calling thread
    spec = _spec(pair, count=400, concurrency=8, workers=2)
    result = in_netns(pair.client_ns, run_load, spec)
    assert result.summary["ok"] == 400
    assert pair.last_data_count() == 400


def test_size_is_learned_when_not_given(pair):
    out = pair.client.run([sys.executable, "-m", "labkit", "loadgen", pair.host, "69",
                           pair.filename, "--count", "50", "-c", "5", "--json"]).stdout
    summary = json.loads(out)["summary"]
    assert summary["ok"] == 50
    assert summary["probe"] == {"size": pair.size, "sha256": pair.sha256}


def test_human_output_when_not_on_a_terminal(pair):
    proc = subprocess.run(["ip", "netns", "exec", pair.client_ns, sys.executable, "-m", "labkit",
                           "loadgen", pair.host, "69", pair.filename, "-n", "20", "-c", "2"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("ok 20  failed 0")
    assert "\r" not in proc.stderr     # no progress line off a terminal


def test_open_loop_offers_the_rate_it_was_given(pair):
    result = run_load_on(pair.client, _spec(pair, rate=400.0, duration=2.0))
    s = result.summary
    assert s["started"] == 800 and s["skipped"] == 0
    assert s["ok"] >= 792, s["by_reason"]          # a busy machine may lose a few
    assert s["transfers_per_s"] == pytest.approx(400, rel=0.05)
    per_second = result.timeseries.query("metric == 'started'")["value"].tolist()
    assert per_second[:2] == [pytest.approx(400, abs=20)] * 2   # a late wake catches up


def test_a_port_range_gives_every_transfer_a_port_unused_for_the_longest_time(pair):
    result = run_load_on(pair.client, _spec(pair, count=1500, concurrency=32,
                                            ports=(20000, 20999)), transfers=True)
    assert result.summary["ok"] == 1500
    table = result.transfers.sort_values("transfer")
    assert table["client_port"].between(20000, 20999).all()
    assert table["client_port"].head(1000).nunique() == 1000   # no port twice in a cycle
