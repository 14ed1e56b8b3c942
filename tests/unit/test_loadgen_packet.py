"""The TFTP packet codec: round trips, refusals, and arbitrary bytes (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.exceptions import LabkitError, MalformedPacket
from labkit.loadgen import packet

PACKET_TYPES = (packet.Request, packet.Data, packet.Ack, packet.Error, packet.OAck)


@given(st.binary(max_size=1200))
@settings(max_examples=3000, deadline=None)
def test_any_bytes_give_a_packet_or_a_typed_error(data):
    try:
        parsed = packet.parse_packet(data)
    except MalformedPacket as exc:
        assert exc.reason and isinstance(exc, LabkitError)
        return
    assert isinstance(parsed, PACKET_TYPES)


@given(st.sampled_from([1, 2, 3, 4, 5, 6]), st.binary(max_size=600))
@settings(max_examples=2000, deadline=None)
def test_bytes_behind_a_valid_opcode_give_a_packet_or_a_typed_error(opcode, body):
    try:
        parsed = packet.parse_packet(opcode.to_bytes(2, "big") + body)
    except MalformedPacket:
        return
    assert isinstance(parsed, PACKET_TYPES)


@given(st.integers(0, 65535), st.binary(max_size=1500))
def test_data_round_trips(block, payload):
    assert packet.parse_packet(packet.build_data(block, payload)) == packet.Data(block, payload)


@given(st.integers(0, 65535))
def test_ack_round_trips(block):
    assert packet.parse_packet(packet.build_ack(block)) == packet.Ack(block)


def test_rrq_with_options_round_trips():
    raw = packet.build_rrq("dir/f5k", options={"blksize": 1428, "tsize": 0})
    assert raw == b"\x00\x01dir/f5k\x00octet\x00blksize\x001428\x00tsize\x000\x00"
    assert packet.parse_packet(raw) == packet.Request(1, "dir/f5k", "octet",
                                                      {"blksize": "1428", "tsize": "0"})


def test_error_and_oack_round_trip():
    assert packet.parse_packet(packet.build_error(1)) == packet.Error(1, "file not found")
    assert packet.parse_packet(packet.build_oack({"blksize": 1024})) == packet.OAck({"blksize": "1024"})


@pytest.mark.parametrize("raw, words", [
    (b"", "shorter than an opcode"),
    (b"\x00", "shorter than an opcode"),
    (b"\x00\x03\x00", "no block number"),
    (b"\x00\x04\x00\x01\x00", "ACK of 5 bytes"),
    (b"\x00\x05\x00\x01oops", "not NUL-terminated"),
    (b"\x00\x07", "unknown opcode 7"),
    (b"\x00\x06blksize\x00", "has no value"),
    (b"\x00\x06blksize\x00512\x00BLKSIZE\x00512\x00", "given twice"),
    (b"\x00\x01f\x00binary\x00", "unknown mode"),
    (b"\x00\x01\x00octet\x00", "empty file name"),
    (b"\x00\x06\xff\x00", "not ASCII"),
])
def test_malformed_packets_name_what_is_wrong(raw, words):
    with pytest.raises(MalformedPacket, match=words):
        packet.parse_packet(raw)


def test_oack_check_takes_what_was_offered_and_refuses_the_rest():
    offered = {"blksize": 1428, "tsize": 0, "windowsize": 8}
    agreed = packet.check_oack(offered, {"blksize": "1024", "tsize": "5000"})
    assert agreed == {"blksize": 1024, "windowsize": 1, "tsize": 5000}
    with pytest.raises(MalformedPacket, match="not requested"):
        packet.check_oack({"tsize": 0}, {"blksize": "512"})
    with pytest.raises(MalformedPacket, match="blksize 2000 outside"):
        packet.check_oack(offered, {"blksize": "2000"})
    with pytest.raises(MalformedPacket, match="not a number"):
        packet.check_oack(offered, {"windowsize": "x"})


def test_rrq_refuses_a_nul_in_the_name():
    with pytest.raises(ValueError, match="NUL"):
        packet.build_rrq("a\0b")
