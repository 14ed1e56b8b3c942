"""TFTP packets (RFC 1350, options of RFC 2347/2348/2349/7440): build and parse.

:func:`parse_packet` is a pure function over the bytes of one UDP datagram: it
returns one of :class:`Request`, :class:`Data`, :class:`Ack`, :class:`Error`,
:class:`OAck`, or raises :class:`~labkit.exceptions.MalformedPacket` naming what
was wrong.  Nothing else escapes it, whatever the bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Union

from labkit.exceptions import MalformedPacket

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
OPCODE_NAMES = {RRQ: "RRQ", WRQ: "WRQ", DATA: "DATA", ACK: "ACK", ERROR: "ERROR", OACK: "OACK"}

# RFC 1350 error codes (8 is RFC 2347's option negotiation refusal)
ERROR_NAMES = {
    0: "not defined",
    1: "file not found",
    2: "access violation",
    3: "disk full",
    4: "illegal operation",
    5: "unknown transfer ID",
    6: "file already exists",
    7: "no such user",
    8: "option negotiation refused",
}
UNKNOWN_TID = 5
ILLEGAL_OPERATION = 4
OPTION_REFUSED = 8

DEFAULT_BLKSIZE = 512
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464            # RFC 2348
MIN_WINDOWSIZE, MAX_WINDOWSIZE = 1, 65535      # RFC 7440
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255              # RFC 2349 (seconds)
KNOWN_OPTIONS = ("blksize", "tsize", "timeout", "windowsize")


class Request(NamedTuple):
    """An RRQ or WRQ: opcode, file name, transfer mode, options (lower-case names)."""

    opcode: int
    filename: str
    mode: str
    options: dict


class Data(NamedTuple):
    """A DATA packet: block number (0-65535) and payload."""

    block: int
    payload: bytes


class Ack(NamedTuple):
    """An ACK packet: the block number acknowledged."""

    block: int


class Error(NamedTuple):
    """An ERROR packet: code and message."""

    code: int
    message: str


class OAck(NamedTuple):
    """An OACK packet: the options the server accepted (lower-case names, text values)."""

    options: dict


Packet = Union[Request, Data, Ack, Error, OAck]


def build_rrq(filename: str, mode: str = "octet", options: dict | None = None) -> bytes:
    """Return a read request for ``filename``, with RFC 2347 options if given.

    Raises:
        ValueError: the file name or an option contains a NUL byte or is empty.
    """
    if not filename or "\0" in filename:
        raise ValueError(f"invalid TFTP file name {filename!r}: empty or contains NUL")
    parts = [filename.encode(), mode.encode()]
    for name, value in (options or {}).items():
        text = str(value)
        if not name or "\0" in name or "\0" in text:
            raise ValueError(f"invalid TFTP option {name!r}={text!r}")
        parts += [name.encode(), text.encode()]
    return struct.pack("!H", RRQ) + b"\0".join(parts) + b"\0"


_ACKS: dict[int, bytes] = {}


def build_ack(block: int) -> bytes:
    """Return an ACK for ``block`` (0-65535), cached: loads send millions."""
    ack = _ACKS.get(block)
    if ack is None:
        ack = _ACKS[block] = struct.pack("!HH", ACK, block)
    return ack


def build_data(block: int, payload: bytes) -> bytes:
    """Return a DATA packet (used by test peers and servers)."""
    return struct.pack("!HH", DATA, block & 0xFFFF) + payload


def build_error(code: int, message: str = "") -> bytes:
    """Return an ERROR packet; the message defaults to the RFC's wording."""
    text = message or ERROR_NAMES.get(code, "")
    return struct.pack("!HH", ERROR, code) + text.encode("utf-8", "replace") + b"\0"


def build_oack(options: dict) -> bytes:
    """Return an OACK packet for ``options``."""
    body = b"".join(f"{k}\0{v}\0".encode() for k, v in options.items())
    return struct.pack("!H", OACK) + body


def parse_packet(data: bytes) -> Packet:
    """Parse one TFTP datagram.

    Args:
        data: the datagram's bytes.

    Returns:
        A :class:`Request`, :class:`Data`, :class:`Ack`, :class:`Error` or :class:`OAck`.

    Raises:
        MalformedPacket: the bytes are not a well-formed TFTP packet; its
            ``reason`` says why (too short, unknown opcode, missing NUL, bad option...).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedPacket(f"not bytes: {type(data).__name__}")
    data = bytes(data)
    if len(data) < 2:
        raise MalformedPacket(f"{len(data)} bytes: shorter than an opcode")
    opcode = (data[0] << 8) | data[1]
    if opcode == DATA:
        if len(data) < 4:
            raise MalformedPacket(f"DATA of {len(data)} bytes: no block number")
        return Data((data[2] << 8) | data[3], data[4:])
    if opcode == ACK:
        if len(data) != 4:
            raise MalformedPacket(f"ACK of {len(data)} bytes (must be 4)")
        return Ack((data[2] << 8) | data[3])
    if opcode == ERROR:
        if len(data) < 5:
            raise MalformedPacket(f"ERROR of {len(data)} bytes: no code or message")
        if data[-1] != 0:
            raise MalformedPacket("ERROR message not NUL-terminated")
        message = data[4:-1]
        if b"\0" in message:
            raise MalformedPacket("ERROR message contains NUL")
        return Error((data[2] << 8) | data[3], message.decode("utf-8", "replace"))
    if opcode == OACK:
        return OAck(_parse_options(_fields(data[2:], "OACK"), "OACK"))
    if opcode in (RRQ, WRQ):
        fields = _fields(data[2:], OPCODE_NAMES[opcode])
        if len(fields) < 2:
            raise MalformedPacket(f"{OPCODE_NAMES[opcode]} without file name and mode")
        filename, mode = fields[0], fields[1].lower()
        if not filename:
            raise MalformedPacket(f"{OPCODE_NAMES[opcode]} with an empty file name")
        if mode not in ("octet", "netascii", "mail"):
            raise MalformedPacket(f"{OPCODE_NAMES[opcode]} with unknown mode {fields[1]!r}")
        return Request(opcode, filename, mode, _parse_options(fields[2:], OPCODE_NAMES[opcode]))
    raise MalformedPacket(f"unknown opcode {opcode}")


def _fields(body: bytes, what: str) -> list[str]:
    """Split NUL-terminated strings; the last must be terminated."""
    if not body:
        return []
    if body[-1] != 0:
        raise MalformedPacket(f"{what}: last field not NUL-terminated")
    try:
        return body[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what}: field is not ASCII") from None


def _parse_options(fields: list[str], what: str) -> dict:
    if len(fields) % 2:
        raise MalformedPacket(f"{what}: option {fields[-1]!r} has no value")
    options: dict[str, str] = {}
    for name, value in zip(fields[::2], fields[1::2]):
        if not name:
            raise MalformedPacket(f"{what}: empty option name")
        key = name.lower()
        if key in options:
            raise MalformedPacket(f"{what}: option {name!r} given twice")
        options[key] = value
    return options


def check_oack(offered: dict, accepted: dict) -> dict:
    """Validate an OACK against what the client asked for (RFC 2347-2349, 7440).

    Args:
        offered: the options the client sent (name -> value).
        accepted: the options of the server's OACK (lower-case name -> text).

    Returns:
        The negotiated values as ints: ``blksize``, ``windowsize``, and
        ``tsize``/``timeout`` when the server sent them.

    Raises:
        MalformedPacket: the server returned an option the client did not ask
            for, a value that is not a number, or one outside what was offered.
    """
    result = {"blksize": DEFAULT_BLKSIZE, "windowsize": 1}
    for name, text in accepted.items():
        if name not in offered:
            raise MalformedPacket(f"OACK: option {name!r} was not requested")
        if not text.isdigit():
            raise MalformedPacket(f"OACK: option {name}={text!r} is not a number")
        value = int(text)
        asked = int(offered[name])
        if name == "blksize" and not MIN_BLKSIZE <= value <= asked:
            raise MalformedPacket(f"OACK: blksize {value} outside {MIN_BLKSIZE}..{asked}")
        if name == "windowsize" and not MIN_WINDOWSIZE <= value <= asked:
            raise MalformedPacket(f"OACK: windowsize {value} outside {MIN_WINDOWSIZE}..{asked}")
        if name == "timeout" and value != asked:
            raise MalformedPacket(f"OACK: timeout {value} differs from the {asked} requested")
        result[name] = value
    return result
