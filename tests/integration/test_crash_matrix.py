"""The crash-and-signal matrix: kill `labkit up`, `labkit run` and `labkit replay` (quick
profile, iteration 2 or 3) with SIGKILL, SIGTERM or SIGINT at three moments each, then
run `labkit clean`: the machine matches the record taken before, every time.

Moments (read from the run's own records, see ``crash_matrix.observe``):

- ``up``: building (a fresh testbed), reconfiguring (iteration 2 -> 3: pods being added),
  tearing down (iteration 3 -> 1: pods being removed);
- ``run`` and ``replay``: building, loading, tearing down (after the load).

With SIGTERM and SIGINT the command tears down itself and exits 143 / 130; with SIGKILL
`labkit clean` does it.  Either way: no namespace, link, cgroup or process of the run, no
change to the machine's iptables or its global conntrack sysctls, an empty state folder.
Each row is printed (``pytest -s``) and appended to ``$LABKIT_MATRIX_TABLE`` when set.
About 3-4 minutes in all on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import need_program, need_root
from tests.integration.crash_matrix import (differences, labkit, observe, record, run_ids, spawn,
                                            wait_for)
from tests.integration.test_testbed_lifecycle import unclaimed_globals

pytestmark = pytest.mark.integration

WAIT = "300"
MOMENTS = {
    "up": ("building", "reconfiguring", "tearing down"),
    "run": ("building", "loading", "tearing down"),
    "replay": ("building", "loading", "tearing down"),
}
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
CASES = [(c, s, m) for c, moments in MOMENTS.items() for s in SIGNALS for m in moments]


def _process_creates(state) -> int:
    n = 0
    for ledger in list(state.glob("netns-*/ledger.jsonl")):
        n += sum(1 for line in ledger.read_text().splitlines() if '"kind": "process"' in line)
    return n


def _command(command: str, moment: str, state, tmp_path) -> list[str]:
    if command == "up":
        prepare = {"reconfiguring": "2", "tearing down": "3"}.get(moment)
        if prepare:
            res = labkit(state, "up", "--iteration", prepare, "--profile", "quick", "--wait", WAIT)
            assert res.returncode == 0, res.stderr
        target = {"building": "3", "reconfiguring": "3", "tearing down": "1"}[moment]
        return ["up", "--iteration", target, "--profile", "quick", "--wait", WAIT]
    if command == "run":
        return ["run", "--iteration", "2", "--profile", "quick", "--out", str(tmp_path / "out")]
    return ["replay", "--profile", "quick", "--iterations", "2", "--out", str(tmp_path / "replay")]


def _catch(command: str, moment: str, state, proc, before_processes: int) -> None:
    if command == "up" and moment == "reconfiguring":
        deadline = time.monotonic() + 240
        while _process_creates(state) <= before_processes:
            assert proc.poll() is None, f"up ended before it added a pod: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "up added no pod in time"
            time.sleep(0.003)
        return
    after = {"loading"} if moment == "tearing down" and command != "up" else set()
    wait_for(state, proc, moment, after)


@pytest.mark.parametrize("command,signum,moment", CASES,
                         ids=[f"{c}-{signal.Signals(s).name}-{m.replace(' ', '_')}" for c, s, m in CASES])
def test_crash_matrix_clean_leaves_the_machine_as_recorded(command, signum, moment, tmp_path):
    need_root()
    need_program("ip", "iptables-save", "in.tftpd")
    state = tmp_path / "state"
    globals_before = unclaimed_globals()
    before = record(state)
    args = _command(command, moment, state, tmp_path)
    processes = _process_creates(state)
    started = time.monotonic()
    proc = spawn(state, args)
    try:
        _catch(command, moment, state, proc, processes)
        ours = run_ids(state)
        seen = sorted(observe(state))
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    killed_at = time.monotonic()
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    cleaned = labkit(state, "clean")
    after = record(state)
    globals_after = unclaimed_globals()
    problems = differences(before, after, ours)
    if globals_after != globals_before:
        problems.append(f"global sysctls {globals_before} -> {globals_after}")
    removed = sum(1 for line in cleaned.stdout.splitlines() if line.startswith("removed "))
    row = (f"| {command} | {signal.Signals(signum).name} | {moment} | {killed_at - started:5.1f} s | "
           f"exit {proc.returncode} | clean removed {removed} | "
           f"{'machine as recorded' if not problems and cleaned.returncode == 0 else 'LEAK'} |")
    print(row)
    if os.environ.get("LABKIT_MATRIX_TABLE"):
        with open(os.environ["LABKIT_MATRIX_TABLE"], "a") as f:
            f.write(row + "\n")
    assert proc.returncode == expected, f"exit {proc.returncode} (seen {seen}): {err[-2000:]}"
    assert cleaned.returncode == 0, cleaned.stderr
    assert not problems, problems
    if signum != signal.SIGKILL:
        # an orderly signal: the command tore down what it made itself
        assert removed == 0, cleaned.stdout
        assert "Traceback" not in err.split("[IPKernelApp]")[0], err[-2000:]
    if command == "replay" and signum != signal.SIGKILL:
        manifest = json.loads((tmp_path / "replay" / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        assert manifest["iterations"]["2"]["status"] == "interrupted"
