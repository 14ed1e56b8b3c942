"""The engine against a scripted, misbehaving TFTP server on 127.0.0.1.

Each case ends in the right outcome, nothing escapes ``run_load``, and no file
descriptor is left open.
"""

import os
import random
import time

import pytest

from labkit.loadgen import LoadSpec, run_load
from labkit.loadgen import packet
from tests.unit.tftp_peer import ScriptedServer

CONTENT = random.Random(7).randbytes(5000)      # 10 blocks, the last of 392 bytes


def _open_fds() -> int:
    """Open descriptors, less multiprocessing's resource tracker pipe: spawned workers
    start that helper once per process and it stays, by design."""
    from multiprocessing import resource_tracker

    fds = set(os.listdir("/proc/self/fd"))
    fds.discard(str(resource_tracker._resource_tracker._fd))
    return len(fds)


@pytest.fixture
def serve():
    """Start a scripted server; check the run left no descriptor open."""
    before = _open_fds()
    servers = []

    def start(content=CONTENT, **behaviour):
        servers.append(ScriptedServer(content, **behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
    assert _open_fds() == before, "file descriptors leaked"


def _run(server, size=len(CONTENT), **kw):
    kw.setdefault("count", 1)
    kw.setdefault("concurrency", 1)
    kw.setdefault("timeout", 0.15)
    kw.setdefault("retries", 3)
    return run_load(LoadSpec("127.0.0.1", server.port, "f", expected_size=size, **kw)).summary


def test_a_clean_transfer_is_ok_and_acknowledged_block_by_block(serve):
    s = _run(serve())
    assert (s["ok"], s["failed"], s["retransmits"], s["duplicates"]) == (1, 0, 0, 0)


def test_many_concurrent_transfers_each_from_its_own_port(serve):
    server = serve()
    s = _run(server, count=40, concurrency=8)
    assert s["ok"] == 40
    assert len(server.requests) == 40


def test_dropped_data_is_recovered(serve):
    server = serve(drop={3, 7}, resend=0.3)
    s = _run(server, timeout=0.05, retries=10)
    assert s["ok"] == 1
    assert s["retransmits"] >= 2       # the client nudged the server with its last ACK


def test_duplicated_data_is_acknowledged_again_and_counted_once(serve):
    server = serve(dup={2, 5, 9})
    s = _run(server, sha256=packet_sha())
    assert s["ok"] == 1 and s["duplicates"] == 3
    # each duplicate got its ACK again: the server saw blocks 2, 5 and 9 acknowledged twice
    assert sorted(server.settle().acks) == sorted(list(range(1, 11)) + [2, 5, 9])


def test_delayed_data_past_the_timeout_is_resent_and_still_counted_once(serve):
    server = serve(delay={4: 0.25})
    s = _run(server, timeout=0.1, sha256=packet_sha())
    assert s["ok"] == 1
    assert s["retransmits"] >= 1


def test_reordered_stale_duplicate_is_ignored(serve):
    s = _run(serve(stale={3, 6}), sha256=packet_sha())
    assert s["ok"] == 1
    assert s["ignored"] == 2


def test_error_packet_ends_the_transfer_with_its_code(serve):
    s = _run(serve(error_at=(3, 2)))
    assert s["ok"] == 0 and s["by_reason"] == {"error_2": 1}


def test_stranger_gets_error_5_and_the_transfer_goes_on(serve):
    server = serve(stranger={2})
    s = _run(server)
    assert s["ok"] == 1 and s["wrong_sender"] == 1
    assert [type(p).__name__ for p in server.settle().stranger_got] == ["Error"]
    assert server.stranger_got[0].code == packet.UNKNOWN_TID


def test_server_that_moves_to_another_port_times_out(serve):
    server = serve(switch_port_after=2)
    s = _run(server, timeout=0.05, retries=2)
    assert s["by_reason"] == {"timeout": 1}
    assert s["wrong_sender"] >= 1
    assert any(e.code == packet.UNKNOWN_TID for e in server.settle().errors)


@pytest.mark.parametrize("cut, reason", [(3, "malformed"), (104, "short")])
def test_truncated_packet(serve, cut, reason):
    server = serve(truncate={3: cut})
    s = _run(server)
    assert s["by_reason"] == {reason: 1}
    if reason == "malformed":      # the client tells the server why it stops
        assert [e.code for e in server.settle().errors] == [packet.ILLEGAL_OPERATION]


def test_garbage_opcode_is_malformed(serve):
    s = _run(serve(packet_at={2: b"\x00\x09hello"}))
    assert s["by_reason"] == {"malformed": 1}


def test_data_longer_than_the_block_size_is_oversized(serve):
    s = _run(serve(packet_at={2: packet.build_data(2, bytes(600))}))
    assert s["by_reason"] == {"oversized": 1}


def test_more_data_than_expected_is_oversized(serve):
    s = _run(serve(CONTENT + bytes(1000)))
    assert s["by_reason"] == {"oversized": 1}


def test_exact_multiple_of_512_ends_with_an_empty_block(serve):
    s = _run(serve(CONTENT[:1024]), size=1024)
    assert s["ok"] == 1


def test_exact_multiple_without_the_empty_block_times_out(serve):
    s = _run(serve(CONTENT[:1024], no_final_empty=True), size=1024, timeout=0.05, retries=1)
    assert s["by_reason"] == {"timeout": 1}


def test_silent_server_times_out_after_the_retries(serve):
    server = serve(silent=True)
    start = time.monotonic()
    s = _run(server, timeout=0.1, retries=2)
    took = time.monotonic() - start
    assert s["by_reason"] == {"timeout": 1}
    assert len(server.requests) == 3          # the RRQ and two resends
    assert 0.28 < took < 1.5


def test_slow_server_hits_the_deadline(serve):
    s = _run(serve(pace=0.08), timeout=0.5, deadline=0.3)
    assert s["by_reason"] == {"deadline": 1}


def test_an_ack_from_the_server_never_makes_the_client_resend(serve):
    server = serve(ack_after={2, 3})
    s = _run(server)
    assert s["ok"] == 1 and s["ignored"] == 2
    assert sorted(server.settle().acks) == list(range(1, 11))   # one ACK per block, none extra


def test_options_are_taken_up_from_the_oack(serve):
    server = serve(oack={"blksize": "1024", "tsize": str(len(CONTENT))})
    s = _run(server, blksize=1024, tsize=True, sha256=packet_sha())
    assert s["ok"] == 1
    assert sorted(server.settle().acks) == [0, 1, 2, 3, 4, 5]


def test_windowsize_acknowledges_once_per_window(serve):
    server = serve(oack={"windowsize": "4"})
    s = _run(server, windowsize=4, sha256=packet_sha())
    assert s["ok"] == 1
    assert sorted(server.settle().acks) == [0, 4, 8, 10]


def test_a_gap_in_a_window_is_acknowledged_back_to_the_last_block_in_order(serve):
    server = serve(oack={"windowsize": "4"}, drop={6})
    s = _run(server, windowsize=4, sha256=packet_sha())
    assert s["ok"] == 1
    acks = server.settle().acks
    assert 5 in acks            # blocks 7 and 8 came after the gap: ack 5, once
    assert acks.count(5) == 1 and acks[-1] == 10


def test_options_ignored_by_the_server_fall_back_to_512(serve):
    s = _run(serve(oack=None), blksize=1024, sha256=packet_sha())
    assert s["ok"] == 1


def test_oack_with_a_larger_blksize_than_asked_is_refused_with_error_8(serve):
    server = serve(oack={"blksize": "2048"})
    s = _run(server, blksize=1024)
    assert s["by_reason"] == {"protocol": 1}
    assert [e.code for e in server.settle().errors] == [packet.OPTION_REFUSED]


@pytest.mark.parametrize("workers", [1, 2])
def test_open_loop_over_the_in_flight_cap_skips_and_counts(serve, workers):
    server = serve(pace=0.05)
    s = run_load(LoadSpec("127.0.0.1", server.port, "f", expected_size=len(CONTENT), rate=200,
                          max_in_flight=2, duration=0.5, timeout=1.0, workers=workers)).summary
    assert s["ok"] >= 2
    assert s["skipped"] > 0
    assert s["started"] + s["skipped"] == 100      # 200/s for 0.5 s, late or not


def test_client_ports_are_taken_in_turn_from_a_range(serve, tmp_path):
    server = serve()
    low = 40000 + os.getpid() % 20000
    result = run_load(LoadSpec("127.0.0.1", server.port, "f", expected_size=len(CONTENT),
                               count=7, concurrency=1, ports=(low, low + 2)), transfers=True)
    assert result.summary["ok"] == 7
    assert list(result.transfers["client_port"] - low) == [0, 1, 2, 0, 1, 2, 0]


def test_mixed_outcomes_add_up_across_workers(serve):
    server = serve(drop={1}, resend=0.05)
    result = run_load(LoadSpec("127.0.0.1", server.port, "f", expected_size=len(CONTENT),
                               count=30, concurrency=6, workers=3, timeout=0.2))
    s = result.summary
    assert s["ok"] == 30 and s["workers"] == 3
    assert sum(w["ok"] for w in result.workers) == 30


def packet_sha() -> str:
    import hashlib
    return hashlib.sha256(CONTENT).hexdigest()
