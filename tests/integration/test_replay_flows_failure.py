"""A replay whose background flows fail mid-load: that iteration fails at once with the reason,
the next runs with fresh flows, and nothing already written is lost.

The replay runs in this process (so its flows' sender is this process's thread),
on the real kernel with real notebooks under papermill.  The sender is made to
fail the way a kernel refusal would: its netlink flush raises once, while the
load of iteration 3 is under way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from labkit import background
from labkit.replay import driver
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
    real_flush, state = background.flush_table, {"failed_at": None, "iteration-2": None}

    def flush(sock):
        if state["failed_at"] is None and (out / "iteration-3").exists() and _loadgen_running():
            state["failed_at"] = time.monotonic()
            state["iteration-2"] = _digests(out / "iteration-2")
            raise OSError(errno.EIO, "injected: the kernel refused the flush")
        return real_flush(sock)

    monkeypatch.setattr(background, "flush_table", flush)
    monkeypatch.setattr(background, "WARM_S", 2.0)  # the GC's cycle is not what this test is about
    lines: list[str] = []
    options = driver.ReplayOptions(profile=str(profile), iterations=[2, 3, 4], out=out, report=lines.append,
                                   parameters={"duration": LOAD_S}, summary_notebook=None)
    driver.replay(options)
    manifest = json.loads((out / "manifest.json").read_text())
    its = manifest["iterations"]
    assert state["failed_at"] is not None, "the sender was never made to fail"
    # iteration 2, before the failure: done, and its files untouched by what came after
    assert its["2"]["status"] == "ok" and state["iteration-2"]
    assert _digests(out / "iteration-2") == state["iteration-2"]
    # iteration 3: failed with the reason, its load ended long before its 30 s
    assert its["3"]["status"] == "failed"
    assert "injected: the kernel refused the flush" in its["3"]["error"]
    assert its["3"]["duration_s"] < LOAD_S, its["3"]
    # iteration 4: fresh flows, a full run
    assert its["4"]["status"] == "ok" and its["4"]["row"]["background_flows"] == 300
    flows = manifest["background_flows"]
    assert len(flows) == 2 and "injected" in flows[0]["error"] and "failed" not in flows[1]
    assert set(flows[0]["namespaces"]).isdisjoint(flows[1]["namespaces"])
    assert any("starting a fresh set" in line for line in lines)
    assert "injected: the kernel refused the flush" in (out / "index.html").read_text()
    assert manifest["status"] == "failed" and manifest["failed_iterations"] == [3]
    # nothing of the flows is left: their namespaces are gone, and so is their marker
    assert background.running() is None and background.failure() is None
    left = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not left & set(flows[0]["namespaces"] + flows[1]["namespaces"])
