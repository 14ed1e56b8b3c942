"""A scripted TFTP server on 127.0.0.1 that misbehaves on request (test helper).

Each read request gets its own thread and socket (its own transfer ID), as a
real server does.  The sender is lockstep with its own retransmission timer
and ignores duplicate ACKs (RFC 1123's fix of the Sorcerer's Apprentice bug);
the keyword arguments make it drop, duplicate, delay, reorder, corrupt or
redirect packets.  Everything it received is recorded for the test to check.
"""

from __future__ import annotations

import socket
import threading
import time

from labkit.loadgen import packet


class ScriptedServer:
    """Serve ``content`` for any file name, misbehaving as told.

    Keyword args (block numbers are 1-based DATA blocks):
        drop: blocks whose first send is dropped.
        dup: blocks sent twice in a row.
        delay: {block: seconds} to wait before the first send.
        stale: blocks sent again (late) right after the next block: reordering.
        stranger: blocks also sent from another socket (a wrong transfer ID).
        switch_port_after: after this block, every packet comes from a new socket.
        error_at: (block, code): send an ERROR instead of this block.
        packet_at: {block: bytes}: send these bytes instead of this block.
        truncate: {block: n}: send only the first n bytes of this block's packet.
        ack_after: blocks after which an ACK packet is also sent to the client.
        silent: never answer.
        no_final_empty: leave out the empty DATA that ends an exact multiple of the block size.
        oack: {name: value} to answer options with (None: ignore options); a
            ``windowsize`` above 1 sends windows of blocks (RFC 7440).
        pace: seconds between blocks (a slow server).
        resend: the server's own retransmission timeout.
    """

    def __init__(self, content: bytes, **behaviour):
        self.content = content
        self.b = behaviour
        self.requests: list = []
        self.acks: list[int] = []           # every ACK block received, all transfers
        self.errors: list = []              # ERROR packets received on the transfer socket
        self.stranger_got: list = []        # what the wrong-ID socket received
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._main = threading.Thread(target=self._serve, daemon=True)
        self._main.start()

    def settle(self) -> "ScriptedServer":
        """Wait until every transfer thread has ended (it has seen the client's last word)."""
        for t in list(self._threads):
            t.join(timeout=3)
        return self

    def close(self) -> None:
        self._stop.set()
        self._main.join()
        for t in self._threads:
            t.join()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            req = packet.parse_packet(data)
            with self._lock:
                self.requests.append(req)
            if self.b.get("silent"):
                continue
            t = threading.Thread(target=self._transfer, args=(req, addr), daemon=True)
            self._threads.append(t)
            t.start()

    def _blocks(self, blksize: int) -> list[bytes]:
        c = self.content
        blocks = [c[i:i + blksize] for i in range(0, len(c), blksize)]
        if len(c) % blksize == 0 and not self.b.get("no_final_empty"):
            blocks.append(b"")
        return blocks

    def _transfer(self, req, client) -> None:
        b = self.b
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.1", 0))
        stranger.settimeout(0.01)
        socks = [s, stranger]
        try:
            blksize = 512
            oack = b.get("oack")
            if req.options and oack is not None:
                blksize = int(oack.get("blksize", 512))
                if not self._send_until_ack(s, packet.build_oack(oack), client, 0):
                    return
            blocks = self._blocks(blksize)
            window = int((oack or {}).get("windowsize", 1)) if req.options else 1
            if window > 1:
                self._send_windowed(s, client, blocks, window)
                return
            out = s
            for n, payload in enumerate(blocks, start=1):
                wire = n & 0xFFFF
                if b.get("pace"):
                    time.sleep(b["pace"])
                if n in b.get("delay", {}):
                    time.sleep(b["delay"][n])
                if b.get("error_at", (None,))[0] == n:
                    s.sendto(packet.build_error(b["error_at"][1], "scripted"), client)
                    return
                data = packet.build_data(wire, payload)
                if n in b.get("packet_at", {}):
                    data = b["packet_at"][n]
                if n in b.get("truncate", {}):
                    data = data[:b["truncate"][n]]
                if n in b.get("stranger", ()):
                    stranger.sendto(data, client)
                    self._drain_stranger(stranger)
                first = n not in b.get("drop", ())
                if first:
                    out.sendto(data, client)
                if n in b.get("dup", ()):
                    out.sendto(data, client)
                if n - 1 in b.get("stale", ()):
                    out.sendto(packet.build_data(n - 1, blocks[n - 2]), client)
                if n in b.get("ack_after", ()):
                    out.sendto(packet.build_ack(wire), client)
                if not self._send_until_ack(out, data, client, wire, sent=first):
                    return
                if b.get("switch_port_after") == n:
                    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    out.bind(("127.0.0.1", 0))
                    socks.append(out)
            self._drain_stranger(stranger)
        finally:
            for sock in socks:
                sock.close()

    def _send_windowed(self, s, client, blocks, window) -> None:
        """RFC 7440: send up to ``window`` blocks, go on from the block the client acknowledges."""
        acked, dropped = 0, set()
        resend = self.b.get("resend", 0.05)
        give_up = time.monotonic() + 2.0
        while acked < len(blocks) and time.monotonic() < give_up:
            for n in range(acked + 1, min(acked + window, len(blocks)) + 1):
                if n in self.b.get("drop", ()) and n not in dropped:
                    dropped.add(n)
                    continue
                s.sendto(packet.build_data(n, blocks[n - 1]), client)
            s.settimeout(resend)
            try:
                raw, _ = s.recvfrom(65536)
            except socket.timeout:
                continue          # resend the window
            pkt = packet.parse_packet(raw)
            if isinstance(pkt, packet.Ack):
                with self._lock:
                    self.acks.append(pkt.block)
                acked = max(acked, pkt.block)

    def _drain_stranger(self, stranger) -> None:
        try:
            while True:
                data, _ = stranger.recvfrom(65536)
                with self._lock:
                    self.stranger_got.append(packet.parse_packet(data))
        except (socket.timeout, BlockingIOError):
            pass

    def _send_until_ack(self, s, data, client, block, sent=True) -> bool:
        """Wait for ACK ``block``; resend on our own timer; ignore duplicate ACKs."""
        resend = self.b.get("resend", 0.05)
        give_up = time.monotonic() + 2.0
        next_send = time.monotonic() + resend   # a dropped first send goes out then
        while time.monotonic() < give_up and not self._stop.is_set():
            s.settimeout(max(next_send - time.monotonic(), 0.001))
            try:
                raw, addr = s.recvfrom(65536)
            except socket.timeout:
                s.sendto(data, client)
                next_send = time.monotonic() + resend
                continue
            try:
                pkt = packet.parse_packet(raw)
            except Exception:
                continue
            if isinstance(pkt, packet.Ack):
                with self._lock:
                    self.acks.append(pkt.block)
                if pkt.block == block:
                    return True
            elif isinstance(pkt, packet.Error):
                with self._lock:
                    self.errors.append(pkt)
                return False
        return False
