"""A minimal TFTP set-up for the load generator's own tests and benchmark.

:class:`TftpPair` makes two network namespaces joined by one veth pair (no NAT,
no bridge), runs a real ``in.tftpd`` (tftpd-hpa) in the server namespace that
serves a generated file, and removes exactly what it made on :meth:`close`.
Optionally it counts, with an iptables rule in the *server* namespace, every
short DATA packet the server sends: the last block of each transfer, an
independent count of finished transfers.  Nothing touches the machine's own
namespace.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time

from labkit.exceptions import TestbedError
from labkit.host import LocalHost, NetnsHost

log = logging.getLogger(__name__)

SERVER_IP, CLIENT_IP = "10.99.0.1", "10.99.0.2"
_COUNT_CHAIN = "LKLASTDATA"
# IP total length of a DATA packet shorter than 512 bytes of payload: 20 + 8 + 4 + (0..511)
_LAST_DATA_RULE = ["-p", "udp", "-m", "length", "--length", "32:543",
                   "-m", "u32", "--u32", "0>>22&0x3C@8>>16=0x3"]


class TftpPair:
    """Server and client namespaces with ``in.tftpd`` serving one file.

    Args:
        prefix: start of every resource name (``lk`` + something unique to the
            caller, at most 9 characters: interface names get 6 more).
        size: size of the served file in bytes (random content, fixed seed).
        filename: its name.
        count_last_data: add the iptables counter of short DATA packets.
        tftpd_args: extra ``in.tftpd`` options.

    Use as a context manager, or call :meth:`close` (idempotent).

    Raises:
        TestbedError: a step failed; what was made so far is removed first.
    """

    def __init__(self, prefix: str, *, size: int = 5000, filename: str = "f5k",
                 count_last_data: bool = True, tftpd_args: tuple = ()):
        if not re.fullmatch(r"lk[a-z0-9]{1,7}", prefix):
            raise TestbedError(f"TftpPair prefix {prefix!r}: must be 'lk' + 1-7 of [a-z0-9]")
        self.server_ns, self.client_ns = f"{prefix}s", f"{prefix}c"
        self.server, self.client = NetnsHost(self.server_ns), NetnsHost(self.client_ns)
        self.host, self.port, self.filename = SERVER_IP, 69, filename
        self._veth = (f"{prefix}va", f"{prefix}vb")
        self._made: list[str] = []
        self._proc: subprocess.Popen | None = None
        self.root = tempfile.mkdtemp(prefix=f"labkit-{prefix}-")
        content = random.Random(size).randbytes(size)
        with open(os.path.join(self.root, filename), "wb") as f:
            f.write(content)
        self.size, self.sha256 = size, hashlib.sha256(content).hexdigest()
        try:
            self._build(count_last_data, tftpd_args)
        except BaseException:
            self.close()
            raise

    def _build(self, count: bool, tftpd_args: tuple) -> None:
        local = LocalHost()
        for ns in (self.server_ns, self.client_ns):
            local.run(["ip", "netns", "add", ns])
            self._made.append(ns)
        a, b = self._veth
        local.run(["ip", "link", "add", a, "netns", self.server_ns, "type", "veth",
                   "peer", "name", b, "netns", self.client_ns])
        for host, dev, ip in ((self.server, a, SERVER_IP), (self.client, b, CLIENT_IP)):
            host.run(["ip", "addr", "add", f"{ip}/24", "dev", dev])
            host.run(["ip", "link", "set", dev, "up"])
            host.run(["ip", "link", "set", "lo", "up"])
        if count:
            self.server.run(["iptables", "-N", _COUNT_CHAIN])
            self.server.run(["iptables", "-A", "OUTPUT", *_LAST_DATA_RULE, "-j", _COUNT_CHAIN])
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", self.server_ns, "in.tftpd", "--foreground", "--secure",
             "--user", "root", "--address", f"{SERVER_IP}:69", *tftpd_args, self.root],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        for _ in range(100):       # until it listens
            if self._proc.poll() is not None:
                raise TestbedError(f"in.tftpd exited with {self._proc.returncode}: "
                                   f"{self._proc.stderr.read().decode(errors='replace')}")
            if ":69 " in self.server.run(["ss", "-Hlun"]).stdout:
                return
            time.sleep(0.02)
        raise TestbedError("in.tftpd did not start listening within 2 s")

    def last_data_count(self) -> int:
        """Short DATA packets the server has sent so far (the iptables counter)."""
        out = self.server.run(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == _COUNT_CHAIN:
                return int(fields[0])
        raise TestbedError(f"{self.server_ns}: no {_COUNT_CHAIN} counter (count_last_data=False?)")

    def close(self) -> None:
        """Stop in.tftpd, remove the namespaces (and so the veth) and the file."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, 9)
                self._proc.wait()
            self._proc.stderr.close()
            self._proc = None
        for ns in reversed(self._made):
            LocalHost().run(["ip", "netns", "del", ns], check=False)
        self._made.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "TftpPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
