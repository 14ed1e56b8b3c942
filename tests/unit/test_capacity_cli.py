"""``labkit size`` as a user runs it: the prediction, the recommendation, kube-proxy's figure, and bad
input refused with the option named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit.cli import main

SLABINFO = Path(__file__).parent.parent / "data" / "slabinfo-6.18-idle.txt"
ARTICLE = ["size", "--rate", "5800", "--node-udp-timeout", "10", "--pod-udp-timeout", "10", "--pods", "2",
           "--max", "524288", "--expect-max", "8192", "--cores", "8", "--slabinfo", str(SLABINFO)]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_article_numbers_fit_and_kube_proxy_is_shown(capsys):
    code, out, _ = run(capsys, *ARTICLE)
    assert code == 0
    assert "node: 127,600 entries" in out and "fits" in out
    assert "nf_conntrack_max = 191488" in out
    assert "kube-proxy on 8 core(s) sets nf_conntrack_max = max(32768 x 8, 131072) = 262,144" in out
    assert "256 B (nf_conntrack slab in" in out


def test_iteration_7_of_the_lab_is_called_full_in_the_pod(capsys):
    code, out, _ = run(capsys, "size", "--rate", "285", "--node-udp-timeout", "3", "--pod-udp-timeout", "30",
                       "--max", "12928", "--expect-max", "204", "--profile", "lab", "--slabinfo", str(SLABINFO))
    assert code == 0
    assert "measured by profile lab's calibration" in out
    with_tables = out.split("Recommended")[0]
    assert "each pod: 12,928 entries" in with_tables and "FILLS" in with_tables
    assert "pods: UDP timeout 30 s -> 3 s" in out


def test_json_output_has_the_three_parts(capsys):
    code, out, _ = run(capsys, *ARTICLE, "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["prediction"]["node_fills"] is False
    assert doc["recommendation"]["conntrack_max"] == 191488
    assert doc["kube_proxy"]["conntrack_max"] == 262144


def test_a_cap_too_small_is_said_not_crashed(capsys):
    code, out, _ = run(capsys, "size", "--rate", "100000", "--cap", "1000", "--slabinfo", str(SLABINFO))
    assert code == 0
    assert "Recommended: nothing fits" in out and "raise it above 1000" in out


@pytest.mark.parametrize("argv, names", [
    (["--rate", "-5"], "argument --rate: must be > 0"),
    (["--rate", "0"], "argument --rate: must be > 0"),
    (["--rate", "abc"], "argument --rate: must be a number"),
    (["--rate", "100", "--node-udp-timeout", "0"], "argument --node-udp-timeout: must be > 0"),
    (["--rate", "100", "--pod-udp-timeout", "0"], "argument --pod-udp-timeout: must be > 0"),
    (["--rate", "100", "--pods", "1.5"], "argument --pods: must be an integer"),
    (["--rate", "100", "--headroom", "-1"], "argument --headroom: must be >= 0"),
    (["--rate", "100", "--lifetimes", "30:57"], "argument --lifetimes: give at least two"),
    (["--rate", "100", "--bogus", "1"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: --rate"),
])
def test_bad_input_is_refused_naming_the_option(capsys, argv, names):
    with pytest.raises(SystemExit) as info:
        main(["size", *argv])
    assert info.value.code == 2
    assert names in capsys.readouterr().err


def test_bad_values_past_the_parser_name_the_field(capsys, tmp_path):
    bad = tmp_path / "slabinfo"
    bad.write_text("not slabinfo\n")
    code, _, err = run(capsys, "size", "--rate", "10", "--slabinfo", str(bad))
    assert code == 1 and "not /proc/slabinfo" in err
    code, _, err = run(capsys, "size", "--rate", "10", "--profile", "quick")
    assert code == 1 and "profile: profile 'quick' has no measured lifetimes" in err
    code, _, err = run(capsys, "size", "--rate", "10", "--stream-entries", "3")
    assert code == 1 and "stream_entries: must be <= entries" in err


REFERENCE = Path(__file__).parent.parent.parent / "results" / "reference"


def _run_with_past(tmp_path, name, changes=None):
    """The reference run's summary with slab samples and iterations 10-12, as a replay of 1-12 writes it."""
    import pandas as pd

    s = pd.read_csv(REFERENCE / "summary.csv")
    s["slab_lab_bytes_peak"] = s["peak_node_count"].astype(float) * 256 + s["peak_pod_count"] * s["replicas"] * 256
    eight, two = s[s.iteration == 8].iloc[0].to_dict(), s[s.iteration == 2].iloc[0].to_dict()
    past = [{**eight, "iteration": 10, "pods_track_conntrack": False, "peak_pod_count": 0, "mean_pod_count": 0.0,
             "slab_lab_bytes_peak": eight["peak_node_count"] * 256.0},
            {**eight, "iteration": 11, "node_notrack": True, "transfers_ok": 0, "transfers_failed": 700,
             "transfers_per_s": 0.0, "peak_node_count": 1, "mean_node_count": 1.0, "node_nodeport_entries": 0,
             "peak_pod_count": 0, "mean_pod_count": 0.0,
             "slab_lab_bytes_peak": 2000.0},
            {**two, "iteration": 12, "proxy_mode": "nftables"}]
    s = pd.concat([s, pd.DataFrame(past)], ignore_index=True)
    for (number, column), value in (changes or {}).items():
        s.loc[s.iteration == number, column] = value
    run = tmp_path / name
    run.mkdir()
    s.drop(columns=[c for c in s.columns if c.startswith("predicted_")], errors="ignore").to_csv(
        run / "summary.csv", index=False)
    return run


def test_model_check_of_three_runs_holds_and_says_so(capsys, tmp_path):
    runs = [str(_run_with_past(tmp_path, f"run{i}")) for i in range(3)]
    code, out, _ = run(capsys, "model-check", *runs)
    assert code == 0, out
    assert out.count("holds  fills / does-not-fill right for every namespace") == 3
    assert out.count("F10    pass") == 3 and "every claim holds in every run" in out


def test_model_check_names_the_run_and_the_claim_that_fails(capsys, tmp_path):
    good = _run_with_past(tmp_path, "good")
    # a slab that measured twice what the model says for iteration 8
    bad = _run_with_past(tmp_path, "bad", {(8, "slab_lab_bytes_peak"): 2 * 2533.5 * 256 * 2})
    code, out, _ = run(capsys, "model-check", str(good), str(bad))
    assert code == 1
    part = out.split(f"== {bad}")[1]
    assert "FAILS  memory within 25% of the slab at the peak" in part and "beyond: 8 -" in part
    # a run of the article's nine only has no F8-F10: it cannot show them
    code, out, _ = run(capsys, "model-check", str(REFERENCE))
    assert code == 1 and "F8-F10 not run" in out


def test_model_check_refuses_a_folder_without_a_summary(capsys, tmp_path):
    code, _, err = run(capsys, "model-check", str(tmp_path))
    assert code == 1 and "RUN_DIR" in err and "summary.csv" in err


def test_model_check_recompute_predicts_again_with_the_calibration_the_run_kept(capsys, tmp_path):
    """A run whose summary.csv holds an older model's columns: --recompute replaces them with this
    model's, using the calibration of the profile file the run kept (not the built-in profile's)."""
    import pandas as pd

    run_dir = _run_with_past(tmp_path, "old")
    s = pd.read_csv(run_dir / "summary.csv")
    s["predicted_node_fills"], s["predicted_pod_fills"] = False, False  # an older model's wrong calls
    s["predicted_node_count"], s["predicted_pod_count"] = 1.0, 1.0
    s.to_csv(run_dir / "summary.csv", index=False)
    code, out, _ = run(capsys, "model-check", str(run_dir))
    assert code == 1 and "FAILS  steady count within 25%" in out  # read as written
    (run_dir / "profile-lab.yaml").write_text(
        "name: lab\nrun: {duration_s: 50, cooldown_s: 5, concurrency: 64, file_size: 5120}\n"
        "calibration: {capacity_transfers_per_s: 285.0}\n")
    code, out, _ = run(capsys, "model-check", "--recompute", str(run_dir))
    assert "holds  fills / does-not-fill right for every namespace: wrong: none; unchecked: none" in out, out
    assert "holds  steady count within 25%" in out and code == 0, out
