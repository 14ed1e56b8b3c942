"""A rough transfers/s probe of the netns testbed (the real measurement tool is labkit.loadgen).

Brings the testbed up for a few iterations (quick profile by default, without the global
sysctls unless --globals) and runs closed-loop TFTP read requests from the client namespace:
each transfer from a fresh UDP port, the file fetched block by block, no retransmission
(a lost packet is a failed transfer).  Prints transfers/s, failures, and the conntrack
counters of the node and the pods.

    sudo .venv/bin/python benchmarks/tftp_rate.py [--seconds 8] [--threads 8] [--iterations 1 2 9]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import tempfile
import threading
import time

from labkit.host import in_netns
from labkit.scenario import load_scenario, with_overrides
from labkit.testbed import get_testbed


def fetch(addr: tuple[str, int], name: str, timeout: float) -> int:
    """One transfer; return the bytes received (raises on timeout or error)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00", addr)
        size, expect = 0, 1
        while True:
            data, peer = sock.recvfrom(1024)
            op, block = struct.unpack("!HH", data[:4])
            if op != 3 or block != expect:
                raise OSError(f"unexpected packet op={op} block={block}")
            size += len(data) - 4
            sock.sendto(struct.pack("!HH", 4, block), peer)
            if len(data) - 4 < 512:
                return size
            expect += 1
    finally:
        sock.close()


def load(netns: str, addr, name: str, size: int, seconds: float, threads: int) -> tuple[int, int]:
    ok, failed = [0], [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker():
        while time.monotonic() < stop:
            try:
                good = fetch(addr, name, 1.0) == size
            except OSError:
                good = False
            with lock:
                (ok if good else failed)[0] += 1

    runners = [threading.Thread(target=in_netns, args=(netns, worker)) for _ in range(threads)]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    return ok[0], failed[0]


def counters(tb) -> str:
    out = []
    for role in tb.roles():
        if role in ("node",) or role.startswith("pod-"):
            h = tb.host(role)
            out.append(f"{role} count={h.read_sysctl('net.netfilter.nf_conntrack_count')}")
    return ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 9])
    parser.add_argument("--globals", action="store_true", help="also set the global conntrack sysctls")
    args = parser.parse_args()
    scenario = load_scenario()
    with tempfile.TemporaryDirectory(prefix="lkrate-") as state:
        os.environ["LABKIT_STATE_DIR"] = state
        tb = get_testbed("netns", global_wait=300)
        try:
            for n in args.iterations:
                it = scenario.iteration(n, args.profile)
                if not args.globals:
                    it = with_overrides(it, node_sysctls=it.namespaced_node_sysctls)
                tb.up(it)
                node_ip, port = tb.service
                ok, failed = load(tb.host("client").netns, (node_ip, port), tb.file.name, tb.file.size,
                                  args.seconds, args.threads)
                print(f"iteration {n} ({it.setup}, {it.replicas} replica(s), cpu {it.cpu_limit}): "
                      f"{ok / args.seconds:.0f} transfers/s, {failed} failed; {counters(tb)}", flush=True)
        finally:
            tb.down()


if __name__ == "__main__":
    main()
