"""The load generator run over SSH, as the Vagrant/ssh testbeds run it on the client VM.

A real sshd on loopback; the "client" is an SSH view of a network namespace in
which a real in.tftpd serves a file, so the transfers stay inside that
namespace.  ``run_load_on`` sends ``python -m labkit loadgen ... --json`` through
``SSHHost.run`` and parses what comes back.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from labkit.host import NetnsHost
from tests.conftest import need_program

pytestmark = pytest.mark.integration
loadgen = pytest.importorskip("labkit.loadgen", reason="needs labkit.loadgen (the loadgen part)")


@pytest.fixture
def tftp_netns(netns, tmp_path):
    """A namespace with lo up and in.tftpd serving one 5 KiB file on port 69."""
    need_program("in.tftpd")
    ns = netns()
    NetnsHost(ns).run(["ip", "link", "set", "lo", "up"])
    served = tmp_path / "srv"
    served.mkdir()
    data = os.urandom(5120)
    (served / "file-5120.bin").write_bytes(data)
    os.chmod(tmp_path, 0o755)
    os.chmod(served, 0o755)
    os.chmod(served / "file-5120.bin", 0o644)
    server = subprocess.Popen(["ip", "netns", "exec", ns, "in.tftpd", "--foreground", "--secure",
                               "--address", ":69", "--user", "tftp", str(served)])
    time.sleep(0.3)
    yield ns, hashlib.sha256(data).hexdigest()
    server.kill()
    server.wait()


def test_loadgen_runs_on_a_remote_client_and_returns_tidy_results(sshd, tftp_netns):
    ns, sha = tftp_netns
    with sshd.ssh_host() as host:
        client = host.netns(ns, host_name="client")
        spec = loadgen.LoadSpec("127.0.0.1", 69, "file-5120.bin", expected_size=5120, sha256=sha,
                                concurrency=4, duration=2.0)
        result = loadgen.run_load_on(client, spec, transfers=True, python=sys.executable)
    assert result.summary["ok"] > 50 and result.summary["failed"] == 0
    assert result.summary["transfers_per_s"] > 10
    series = result.timeseries  # tidy: time, elapsed_s, metric, value
    assert {"time", "metric", "value"} <= set(series.columns)
    assert series[series.metric == "completed"]["value"].sum() == result.summary["ok"]
    assert len(result.transfers) == result.summary["started"]
