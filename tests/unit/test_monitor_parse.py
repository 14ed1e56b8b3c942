"""The monitor's parsers, on real kernel output captured in tests/data/."""

from pathlib import Path

import pytest

from labkit.exceptions import MonitorError
from labkit.monitor import (
    EXPECT_TABLE_FULL, SUPPRESSED, TABLE_FULL, expect_count, parse_conntrack_S,
    parse_conntrack_stats, parse_dmesg_line, parse_kmsg_line, parse_syslog_line,
)
from labkit.monitor.parse import split_kmsg_record
from labkit.monitor.sampler import INIT_NET_INODE, event_role

DATA = Path(__file__).parent.parent / "data"
NODE_INODE = 4026532246


def lines(name):
    return (DATA / name).read_text().splitlines()


def test_stats_sum_over_cpus_and_agree_with_conntrack_S_read_at_the_same_moment():
    stats = parse_conntrack_stats((DATA / "nf_conntrack_stat_pressure.txt").read_text())
    reference = parse_conntrack_S((DATA / "conntrack_S_pressure.txt").read_text())
    for column in ("drop", "early_drop", "insert_failed", "found", "invalid", "search_restart"):
        assert stats[column] == reference[column], column
    assert stats["drop"] == 8143 and stats["early_drop"] == 266


def test_entries_is_the_namespace_count_not_a_sum_over_cpus():
    stats = parse_conntrack_stats((DATA / "nf_conntrack_stat_pressure.txt").read_text())
    assert stats["entries"] == int((DATA / "conntrack_C_pressure.txt").read_text())


def test_every_column_of_the_header_is_kept_in_order():
    text = (DATA / "nf_conntrack_stat_idle.txt").read_text()
    stats = parse_conntrack_stats(text)
    assert list(stats) == text.splitlines()[0].split()
    assert set(stats.values()) == {0}


def test_expect_count_is_created_minus_deleted_and_survives_counter_wrap():
    assert expect_count({"expect_create": 150, "expect_delete": 51}) == 99
    # per-CPU 32-bit counters: create wrapped past 2**32, delete did not yet
    assert expect_count({"expect_create": 5, "expect_delete": 2**32 - 3}) == 8
    with pytest.raises(MonitorError, match="expect_delete"):
        expect_count({"expect_create": 1})


@pytest.mark.parametrize("text, where", [
    ("", "empty"),
    ("entries found\n", "no CPU rows"),
    ("entries found\n00000001\n", "line 2: 1 fields"),
    ("entries found\n0000000g 00000000\n", "line 2: not hex"),
    ("00000001 00000002\n00000001 00000002\n", "line 1: expected column names"),
])
def test_bad_stat_text_is_refused_naming_the_line(text, where):
    with pytest.raises(MonitorError, match=where):
        parse_conntrack_stats(text, source="node: stat")


def test_real_618_kmsg_lines_become_events_with_netns_and_counts():
    events = [parse_kmsg_line(line) for line in lines("kmsg-6.18.txt")]
    kinds = [e.kind if e else None for e in events]
    assert kinds.count(EXPECT_TABLE_FULL) == 10
    assert kinds.count(TABLE_FULL) == 11
    assert kinds.count(SUPPRESSED) == 2
    assert kinds[-2:] == [None, None]          # a user-space marker and the boot banner
    full = [e for e in events if e and e.kind == TABLE_FULL]
    assert {e.netns_inode for e in full} == {NODE_INODE}
    assert [e.suppressed for e in events if e and e.kind == SUPPRESSED] == [2653, 2844]
    first = events[0]
    assert (first.seq, first.usec, first.message) == (348, 412102257, "nf_conntrack: expectation table full")


def test_older_kernel_forms_of_the_article_are_recognised_without_netns():
    events = [parse_kmsg_line(line) for line in lines("kmsg-article.txt")]
    assert [e.kind for e in events] == [TABLE_FULL, TABLE_FULL, EXPECT_TABLE_FULL, SUPPRESSED,
                                        TABLE_FULL, TABLE_FULL, SUPPRESSED]
    assert all(e.netns_inode is None for e in events)
    assert events[1].message == "nf_conntrack: table full, dropping packet."   # raw, with its period


def test_article_syslog_lines():
    events = [parse_syslog_line(line) for line in lines("syslog-article.txt")]
    assert [e.kind for e in events] == [TABLE_FULL] * 2 + [EXPECT_TABLE_FULL] * 2
    assert parse_syslog_line("May 20 07:50:28 learn-k8s-2 sshd[12]: table full, dropping packet") is None


def test_dmesg_lines_keep_the_kmsg_clock():
    event = parse_dmesg_line("<4>[  417.115127] nf_conntrack: nf_conntrack: table full in netns "
                             "4026532246, dropping packet")
    assert event.usec == 417115127 and event.netns_inode == NODE_INODE
    assert parse_dmesg_line("[    1.294614] random: crng reseeded") is None


def test_other_rate_limiters_are_not_conntrack_suppressed_lines():
    assert parse_kmsg_line("4,1,2,-;ext4_msg: 3 callbacks suppressed") is None


def test_malformed_kmsg_record_is_refused():
    with pytest.raises(MonitorError, match="not a record"):
        split_kmsg_record("nf_conntrack: table full, dropping packet")
    with pytest.raises(MonitorError, match="must be numbers"):
        split_kmsg_record("4,x,2,-;hello")


def test_kmsg_continuation_lines_and_escapes():
    record = split_kmsg_record("4,7,9,-;caf\\xc3 ok\n SUBSYSTEM=net\n DEVICE=n2\n")
    assert record.seq == 7 and record.message == "caf\xc3 ok"


def test_events_are_attributed_to_roles():
    roles = {NODE_INODE: "node", INIT_NET_INODE: "init"}
    in_node = parse_kmsg_line(lines("kmsg-6.18.txt")[11])
    assert event_role(in_node, roles, None) == "node"
    assert event_role(in_node, {}, None) is None                          # another lab's namespace
    no_netns = parse_kmsg_line("4,1,2,-;nf_conntrack: nf_conntrack: table full, dropping packet")
    assert event_role(no_netns, roles, None) == "init"
    assert event_role(no_netns, {123: "node"}, 123) == "node"             # a VM node's own namespace
    assert event_role(parse_kmsg_line(lines("kmsg-6.18.txt")[10]), roles, None) == ""


def test_follower_turns_records_into_wall_clock_events_and_counts_gaps(tmp_path):
    import threading
    import time

    from labkit.monitor.sampler import KmsgFollower

    device = tmp_path / "kmsg"
    device.write_text("")
    got = []
    follower = KmsgFollower(lambda wall, ev: got.append((wall, ev)), threading.Event(), path=str(device))
    now_usec = int(time.monotonic() * 1e6)
    follower._handle(f"4,100,{now_usec},-;nf_conntrack: nf_conntrack: table full in netns 7, dropping packet")
    follower._handle(f"6,101,{now_usec},-;eth0: link up")
    follower._handle(f"4,105,{now_usec + 2_000_000},-;nf_conntrack: expectation table full")
    assert follower.records == 3 and follower.lost == 3          # 102..104 never reached us
    (wall1, ev1), (wall2, ev2) = got
    assert ev1.netns_inode == 7 and ev2.kind == EXPECT_TABLE_FULL
    assert abs(wall1 - time.time()) < 0.5 and abs(wall2 - wall1 - 2.0) < 1e-3
    import os
    os.close(follower._fd)    # never started: run() would close it
