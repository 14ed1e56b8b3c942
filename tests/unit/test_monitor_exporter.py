"""The exporter's pure parts: what a scrape shows, whose kernel lines are whose, the --serve flag.

The collector is fed snapshots built from captured kernel output (tests/data/);
the scrape is parsed back with prometheus_client's own parser, as Prometheus would.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from labkit.cli import main
from labkit.monitor import parse_conntrack_stats, parse_kmsg_line
from labkit.monitor.discover import Found
from labkit.monitor.exporter import ConntrackCollector, NetnsState, Snapshot, attribute_line, parse_listen
from labkit.monitor.parse import EXPECT_TABLE_FULL, TABLE_FULL, expect_count
from labkit.monitor.sampler import INIT_NET_INODE

DATA = Path(__file__).parent.parent / "data"
NODE, POD = 4026532246, 4026532300


def values(stat_file: str, count: int) -> dict[str, int]:
    """One sampler tick as NetnsSampler makes it, from a captured stat table."""
    stats = parse_conntrack_stats((DATA / stat_file).read_text())
    out = {"nf_conntrack_count": count, "nf_conntrack_max": 1024, "nf_conntrack_expect_max": 128,
           "udp_timeout": 30, "udp_timeout_stream": 120, "expect_count": expect_count(stats)}
    out.update({f"stat_{k}": v for k, v in stats.items()})
    return out


class FakeExporter:
    def __init__(self, snap: Snapshot):
        self.snap = snap

    def snapshot(self) -> Snapshot:
        return self.snap


def scrape(snap: Snapshot) -> dict[str, dict[str, float]]:
    """``{sample name: {netns: value}}`` of a scrape of the collector over ``snap``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConntrackCollector(FakeExporter(snap)))
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[s.labels.get("netns", "")] = s.value
    return out


def lab_snapshot() -> Snapshot:
    now = time.time()
    return Snapshot([
        NetnsState(Found(NODE, "node", "/run/netns/lk-node", "testbed"), now,
                   values("nf_conntrack_stat_pressure.txt", 1024), table_full=7, expect_full=2),
        NetnsState(Found(POD, "pod-1", "/run/netns/lk-pod1", "testbed"), now,
                   dict(values("nf_conntrack_stat_idle.txt", 310), expect_count=128), table_full=0, expect_full=0),
    ], orphan_lines={(EXPECT_TABLE_FULL, ""): 3}, suppressed=41, lost_records=0)


def test_a_scrape_has_node_exporters_names_with_a_netns_label():
    got = scrape(lab_snapshot())
    assert got["node_nf_conntrack_entries"] == {"node": 1024, "pod-1": 310}
    assert got["node_nf_conntrack_entries_limit"] == {"node": 1024, "pod-1": 1024}
    assert got["node_nf_conntrack_stat_drop"] == {"node": 8143, "pod-1": 0}
    assert got["node_nf_conntrack_stat_early_drop"] == {"node": 266, "pod-1": 0}
    # expect_create - expect_delete of the capture: 0x96 - (0x63 + 0x33) = 0 (the table had emptied)
    assert got["node_nf_conntrack_expect_entries"] == {"node": 0, "pod-1": 128}
    assert got["node_nf_conntrack_expect_entries_limit"] == {"node": 128, "pod-1": 128}


def test_every_column_of_the_stat_table_is_a_metric():
    header = (DATA / "nf_conntrack_stat_pressure.txt").read_text().split("\n")[0].split()
    got = scrape(lab_snapshot())
    for column in header:
        assert f"node_nf_conntrack_stat_{column}" in got, column
    # node_exporter's eight, under its names
    for name in ("found", "invalid", "ignore", "insert", "insert_failed", "drop", "early_drop", "search_restart"):
        assert set(got[f"node_nf_conntrack_stat_{name}"]) == {"node", "pod-1"}


def test_kernel_lines_are_counters_by_namespace_and_unattributed_ones_have_an_empty_netns():
    got = scrape(lab_snapshot())
    assert got["labkit_kernel_conntrack_table_full_lines_total"] == {"node": 7, "pod-1": 0}
    assert got["labkit_kernel_conntrack_expect_table_full_lines_total"] == {"node": 2, "pod-1": 0, "": 3}
    assert got["labkit_kernel_log_suppressed_messages_total"] == {"": 41}


def test_the_types_are_node_exporters_gauges_and_counters_for_the_lines():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConntrackCollector(FakeExporter(lab_snapshot())))
    types = {f.name: f.type for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert types["node_nf_conntrack_entries"] == types["node_nf_conntrack_stat_drop"] == "gauge"
    assert types["labkit_kernel_conntrack_table_full_lines"] == "counter"


def test_an_empty_exporter_scrapes_cleanly():
    got = scrape(Snapshot([]))
    assert "node_nf_conntrack_entries" not in got
    assert got["labkit_kernel_log_records_lost_total"] == {"": 0}


def kmsg_events(kind: str) -> list:
    out = [parse_kmsg_line(line) for line in (DATA / "kmsg-6.18.txt").read_text().splitlines()]
    return [e for e in out if e is not None and e.kind == kind]


def test_table_full_lines_go_to_the_namespace_they_name_or_to_the_initial_one():
    named = kmsg_events(TABLE_FULL)
    assert named, "the capture has table-full lines"
    for event in named:
        inode = attribute_line(event, time.time(), {}, 1.0)
        assert inode == (event.netns_inode if event.netns_inode is not None else INIT_NET_INODE)
    from labkit.monitor.parse import KernelEvent
    assert attribute_line(KernelEvent(TABLE_FULL, "nf_conntrack: table full, dropping packet"),
                          0.0, {}, 1.0) == INIT_NET_INODE


def test_expectation_lines_go_to_the_one_namespace_at_its_limit_then():
    event = kmsg_events(EXPECT_TABLE_FULL)[0]
    now = 1_000_000.0
    assert attribute_line(event, now, {NODE: now - 0.9, POD: None}, 1.0) == NODE
    assert attribute_line(event, now, {NODE: now - 0.9, POD: now - 0.2}, 1.0) is None   # two: no one
    assert attribute_line(event, now, {NODE: now - 30, POD: None}, 1.0) is None         # long ago
    assert attribute_line(event, now, {NODE: now - 2.5}, 1.0) is None
    assert attribute_line(event, now, {NODE: now - 2.5}, 0.5) == NODE                    # 2 periods at 0.5 Hz


@pytest.mark.parametrize("text, want", [
    ("9101", ("127.0.0.1", 9101)),
    ("0.0.0.0:9101", ("0.0.0.0", 9101)),
    ("[::1]:9101", ("::1", 9101)),
    ("localhost:0", ("localhost", 0)),
])
def test_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["", "abc", "9101:", ":9101", "1.2.3.4:70000", "::1:9101", "host:port"])
def test_bad_listen_addresses_are_refused(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(["monitor", *argv])
    except SystemExit as exc:       # argparse refuses a flag's value with exit status 2
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--serve", "9101", "--hz", "0"], "argument --hz: 0 samples per second"),
    (["--hz", "-1"], "argument --hz"),
    (["--hz", "fast"], "argument --hz: 'fast' is not a number"),
    (["--serve", "abc"], "argument --serve: 'abc' is not [ADDR:]PORT"),
    (["--serve", "99999"], "argument --serve: port 99999 is out of range"),
    (["--serve", "9101", "--rescan", "0"], "argument --rescan"),
])
def test_bad_flag_values_are_refused_naming_the_flag(capsys, argv, flag):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and flag in err, err


@pytest.mark.parametrize("argv, message", [
    (["--serve", "9101", "--out", "x"], "--out cannot be used with --serve"),
    (["--serve", "9101", "--gzip"], "--gzip cannot be used with --serve"),
    (["--all-netns"], "--all-netns is for the exporter: add --serve"),
    (["--rescan", "2"], "--rescan is for the exporter"),
    (["--serve", "9101", "--all-netns", "--netns", "a=b"], "--all-netns and --netns exclude each other"),
])
def test_flags_that_do_not_go_together_are_refused(capsys, argv, message):
    code, err = run_cli(capsys, *argv)
    assert code == 1 and message in err, err


def test_a_port_in_use_is_refused_naming_serve_before_anything_is_sampled(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(capsys, "--serve", f"127.0.0.1:{port}", "--no-kmsg")
    assert code == 1
    assert f"--serve 127.0.0.1:{port}: port {port} is already in use" in err, err


def test_an_address_that_is_not_this_machines_is_refused(capsys):
    code, err = run_cli(capsys, "--serve", "192.0.2.1:9101", "--no-kmsg")   # TEST-NET-1: never local
    assert code == 1
    assert "--serve 192.0.2.1:9101: 192.0.2.1 is not an address of this machine" in err, err


def test_a_table_full_line_naming_no_netns_goes_to_the_one_namespace_whose_table_was_full():
    from labkit.monitor.parse import KernelEvent
    line = KernelEvent(TABLE_FULL, "nf_conntrack: nf_conntrack: table full, dropping packet")  # kernel 6.1
    now = 1_000_000.0
    assert attribute_line(line, now, {}, 1.0, at_table_max={NODE: now - 0.5, POD: None}) == NODE
    assert attribute_line(line, now, {}, 1.0, at_table_max={NODE: now - 0.5, POD: now}) == INIT_NET_INODE
    assert attribute_line(line, now, {}, 1.0, at_table_max={NODE: now - 30}) == INIT_NET_INODE
