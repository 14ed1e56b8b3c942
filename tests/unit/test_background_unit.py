"""Background flows: where they run, what they refuse, how a failure reaches the load (no kernel needed)."""

import json
import os
import struct
import threading
import time

from types import SimpleNamespace

import pytest

from labkit import background
from labkit.background import BackgroundFlows, running
from labkit.run import background_flows


def test_flows_run_beside_a_testbed_on_this_machine_only(tmp_path, monkeypatch):
    from labkit.prepare import build_testbed
    from labkit.testbed.cluster import ClusterTestbed

    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path))
    it = SimpleNamespace(background_flows=2000)
    local = build_testbed("netns")  # namespaces of this machine: the flows share its collector
    remote = ClusterTestbed.__new__(ClusterTestbed)  # a remote node: its collector is not ours
    assert background_flows(local, it) == 2000
    assert background_flows(remote, it) == 0
    assert background_flows(local, SimpleNamespace(background_flows=0)) == 0


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
    flows.error = "OSError: [Errno 101] Network is unreachable"
    with pytest.raises(TestbedError, match=rf"background flows in {flows.netns} stopped: .*unreachable"):
        flows.check()


def test_flows_are_spread_so_no_namespace_nears_a_small_max(tmp_path):
    assert len(BackgroundFlows(2000, directory=tmp_path).namespaces) == 8
    assert len(BackgroundFlows(100, directory=tmp_path).namespaces) == 1
    assert len(set(BackgroundFlows(501, directory=tmp_path).namespaces)) == 3


def _failed_marker(tmp_path, error="OSError: [Errno 19] No such device"):
    (tmp_path / "background-flows.json").write_text(json.dumps(
        {"pid": os.getpid(), "netns": "lkbgx0", "namespaces": ["lkbgx0"], "flows": 10,
         "started": 0, "warm_at": 0, "status": "failed", "error": error}))


def test_a_failed_marker_is_not_running_and_says_why(tmp_path):
    _failed_marker(tmp_path)
    assert running(tmp_path) is None
    assert background.failure(tmp_path) == "OSError: [Errno 19] No such device"


def test_an_iteration_relying_on_failed_flows_fails_with_their_reason_instead_of_starting_its_own(tmp_path):
    from labkit.exceptions import TestbedError

    _failed_marker(tmp_path)
    with pytest.raises(TestbedError, match="background flows of this run stopped: OSError.*No such device"):
        with background.ensure(2000, directory=tmp_path):
            pass  # pragma: no cover - must not be reached


def test_watch_stops_the_block_when_the_flows_fail(tmp_path, monkeypatch):
    from labkit.exceptions import TestbedError

    monkeypatch.setattr(background, "WATCH_EVERY_S", 0.02)
    monkeypatch.setattr(background, "_running", lambda info: {"status": "running"})
    seen = []
    with pytest.raises(TestbedError, match="stopped during the load: OSError.*No such device"):
        with background.watch({"netns": "lkbgx0"}, directory=tmp_path, on_failure=seen.append):
            _failed_marker(tmp_path)
            time.sleep(0.5)
    assert seen == ["OSError: [Errno 19] No such device"]


def test_watch_ends_a_blocking_load_at_once_by_interrupting_the_main_thread(tmp_path, monkeypatch):
    from labkit.exceptions import TestbedError

    monkeypatch.setattr(background, "WATCH_EVERY_S", 0.02)
    monkeypatch.setattr(background, "_running", lambda info: {"status": "running"})
    threading.Timer(0.2, _failed_marker, args=(tmp_path,)).start()
    began = time.monotonic()
    with pytest.raises(TestbedError, match="No such device"):
        with background.watch({"netns": "lkbgx0"}, directory=tmp_path):
            time.sleep(30)  # a load: ends by the watcher's SIGINT, not by itself
    assert time.monotonic() - began < 5


class _Netlink:
    def __init__(self, code):
        self.code, self.sent = code, []

    def send(self, data):
        self.sent.append(data)

    def recv(self, size):
        return struct.pack("=LHHLL", 36, 2, 0, 1, 0) + struct.pack("=i", self.code) + self.sent[-1][:16]


def test_flush_sends_one_ctnetlink_delete_and_raises_the_kernels_refusal():
    ok = _Netlink(0)
    background.flush_table(ok)
    length, kind, flags = struct.unpack_from("=LHH", ok.sent[0])
    assert (length, kind, flags) == (20, 0x102, 5) and len(ok.sent[0]) == 20
    with pytest.raises(OSError, match="Operation not permitted"):
        background.flush_table(_Netlink(-1))


def test_a_namespace_never_sends_more_than_a_share_of_the_global_max_in_force():
    """The lab VM's derived profile sets nf_conntrack_max 64: 250 flows in one namespace filled its
    table and the sender died on EPERM (iterations 3 and 4 failed). Fewer flows, never a full table."""
    from labkit.background import MAX_SHARE, PER_NAMESPACE, per_namespace

    assert per_namespace(PER_NAMESPACE, 262144) == PER_NAMESPACE
    assert per_namespace(PER_NAMESPACE, 64) == int(64 * MAX_SHARE) < 64
    assert per_namespace(PER_NAMESPACE, 1) == 1  # at least one: the listing still runs
    assert per_namespace(7, 64) == 7


def test_a_table_filled_by_a_max_lowered_mid_burst_drops_the_rest_of_that_burst_not_the_flows(monkeypatch, tmp_path):
    """The lab sets the global max per iteration while the flows run: a burst sent under the old max
    meets a full table (EPERM). Seen in the lab VM, where it failed iterations 3-5: now the sender
    goes on with the next second."""
    class FullAfter:
        def __init__(self, room):
            self.room, self.sent = room, 0

        def sendto(self, data, target):
            if self.sent >= self.room:
                raise PermissionError(1, "Operation not permitted")
            self.sent += 1

        def close(self):
            pass

    monkeypatch.setattr(background, "flush_table", lambda sock: None)
    monkeypatch.setattr(background, "dump_table", lambda sock: 0)
    monkeypatch.setattr(background, "_global_max", lambda: 262144)
    flows = BackgroundFlows(40, directory=tmp_path)
    udp = FullAfter(room=3)
    thread = threading.Thread(target=flows._loop, args=([(udp, FullAfter(0))],))
    thread.start()
    time.sleep(0.3)
    flows._stop.set()
    thread.join(5)
    assert flows.error is None and flows.sent == 3 and flows.flushes >= 1
