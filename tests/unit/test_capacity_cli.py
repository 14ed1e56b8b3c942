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
