"""Issue 12, without root: each defect found by a hostile-but-honest user, one test named after it.

(The real-kernel half, with SIGKILL/SIGTERM of real runs, is in
``tests/integration/test_crash_safety.py`` and ``test_crash_matrix.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from labkit.cli import build_parser, main
from labkit.exceptions import ReplayError, SavedSysctlsUnreadable, ScenarioError, StateCorrupt
from labkit.ledger import Ledger
from labkit.sysctls import GlobalSysctls, describe_claimant, kernel_defaults, restore_crashed
from tests.unit.test_sysctls import FakeMachine

MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
EMAX = "/proc/sys/net/netfilter/nf_conntrack_expect_max"
BUCKETS = "/proc/sys/net/netfilter/nf_conntrack_buckets"


def machine() -> FakeMachine:
    return FakeMachine({MAX: "262144", EMAX: "4096", BUCKETS: "262144",
                        "/proc/sys/net/netfilter/nf_conntrack_count": "10"})


# --- 4. a corrupt ledger made `down` claim success -------------------------------------------

def test_defect4_a_garbage_ledger_is_refused_naming_the_file_and_what_to_do(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.record("path", path=str(tmp_path / "x"))
    with open(ledger.path, "a") as f:
        f.write("garbage that is not JSON\n" * 150)
    with pytest.raises(StateCorrupt) as info:
        ledger.entries()
    assert str(ledger.path) in str(info.value) and "line 2" in str(info.value)
    assert "labkit clean" in str(info.value)
    with pytest.raises(StateCorrupt):
        ledger.undo()  # nothing removed, nothing forgotten
    salvaged = Ledger(tmp_path, salvage=True)
    assert [e["kind"] for e in salvaged.entries()] == ["path"] and len(salvaged.damaged) == 150


def test_defect4_a_record_after_a_torn_last_line_is_not_glued_onto_it(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.record("path", path=str(tmp_path / "a"))
    with open(ledger.path, "a") as f:
        f.write('{"op": "create", "id": 2, "ki')  # a crash mid-append
    ledger.record("path", path=str(tmp_path / "b"))  # e.g. `clean` recording afterwards
    assert [Path(e["path"]).name for e in Ledger(tmp_path).entries()] == ["a", "b"]


# --- 8. corrupt state.json / global-sysctls.json ---------------------------------------------

def test_defect8_a_garbage_state_json_is_reported_naming_the_file(tmp_path):
    from labkit.testbed.netns import NetnsTestbed

    run = tmp_path / "netns-abcde"
    run.mkdir()
    (run / "state.json").write_text('{"broken')
    with pytest.raises(StateCorrupt) as info:
        NetnsTestbed(state_dir=tmp_path)
    assert str(run / "state.json") in str(info.value) and "labkit clean" in str(info.value)
    (run / "state.json").write_text("[1, 2]")  # JSON, but not a state document: no TypeError later
    with pytest.raises(StateCorrupt):
        NetnsTestbed(state_dir=tmp_path)


def test_defect8_saved_sysctls_survive_a_damaged_file_through_their_copy(tmp_path):
    m = machine()
    g = GlobalSysctls("r", host=m, directory=tmp_path, claim_path=str(tmp_path / "claim"))
    g.set({"net.netfilter.nf_conntrack_max": 1024, "net.netfilter.nf_conntrack_expect_max": 128})
    assert m.files[MAX] == "1024"
    g.path.write_text("garbage")
    assert g.restore() == {"net.netfilter.nf_conntrack_max": "262144",
                           "net.netfilter.nf_conntrack_expect_max": "4096"}
    assert (m.files[MAX], m.files[EMAX]) == ("262144", "4096")
    assert not g.path.exists() and not g.backup_path.exists()


def test_defect8_unreadable_saved_sysctls_name_the_file_and_clean_restores_kernel_defaults(tmp_path):
    m = machine()
    g = GlobalSysctls("r", host=m, directory=tmp_path, claim_path=str(tmp_path / "claim"))
    g.set({"net.netfilter.nf_conntrack_max": 1024, "net.netfilter.nf_conntrack_expect_max": 128})
    g.path.write_text("garbage")
    g.backup_path.write_bytes(b"\xff\xfe")
    with pytest.raises(SavedSysctlsUnreadable) as info:
        g.restore()  # `down`: refuses, naming the file, and says what will work
    assert str(g.path) in str(info.value) and "labkit clean" in str(info.value)
    assert m.files[MAX] == "1024"
    restored = restore_crashed(tmp_path, host=m, claim_path=str(tmp_path / "claim"))
    assert restored == kernel_defaults(m) == {"net.netfilter.nf_conntrack_max": "262144",
                                              "net.netfilter.nf_conntrack_expect_max": "4096"}
    assert (m.files[MAX], m.files[EMAX]) == ("262144", "4096")
    assert not (tmp_path / "claim").exists()


def test_defect8_the_refusal_of_held_globals_names_the_command_that_releases_them():
    replay = describe_claimant("/run/labkit/replay-20261201-101010-quick/global-sysctls.json")
    assert "replay 20261201-101010-quick" in replay and "labkit down" not in replay
    plain = describe_claimant("/run/labkit/global-sysctls.json")
    assert "labkit down" in plain and "--wait" in plain


# --- 5. the summary without iteration 1 ---------------------------------------------------------

def test_defect5_the_summary_does_not_crash_when_iteration_1_is_not_in_the_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from labkit.summary import RunSummary

    reference = pd.read_csv(Path(__file__).parents[2] / "results/reference/summary.csv")
    run = reference[reference["iteration"].isin([2, 3])].copy()
    run.loc[run["iteration"] == 2, "transfers_per_s"] = 0.0  # what a quick run of iteration 2 gave
    run.to_csv(tmp_path / "summary.csv", index=False)
    summary = RunSummary(tmp_path, "quick")
    fig = summary.throughput_chart()
    assert "relative to iteration 3" in fig.axes[0].get_ylabel()
    table = summary.table()
    assert "lab vs it. 3" in table.columns and table.loc[3, "lab vs it. 3"] == 1.0
    summary.findings()


# --- 6. doctor passed another package's in.tftpd --------------------------------------------------

def test_defect6_doctor_refuses_an_in_tftpd_that_is_not_tftpd_hpas(tmp_path, monkeypatch):
    from labkit import doctor

    fake = tmp_path / "in.tftpd"
    fake.write_text("#!/bin/sh\necho 'atftp-0.8.0 (server)'\n")  # what atftpd's prints for -V
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    check = doctor.check_tftpd()
    assert not check.ok and check.required
    assert "atftp-0.8.0" in check.detail and "tftpd-hpa" in check.fix
    fake.write_text("#!/bin/sh\necho 'tftp-hpa 5.2, with remap, with tcpwrappers'\n")
    assert doctor.check_tftpd().ok


# --- 7. the loadgen lost its results on a bad output path ----------------------------------------

@pytest.mark.parametrize("option,where", [("--out", "a-file"), ("--transfers", "missing/t.csv")])
def test_defect7_loadgen_refuses_a_bad_output_path_before_the_load(tmp_path, capsys, option, where):
    (tmp_path / "a-file").write_text("")
    start = time.monotonic()
    # a 30-second load against nothing: refused at once, not after
    code = main(["loadgen", "127.0.0.1", "9", "f", "--size", "10", "--duration", "30",
                 option, str(tmp_path / where)])
    assert code == 1 and time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert option in err and str(tmp_path / where) in err and "Traceback" not in err


def test_defect8_replay_refuses_a_file_as_out_before_any_notebook(tmp_path):
    from labkit.replay.driver import ReplayOptions, _prepare_run_dir

    (tmp_path / "f").write_text("")
    with pytest.raises(ReplayError) as info:
        _prepare_run_dir(ReplayOptions(out=tmp_path / "f"))
    assert "--out" in str(info.value) and "not a folder" in str(info.value)


# --- 8. the lesser ones ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,said", [("2,2", "named twice"), ("3-2", "runs backwards"),
                                       ("1-13", "outside 1-12")])
def test_defect8_iterations_repeated_or_backwards_are_refused_with_the_reason(text, said):
    from labkit.replay.driver import parse_iterations

    with pytest.raises(ReplayError) as info:
        parse_iterations(text)
    assert said in str(info.value)


@pytest.mark.parametrize("argv", [["replay", "--cell-timeout", "-1"], ["replay", "--cell-timeout", "0"],
                                  ["up", "--wait", "-5"], ["up", "--wait", "nan"]])
def test_defect8_negative_cell_timeout_and_wait_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and argv[1] in capsys.readouterr().err


def test_defect8_an_unknown_sysctl_in_a_profiles_sysctl_values_is_refused(tmp_path):
    from labkit.scenario import DATA_FILE, load_profile, load_scenario

    raw = yaml.safe_load(Path(DATA_FILE).read_text())["profiles"]["quick"]
    raw = dict(raw, name="typo")
    raw["sysctl_values"] = dict(raw["sysctl_values"], **{"net.netfilter.nf_conntrack_maxx": {131072: 1}})
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ScenarioError) as info:
        load_profile(path, load_scenario())
    assert "nf_conntrack_maxx" in str(info.value) and str(path) in str(info.value)


# --- 2. SIGTERM got no cleanup ------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_defect2_sigterm_and_sighup_take_the_same_orderly_path_as_ctrl_c(signum):
    from labkit.signals import orderly_signals

    cleaned = []
    with orderly_signals() as caught:
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)
            finally:
                cleaned.append(True)
    assert cleaned and caught.signum == signum and caught.exit_code == 128 + signum


# --- 1. clean could not see replay runs ----------------------------------------------------------

def test_defect1_clean_looks_into_replay_folders_and_leaves_a_live_replay_alone(tmp_path):
    from labkit.cleanup import clean

    dead = tmp_path / "replay-dead" / "netns-abcde"
    dead.mkdir(parents=True)
    Ledger(dead).record("path", path=str(dead / "srv"))
    (dead / "srv").mkdir()
    (dead / ".state.json.x1y2.tmp").write_text("{")  # left by a SIGKILL mid-write
    (tmp_path / "replay-dead" / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "start": 1}))
    live = tmp_path / "replay-live" / "netns-fghij"
    live.mkdir(parents=True)
    Ledger(live).record("path", path=str(live / "srv"))
    (live / "srv").mkdir()
    (tmp_path / "replay-live" / "owner.json").write_text(json.dumps({"pid": os.getppid()}))
    report = clean(tmp_path)
    assert f"path {dead / 'srv'}" in report.removed
    assert not (tmp_path / "replay-dead").exists()
    assert (live / "srv").exists() and any("replay live is running" in k for k in report.kept)
    assert not report.problems


def test_defect2_a_sigtermed_loadgen_still_reports_what_it_counted(tmp_path):
    import subprocess
    import sys

    # a load against a closed port of this machine's loopback, ended by SIGTERM after a second
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "loadgen", "127.0.0.1", "9", "f", "--size", "10",
                             "--duration", "30", "--concurrency", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 3), (proc.returncode, err)  # not killed on the spot (-15)
    assert "interrupted" in out and "started" in out  # the summary of what it did


def test_defect1_clean_leaves_a_testbed_whose_process_lives_and_its_globals_alone(tmp_path):
    """A notebook kernel (or any live process) still using its testbed is not a crashed run:
    clean leaves it and the global sysctls it saved; once that process is gone, clean removes it."""
    import subprocess
    import sys

    from labkit.cleanup import OWNER_NAME, clean
    from labkit.ledger import proc_start_time

    user = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "netns-abcde"
        run.mkdir()
        Ledger(run).record("path", path=str(run / "srv"))
        (run / "srv").mkdir()
        (run / "state.json").write_text(json.dumps({"state": "up", "run_id": "abcde"}))
        (run / OWNER_NAME).write_text(json.dumps({"pid": user.pid, "start": proc_start_time(user.pid)}))
        (tmp_path / "global-sysctls.json").write_text(json.dumps(
            {"owner": "netns-abcde", "saved": {"net.netfilter.nf_conntrack_max": "262144"}}))
        report = clean(tmp_path)
        assert (run / "srv").exists() and (tmp_path / "global-sysctls.json").exists()
        assert any(f"pid {user.pid}" in k and "abcde" in k for k in report.kept), report.kept
        assert any("global sysctls" in k for k in report.kept), report.kept
        assert not report.removed and not report.problems
    finally:
        user.kill()
        user.wait()
    (tmp_path / "global-sysctls.json").unlink()  # restoring them would need root: not this test's point
    report = clean(tmp_path)
    assert f"path {run / 'srv'}" in report.removed and not run.exists()
