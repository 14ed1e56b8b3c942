"""A tiny conntrack pressure lab for the monitor's tests and benchmark.

Two namespaces joined by a veth pair: ``client`` sends UDP datagrams, each from a
fresh port (a fresh conntrack flow), to ``node``, which tracks connections (a
stateful rule) and attaches the TFTP helper to port 69, so a TFTP read request
also makes an expectation.  Nothing links it to the machine's own namespace.
Everything it makes is removed by :meth:`PressureLab.close`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from labkit.host import NetnsHost, in_netns

NODE_IP = "10.251.0.2"
RRQ = b"\x00\x01file\x00octet\x00"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class PressureLab:
    """Build the two namespaces; :meth:`send` makes conntrack flows in ``node``.

    Args:
        tag: a unique short name (``lk`` + run id), at most 11 characters.
        extra: how many more empty namespaces to make (sampled, idle).
    """

    def __init__(self, tag: str, extra: int = 0):
        self.tag = tag
        self.client = f"{tag}c"
        self.node = f"{tag}n"
        self.extra = [f"{tag}x{i}" for i in range(extra)]
        self.made: list[str] = []
        self._next_port = 10000
        try:
            for name in (self.client, self.node, *self.extra):
                _run("ip", "netns", "add", name)
                self.made.append(name)
            _run("ip", "link", "add", f"{tag}a", "netns", self.client, "type", "veth",
                 "peer", "name", f"{tag}b", "netns", self.node)
            for ns, dev, ip in ((self.client, f"{tag}a", "10.251.0.1/24"), (self.node, f"{tag}b", NODE_IP + "/24")):
                _run("ip", "-n", ns, "addr", "add", ip, "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            # a stateful rule makes conntrack track in node; the helper makes expectations
            _run("ip", "netns", "exec", self.node, "iptables", "-A", "INPUT", "-m", "conntrack",
                 "--ctstate", "INVALID", "-j", "DROP")
            _run("ip", "netns", "exec", self.node, "iptables", "-t", "raw", "-A", "PREROUTING",
                 "-p", "udp", "--dport", "69", "-j", "CT", "--helper", "tftp")
        except BaseException:
            self.close()
            raise

    def hosts(self) -> dict[str, NetnsHost]:
        """Monitor targets: ``client``, ``node`` and the extra ones (``extra-N``)."""
        out = {"client": NetnsHost(self.client, name="client"), "node": NetnsHost(self.node, name="node")}
        out.update({f"extra-{i}": NetnsHost(n) for i, n in enumerate(self.extra, 1)})
        return out

    def inode(self, name: str) -> int:
        """The inode of one of the lab's namespaces (as the kernel log names it)."""
        return os.stat(f"/run/netns/{name}").st_ino

    def send(self, count: int, port: int = 5000, rate: float | None = None) -> float:
        """Send ``count`` datagrams from fresh ports in ``client`` to ``node``; return seconds taken.

        Source ports are handed out in turn (10000-59999), so each datagram is a
        new flow (the kernel's random ephemeral ports would repeat now and then).
        Port 69 sends TFTP read requests (one expectation each in ``node``).
        ``rate`` (datagrams per second) paces them; None sends at once.
        """
        first = self._next_port
        self._next_port = 10000 + (first - 10000 + count) % 50000
        return in_netns(self.client, _send, count, port, rate, first)

    def node_run(self, *argv: str) -> str:
        """Run a command in ``node`` and return its stdout (stderr appended)."""
        out = subprocess.run(["ip", "netns", "exec", self.node, *argv], capture_output=True, text=True,
                             check=True)
        return out.stdout + out.stderr

    def close(self) -> None:
        """Remove every namespace made (the veth pair goes with them)."""
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()


def _send(count: int, port: int, rate: float | None, first_port: int) -> float:
    payload = RRQ if port == 69 else b"x"
    start = time.monotonic()
    for i in range(count):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", 10000 + (first_port - 10000 + i) % 50000))
            s.sendto(payload, (NODE_IP, port))
    return time.monotonic() - start
