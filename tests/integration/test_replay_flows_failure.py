"""A replay whose background flows fail mid-load: that iteration fails at once with the reason,
the next runs with fresh flows, and nothing already written is lost.

The replay runs in this process, on the real kernel with real notebooks under
papermill; its flows are a process of their own.  They are made to fail the way
another program on the machine could make them: one of their namespaces is
removed (``ip netns del``) while the load of iteration 3 is under way.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from labkit import background
from labkit.replay import driver
from labkit.results import replay_state_dir
from labkit.scenario import load_scenario
from tests.conftest import need_program, need_root

pytestmark = pytest.mark.integration

LOAD_S = 30.0


def _loadgen_running() -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if b"loadgen" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
    return False


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_failing_sender_fails_its_iteration_at_once_and_the_next_gets_fresh_flows(tmp_path, monkeypatch):
    need_root()
    need_program("ip", "iptables", "in.tftpd", "conntrack")
    quick = load_scenario().profiles["quick"]
    profile = tmp_path / "quick-flows.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "quick-flows", "description": "quick, with background flows", "run": dict(quick.run),
        "cpu_limit": quick.cpu_limit, "background_flows": 300,
        "sysctl_values": {k: dict(v) for k, v in quick.sysctl_values.items()}}))
    out = tmp_path / "run"
    state = {"failed_at": None, "iteration-2": None, "removed": None}
    done = threading.Event()

    def fail_the_flows() -> None:
        while not done.wait(0.1):
            if (out / "iteration-3").exists() and _loadgen_running():
                flows = json.loads((out / "manifest.json").read_text())["background_flows"]
                state["iteration-2"] = _digests(out / "iteration-2")
                state["removed"] = flows[0]["namespaces"][0]
                state["failed_at"] = time.monotonic()
                subprocess.run(["ip", "netns", "del", state["removed"]], check=True)
                return

    monkeypatch.setattr(background, "WARM_S", 2.0)  # the GC's cycle is not what this test is about
    saboteur = threading.Thread(target=fail_the_flows, daemon=True)
    saboteur.start()
    lines: list[str] = []
    options = driver.ReplayOptions(profile=str(profile), iterations=[2, 3, 4], out=out, report=lines.append,
                                   parameters={"duration": LOAD_S}, summary_notebook=None)
    try:
        driver.replay(options)
    finally:
        done.set()
        saboteur.join()
    manifest = json.loads((out / "manifest.json").read_text())
    its = manifest["iterations"]
    assert state["failed_at"] is not None, "the flows were never made to fail"
    reason = f"their namespace {state['removed']} was removed by someone else"
    # iteration 2, before the failure: done, and its files untouched by what came after
    assert its["2"]["status"] == "ok" and state["iteration-2"]
    assert _digests(out / "iteration-2") == state["iteration-2"]
    # iteration 3: failed with the reason, its load ended long before its 30 s
    assert its["3"]["status"] == "failed"
    assert reason in its["3"]["error"]
    assert its["3"]["duration_s"] < LOAD_S, its["3"]
    # iteration 4: fresh flows, a full run
    assert its["4"]["status"] == "ok" and its["4"]["row"]["background_flows"] == 300
    flows = manifest["background_flows"]
    assert len(flows) == 2 and reason in flows[0]["error"] and "failed" not in flows[1]
    assert set(flows[0]["namespaces"]).isdisjoint(flows[1]["namespaces"])
    assert any("starting a fresh set" in line for line in lines)
    assert reason in (out / "index.html").read_text()
    assert manifest["status"] == "failed" and manifest["failed_iterations"] == [3]
    # nothing of the flows is left: their processes, namespaces and folders are gone
    assert not [p for p in (flows[0]["pid"], flows[1]["pid"]) if os.path.exists(f"/proc/{p}")
                and b"labkit.background" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert not list(replay_state_dir(manifest["run_id"]).glob("netns-bg-*"))
    left = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not left & set(flows[0]["namespaces"] + flows[1]["namespaces"])
