"""The summary and the index say which lab profile a run used and why (no kernel needed)."""

from __future__ import annotations

import json

import pandas as pd

from labkit.replay import index as index_page
from labkit.summary import RunSummary

CHECK = {"cores": 1.0, "cpu_limit": 0.175, "tolerance": 0.15, "differs": True,
         "measured": {"name": "check-T3", "udp_timeout": 3, "replicas": 1, "transfers_per_s": 151.0,
                      "peak_node_count": 1300, "lifetime": 7.4, "failed": 0},
         "basis": {"cores": 2.0, "cpu_limit": 0.35, "capacity": 285.0, "check_capacity": 303.0,
                   "lifetimes": {"30": 57.7, "10": 20.6, "3": 7.3}, "peak_t10": 6335.0},
         "reasons": ["one pod served 151 transfers/s where the profile's machine served 303 (0.50x, more than 15% apart)"],
         "derivation": [{"sysctl": "net.netfilter.nf_conntrack_max", "article": 131072, "committed": 3264,
                         "lab": 1664, "why": "iteration 2: ..."}]}


def _run(tmp_path, manifest):
    pd.DataFrame([{"iteration": 2, "transfers_per_s": 50.0}]).to_csv(tmp_path / "summary.csv", index=False)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_a_derived_profile_is_named_with_the_measurement_and_each_value_beside_the_committed(tmp_path):
    (tmp_path / "profile-lab.yaml").write_text("name: lab\n")
    run = _run(tmp_path, {"profile": "lab", "calibration": CHECK,
                          "profile_used": "/somewhere/else/profile-lab.yaml"})
    summary = RunSummary(run)
    assert summary.profile == str(tmp_path / "profile-lab.yaml")  # found beside the run, wherever it moved
    text = summary.calibration().data
    assert "derived for this machine" in text and "151 transfers/s" in text and "303/s" in text
    assert "| nf_conntrack_max | 131072 | 3264 | **1664** |" in text


def test_a_machine_within_tolerance_uses_the_committed_profile(tmp_path):
    same = {**CHECK, "differs": False, "reasons": [], "derivation": None}
    text = RunSummary(_run(tmp_path, {"profile": "lab", "calibration": same, "profile_used": "lab"})).calibration().data
    assert "the committed `lab` profile" in text and "Within tolerance" in text


def test_the_index_says_which_profile_and_why_and_that_flows_failed(tmp_path):
    manifest = {"profile": "lab", "calibration": CHECK, "iterations_requested": [],
                "background_flows": [{"started": "t0", "failed": "t1", "error": "OSError: [Errno 5] boom"},
                                     {"started": "t2"}]}
    html = index_page.render(tmp_path, manifest)
    assert "profile-lab.yaml" in html and "served 151 transfers/s" in html
    assert "differs from the committed lab profile" in html
    assert "OSError: [Errno 5] boom" in html and html.count("failed</span>") == 1


def test_the_index_gives_no_article_rate_past_the_article(tmp_path):
    """Iterations 10-12 have no article numbers: the index says '-', not a rate of 0."""
    manifest = {"profile": "lab", "iterations_requested": [9, 10], "iterations": {
        "9": {"status": "ok", "row": {"title": "two pods", "transfers_per_s": 459.0, "article_transfers_per_s": 5800}},
        "10": {"status": "ok", "row": {"title": "untracked pods", "transfers_per_s": 225.0,
                                       "article_transfers_per_s": 0}}}}
    html = index_page.render(tmp_path, manifest)
    row9 = html.split("<td>9</td>")[1].split("</tr>")[0]
    row10 = html.split("<td>10</td>")[1].split("</tr>")[0]
    assert '<td class="num">5800</td>' in row9
    assert '<td class="num">225</td>' in row10 and '<td class="num">-</td>' in row10
    assert '<td class="num">0</td>' not in row10


def test_a_run_on_another_machine_names_that_machines_kernel_beside_the_notebooks(tmp_path):
    """``--on vagrant:lab``: the story's kernel is the VM's (6.1), not the laptop's where the notebooks ran."""
    manifest = {"profile": "lab", "on": "vagrant:lab", "run_id": "r1", "iterations_requested": [2],
                "environment": {"kernel": "6.18.44", "distro": "Debian 13", "cpus": 2, "hostname": "laptop"},
                "testbed_machine": {"name": "vagrant:lab", "kernel": "6.1.0-50-amd64",
                                    "distro": "Debian GNU/Linux 12 (bookworm)", "cpus": 2}}
    summary = RunSummary(_run(tmp_path, manifest))
    intro = summary.intro().data
    assert "the testbed on `vagrant:lab`: Linux 6.1.0-50-amd64 (Debian GNU/Linux 12 (bookworm)) on 2 CPUs" in intro
    assert "the notebooks on laptop: Linux 6.18.44" in intro
    table = summary.environment()["value"]
    assert table["testbed kernel"] == "6.1.0-50-amd64" and table["notebooks' kernel"] == "6.18.44"
    html = index_page.render(tmp_path, manifest)
    assert "testbed on vagrant:lab: Linux 6.1.0-50-amd64" in html and "notebooks: Linux 6.18.44" in html


def test_the_testbed_machines_environment_is_read_from_that_machine():
    import os

    from labkit.host import LocalHost
    from labkit.replay.manifest import machine_environment

    env = machine_environment(LocalHost())
    assert env["kernel"] == os.uname().release and env["cpus"] == os.cpu_count()
    assert env["hostname"] == os.uname().nodename and env["distro"]
