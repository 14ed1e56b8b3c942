"""LoadSpec validation and its command-line form; merging and serialising results."""

import json

import pytest

from labkit.cli import build_parser
from labkit.exceptions import LoadgenError
from labkit.loadgen import LoadResult, LoadSpec
from labkit.loadgen.loadgen_cli import format_summary, spec_from_args
from labkit.loadgen.engine import HIST_SCALE
from labkit.loadgen.result import merge_records, percentile


def test_defaults_are_a_closed_loop_of_ten_seconds_without_options():
    spec = LoadSpec("10.0.0.1", 69, "f")
    assert (spec.mode, spec.concurrency, spec.duration, spec.options) == ("closed", 16, 10.0, {})


@pytest.mark.parametrize("kw, words", [
    ({"host": "node-1"}, "'host': must be an IPv4"),
    ({"port": 0}, "'port'"),
    ({"filename": ""}, "'filename'"),
    ({"concurrency": 4, "rate": 100.0}, "exactly one of 'concurrency'"),
    ({"duration": 5, "count": 10}, "exactly one of 'duration'"),
    ({"concurrency": 0}, "'concurrency': must be a whole number >= 1"),
    ({"rate": -1.0}, "'rate': must be a number > 0"),
    ({"timeout": 0}, "'timeout'"),
    ({"retries": -1}, "'retries'"),
    ({"sha256": "abc"}, "64 hex digits"),
    ({"blksize": 4}, "'blksize': must be a whole number 8-65464"),
    ({"windowsize": 0}, "'windowsize'"),
    ({"concurrency": 2, "workers": 3}, "at least 'workers'"),
    ({"bind": "x"}, "'bind'"),
    ({"ports": (2000, 1000)}, "'ports': must be \\(low, high\\)"),
    ({"ports": (1000, 1009), "concurrency": 11}, "one port per transfer in flight"),
])
def test_bad_specs_are_refused_naming_the_field(kw, words):
    args = {"host": "10.0.0.1", "port": 69, "filename": "f", **kw}
    with pytest.raises(LoadgenError, match=words):
        LoadSpec(**args)


def test_split_shares_out_the_load_exactly():
    parts = LoadSpec("10.0.0.1", 69, "f", concurrency=10, count=101, workers=3).split()
    assert [p.concurrency for p in parts] == [4, 3, 3]
    assert [p.count for p in parts] == [34, 34, 33]
    open_parts = LoadSpec("10.0.0.1", 69, "f", rate=900.0, max_in_flight=100, workers=2).split()
    assert [p.rate for p in open_parts] == [450.0, 450.0]
    assert [p.max_in_flight for p in open_parts] == [50, 50]
    ranged = LoadSpec("10.0.0.1", 69, "f", concurrency=4, ports=(1024, 65535), workers=3).split()
    assert [p.ports for p in ranged] == [(1024, 22527), (22528, 44031), (44032, 65535)]


@pytest.mark.parametrize("spec", [
    LoadSpec("10.0.0.1", 30069, "f5k", expected_size=5000, sha256="ab" * 32, concurrency=64,
             count=1000, workers=2, blksize=1428, tsize=True, windowsize=4, option_timeout=3,
             bind="10.0.0.2", timeout=0.5, retries=5, deadline=4.0, ports=(1024, 65535)),
    LoadSpec("10.0.0.1", 69, "f", rate=8500.0, max_in_flight=300, duration=30.0),
])
def test_the_command_line_form_gives_back_the_same_spec(spec):
    args = build_parser().parse_args(["loadgen", *spec.to_argv()])
    assert spec_from_args(args) == spec


def _record(worker, started, completed, failed, lat_buckets, cpu=(1.0, 2.0)):
    n = len(started)
    return {"worker": worker, "spec": LoadSpec("10.0.0.1", 69, "f", expected_size=5,
                                               concurrency=4, duration=2.0).__dict__,
            "t0_wall": 1000.0, "duration_s": 2.0 + worker * 0.1,
            "counts": {"started": sum(started), "ok": sum(completed), "skipped": 0,
                       "ok_in_window": sum(completed) - 1,
                       "retransmits": 1, "duplicates": 0, "wrong_sender": 0, "ignored": 0},
            "failed": {k: sum(v) for k, v in failed.items()},
            "series": {"started": started, "completed": completed, "in_flight": [4] * n,
                       "rss_bytes": [100] * n},
            "failed_series": failed,
            "latency_hist": {str(b): c for b, c in lat_buckets.items()},
            "cpu_user_s": cpu[0], "cpu_sys_s": cpu[1], "maxrss_kb": 5000 + worker,
            "interrupted": False, "content": None}


def test_records_of_workers_merge_into_one_result():
    a = _record(0, [10, 8], [9, 8], {"timeout": [0, 1]}, {460: 16, 700: 1})
    b = _record(1, [5, 6, 2], [5, 6, 1], {"error_1": [0, 0, 1]}, {460: 12})
    result = merge_records([b, a])
    s = result.summary
    assert (s["ok"], s["failed"], s["started"], s["workers"]) == (29, 2, 31, 2)
    assert s["by_reason"] == {"error_1": 1, "timeout": 1}
    assert s["duration_s"] == pytest.approx(2.1)
    # over the 2 s window: one ok of each worker ended after it
    assert (s["window_s"], s["ok_in_window"]) == (2.0, 27)
    assert s["transfers_per_s"] == pytest.approx(27 / 2.0)
    assert s["ok_per_cpu_s"] == pytest.approx(29 / 6.0)
    assert result.series["started"] == [15, 14, 2]
    assert result.spec["concurrency"] == 8
    ts = result.timeseries
    wide = ts.pivot(index="elapsed_s", columns="metric", values="value")
    assert list(wide["failed"]) == [0, 1, 1]
    assert list(wide["failed_timeout"]) == [0, 1, 0]
    assert list(wide["in_flight"]) == [8, 8, 4]
    assert list(ts.loc[ts.metric == "started", "time"]) == [1000.0, 1001.0, 1002.0]


def test_percentiles_come_from_the_log_histogram():
    hist = {int(7.0 * HIST_SCALE): 90, int(9.0 * HIST_SCALE): 10}   # e**7 us and e**9 us
    assert percentile(hist, 50) == pytest.approx(1.0966, rel=0.01)
    assert percentile(hist, 90) == pytest.approx(1.0966, rel=0.01)
    assert percentile(hist, 99) == pytest.approx(8.1031, rel=0.01)
    assert percentile({}, 50) is None


def test_json_round_trip_and_files(tmp_path):
    result = merge_records([_record(0, [3], [3], {}, {460: 3})])
    again = LoadResult.from_json(result.to_json())
    assert again.summary == json.loads(json.dumps(result.summary))
    assert again.latency_hist == result.latency_hist
    paths = result.write(tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["summary.json", "timeseries.csv"]
    assert json.loads(paths["summary"].read_text())["summary"]["ok"] == 3
    assert "ok 3  failed 0 (none)" in format_summary(result.summary)


def test_text_that_is_not_a_result_is_refused_with_its_start():
    with pytest.raises(LoadgenError, match="not a loadgen JSON result.*Traceback"):
        LoadResult.from_json("Traceback (most recent call last): ...")
