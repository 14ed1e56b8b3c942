"""Issue 12 on the real kernel: each defect a hostile-but-honest user found, one test named after it.

Every test keeps its runs' state in its own folder ($LABKIT_STATE_DIR), drives the
real CLI in child processes, and ends with the machine as recorded before (see
``crash_matrix.record``).  The SIGKILL/SIGTERM/SIGINT matrix is ``test_crash_matrix.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from labkit.ledger import Ledger
from tests.conftest import need_program, need_root
from tests.integration.crash_matrix import differences, ledger_lines, labkit, record, run_ids, spawn, wait_for
from tests.integration.test_testbed_lifecycle import unclaimed_globals

pytestmark = pytest.mark.integration

WAIT = "300"


@pytest.fixture
def state(tmp_path):
    need_root()
    need_program("ip", "iptables-save", "in.tftpd")
    directory = tmp_path / "state"
    globals_before = unclaimed_globals()
    before = record(directory)
    ids: set[str] = set()
    yield directory, ids
    labkit(directory, "clean")
    assert not differences(before, record(directory), ids)
    assert unclaimed_globals() == globals_before


def test_defect1_clean_undoes_a_replay_killed_mid_load(state, tmp_path):
    directory, ids = state
    proc = spawn(directory, ["replay", "--profile", "quick", "--iterations", "2",
                             "--out", str(tmp_path / "replay")])
    wait_for(directory, proc, "loading")
    ids |= run_ids(directory)
    servers = [e for run in directory.glob("replay-*/netns-*") for e in Ledger(run).entries()
               if e["kind"] in ("process", "cgroup")]
    assert servers, "the replay's servers and loadgen are in its ledger"
    proc.kill()
    proc.communicate()
    cleaned = labkit(directory, "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed netns" in cleaned.stdout and "loadgen" not in cleaned.stderr
    assert "global-sysctls" in cleaned.stdout  # the shrunken limits are given back
    assert "lkreplay-" in cleaned.stdout  # the notebook kernel's cgroup: the kernel is ended
    assert not list(directory.iterdir())


def test_defect2_sigterm_mid_load_tears_the_run_down(state, tmp_path):
    directory, ids = state
    proc = spawn(directory, ["run", "--iteration", "2", "--profile", "quick", "--out", str(tmp_path / "o")])
    wait_for(directory, proc, "loading")
    ids |= run_ids(directory)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err, (proc.returncode, err[-3000:])
    assert not list(directory.glob("netns-*")), "the run took its testbed down itself"
    assert labkit(directory, "clean").stdout.strip().endswith("nothing of labkit's was left")


def test_defect3_down_during_a_load_is_refused_and_force_fails_the_run(state, tmp_path):
    directory, ids = state
    out = tmp_path / "o"
    proc = spawn(directory, ["run", "--iteration", "2", "--profile", "quick", "--out", str(out)])
    wait_for(directory, proc, "loading")
    ids |= run_ids(directory)
    # the loadgen may not have made its CSV yet: the run's ledger names it before the load starts
    csv = [e["path"] for run in directory.glob("netns-*") for e in ledger_lines(run / "ledger.jsonl")
           if e.get("kind") == "path" and e.get("path", "").endswith(".csv")]
    refused = labkit(directory, "down")
    assert refused.returncode == 1 and "a load is under way" in refused.stderr
    assert "--force" in refused.stderr and list(directory.glob("netns-*/state.json"))
    second = labkit(directory, "up", "--iteration", "3", "--profile", "quick")
    assert second.returncode == 1 and "a load is under way" in second.stderr
    forced = labkit(directory, "down", "--force")
    assert forced.returncode == 0, forced.stderr
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "taken down while its load ran" in err
    assert not (out / "summary-row.json").exists(), "no row: the iteration is not reported ok"
    # the per-transfer CSV lived in the run's state folder (not /tmp) and went with the testbed
    assert csv and all(p.startswith(str(directory)) and not os.path.exists(p) for p in csv)


def test_defect4_down_with_a_garbage_ledger_refuses_and_clean_removes_everything(state):
    directory, ids = state
    up = labkit(directory, "up", "--iteration", "3", "--profile", "quick", "--wait", WAIT)
    assert up.returncode == 0, up.stderr
    ids |= run_ids(directory)
    (ledger,) = directory.glob("netns-*/ledger.jsonl")
    with open(ledger, "ab") as f:
        f.write(os.urandom(2000).replace(b"\n", b"x") + b"\n" + b"garbage\n" * 150)
    down = labkit(directory, "down")
    assert down.returncode == 1 and str(ledger) in down.stderr and "labkit clean" in down.stderr
    assert "testbed down" not in down.stdout and ledger.exists()
    cleaned = labkit(directory, "clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed netns" in cleaned.stdout and "global-sysctls" in cleaned.stdout


def test_defect6_doctor_and_setup_refuse_atftpds_in_tftpd(tmp_path):
    need_program("apt-get", "dpkg")
    got = subprocess.run(["apt-get", "download", "atftpd"], cwd=tmp_path, capture_output=True, text=True)
    debs = list(tmp_path.glob("atftpd_*.deb"))
    if got.returncode != 0 or not debs:
        pytest.skip(f"atftpd's package cannot be downloaded here: {got.stderr.strip()[-200:]}")
    root = tmp_path / "root"
    subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)  # unpacked, never installed
    env = dict(os.environ, PATH=f"{root / 'usr/sbin'}:{os.environ['PATH']}")
    repo = Path(__file__).resolve().parents[2]
    doctor = subprocess.run([str(repo / ".venv/bin/labkit"), "doctor"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert doctor.returncode == 1
    line = next(x for x in doctor.stdout.splitlines() if x.startswith("program in.tftpd"))
    assert "MISSING" in line and "atftp" in line and "tftpd-hpa" in line
    setup = subprocess.run(["bash", str(repo / "scripts/setup.sh"), "lab"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert setup.returncode == 1 and "not tftpd-hpa's in.tftpd" in setup.stderr
    assert shutil.which("in.tftpd", path="/usr/sbin") and subprocess.run(
        ["/usr/sbin/in.tftpd", "-V"], capture_output=True, text=True).stdout.startswith("tftp-hpa")
