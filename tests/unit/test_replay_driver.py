"""The batch driver: failure isolation, teardown after every notebook, resume, reports.

Tiny notebooks stand in for the iteration notebook: one raises, one kills its
kernel, one hangs past the cell deadline.  The others' files must stay
byte-identical, every notebook's testbed must be torn down, and the index and
the manifest must say what happened.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from labkit.exceptions import ReplayError
from labkit.replay.driver import ReplayOptions, parse_iterations, replay

DATA = Path(__file__).resolve().parents[1] / "data" / "notebooks"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def options(tmp_path, torn_down, snapshots, **kw) -> ReplayOptions:
    out = tmp_path / "run"

    def report(line: str) -> None:
        m = re.match(r"\[\d+/\d+\] iteration (\d+): (ok|FAILED)", line)
        if m:
            snapshots.setdefault(int(m.group(1)), []).append(digest(out / f"iteration-{m.group(1)}"))

    base = dict(profile="quick", iterations=[1, 2, 3, 4, 5], out=out, testbed="none",
                notebook=DATA / "tiny_iteration.ipynb", summary_notebook=DATA / "tiny_summary.ipynb",
                cell_timeout=8, teardown=lambda run_id, n: torn_down.append(n), report=report)
    base.update(kw)
    return ReplayOptions(**base)


@pytest.fixture(scope="module", autouse=True)
def own_state_dir(tmp_path_factory):
    """The replays' state (owner, kernels' cgroups and connection files) goes to a folder of the test's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABKIT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    torn_down: list[int] = []
    snapshots: dict[int, list] = {}
    opts = options(tmp, torn_down, snapshots,
                   parameters={"fail": {"2": "raise", "3": "die", "4": "hang"}})
    run_dir = replay(opts)
    return tmp, run_dir, torn_down, snapshots


def test_failed_notebooks_are_recorded_with_their_reason_and_the_batch_goes_on(failing_run):
    _, run_dir, _, _ = failing_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    status = {n: manifest["iterations"][str(n)]["status"] for n in range(1, 6)}
    assert status == {1: "ok", 2: "failed", 3: "failed", 4: "failed", 5: "ok"}
    failure = {n: manifest["iterations"][str(n)]["failure"] for n in (2, 3, 4)}
    assert failure == {2: "exception", 3: "dead-kernel", 4: "timeout"}
    assert "fails on purpose" in manifest["iterations"]["2"]["error"]
    assert manifest["status"] == "failed" and manifest["failed_iterations"] == [2, 3, 4]
    index = (run_dir / "index.html").read_text()
    assert index.count('class="failed"') == 3 and "fails on purpose" in index


def test_every_notebook_is_torn_down_however_it_ended(failing_run):
    _, _, torn_down, _ = failing_run
    assert torn_down == [1, 2, 3, 4, 5]


def test_other_iterations_files_stay_byte_identical(failing_run):
    _, run_dir, _, snapshots = failing_run
    for n in (1, 5):
        assert snapshots[n] == [digest(run_dir / f"iteration-{n}")]
        assert {"iteration.ipynb", "iteration.html", "data.csv", "summary-row.json"} <= set(snapshots[n][0])


def test_a_failed_notebook_keeps_what_it_wrote_and_its_report(failing_run):
    _, run_dir, _, _ = failing_run
    for n in (2, 3, 4):
        folder = run_dir / f"iteration-{n}"
        assert (folder / "data.csv").read_text().startswith("iteration,value")
        assert (folder / "iteration.ipynb").exists() and (folder / "iteration.html").exists()
    assert "fails on purpose" in (run_dir / "iteration-2" / "iteration.html").read_text()


def test_summary_and_manifest_hold_the_completed_iterations(failing_run):
    _, run_dir, _, _ = failing_run
    lines = (run_dir / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("iteration,transfers_per_s,transfers_ok")
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "5"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    env = manifest["environment"]
    assert env["kernel"] and env["distro"] and env["packages"]["papermill"]
    assert "net.netfilter.nf_conntrack_max" in manifest["sysctls"]["before"]
    assert manifest["summary"]["status"] == "ok" and (run_dir / "summary.html").exists()


def test_resume_reruns_only_what_failed_and_keeps_the_failed_attempts(failing_run):
    tmp, run_dir, _, _ = failing_run
    before = {n: digest(run_dir / f"iteration-{n}") for n in (1, 2, 5)}
    torn_down: list[int] = []
    snapshots: dict[int, list] = {}
    replay(options(tmp, torn_down, snapshots, resume=True))
    assert torn_down == [2, 3, 4]
    for n in (1, 5):
        assert digest(run_dir / f"iteration-{n}") == before[n]
    assert digest(run_dir / "iteration-2.attempt-1") == before[2]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"]
    assert (run_dir / "summary.csv").read_text().count("\n") == 6


def test_a_new_run_never_writes_into_an_existing_one(failing_run, tmp_path):
    _, run_dir, _, _ = failing_run
    with pytest.raises(ReplayError, match="already holds a run"):
        replay(ReplayOptions(out=run_dir, notebook=DATA / "tiny_iteration.ipynb", teardown=lambda *a: None))


def test_parse_iterations():
    assert parse_iterations("1-9") == list(range(1, 10))
    assert parse_iterations("2,5,7") == [2, 5, 7]
    assert parse_iterations("1-3,8") == [1, 2, 3, 8]
    assert parse_iterations("1-12") == parse_iterations("all") == list(range(1, 13))
    for bad in ("0-3", "x", "5-13", "", "13", "1-3,2,8"):  # an iteration named twice is a mistake, said
        with pytest.raises(ReplayError, match="1-12|not N|no iteration|named twice"):
            parse_iterations(bad)


def test_two_out_folders_of_one_name_get_their_own_run_ids_and_state(tmp_path):
    """`a/run` and `b/run` replayed at once must not share `replay-<run-id>/`: each would tear
    down the other's testbeds and kernels."""
    from labkit.replay.driver import _prepare_run_dir
    from labkit.results import replay_state_dir

    ids = []
    for where in ("a", "b"):
        _, manifest = _prepare_run_dir(ReplayOptions(out=tmp_path / where / "run", testbed="none"))
        ids.append(manifest.data["run_id"])
    assert ids[0] != ids[1] and all(i.startswith("run-") for i in ids)
    assert replay_state_dir(ids[0]) != replay_state_dir(ids[1])


def test_a_replay_refuses_the_state_folder_of_a_live_replay(tmp_path):
    import os

    from labkit.cleanup import OWNER_NAME
    from labkit.ledger import proc_start_time
    from labkit.replay import guard
    from labkit.results import replay_state_dir

    folder = replay_state_dir("shared-id")
    folder.mkdir(parents=True)
    parent = os.getppid()  # a live process that is not this one
    (folder / OWNER_NAME).write_text(json.dumps({"pid": parent, "start": proc_start_time(parent)}))
    with pytest.raises(ReplayError, match=f"pid {parent}.*another --out"):
        guard.claim("shared-id")
