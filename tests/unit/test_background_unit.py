"""Background flows: where they run and what they refuse (no kernel needed)."""

from types import SimpleNamespace

import pytest

from labkit.background import BackgroundFlows, running
from labkit.run import background_flows


def test_flows_run_on_the_netns_testbed_only():
    it = SimpleNamespace(background_flows=2000)
    assert background_flows(SimpleNamespace(name="netns"), it) == 2000
    assert background_flows(SimpleNamespace(name="kubeadm"), it) == 0
    assert background_flows(SimpleNamespace(name="netns"), SimpleNamespace(background_flows=0)) == 0


def test_zero_flows_are_refused_naming_the_value(tmp_path):
    with pytest.raises(ValueError, match="background flows: 0 flows per second"):
        BackgroundFlows(0, directory=tmp_path)


def test_a_marker_of_a_dead_process_is_not_running(tmp_path):
    (tmp_path / "background-flows.json").write_text('{"pid": 999999999, "netns": "lkbgnone"}')
    assert running(tmp_path) is None
    (tmp_path / "background-flows.json").write_text("not json")
    assert running(tmp_path) is None


def test_a_sender_that_failed_is_reported_not_ignored(tmp_path):
    from labkit.exceptions import TestbedError

    flows = BackgroundFlows(10, directory=tmp_path)
    flows.check()  # nothing went wrong yet
    flows._error = OSError(101, "Network is unreachable")
    with pytest.raises(TestbedError, match=rf"background flows in {flows.netns} stopped: .*unreachable"):
        flows.check()
