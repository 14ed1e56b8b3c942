"""`labkit doctor` on this machine: all green, and its probe namespace is gone afterwards."""

import subprocess
import sys

import pytest

from tests.conftest import need_root

pytestmark = pytest.mark.integration


def test_doctor_is_green_here_and_leaves_no_namespace():
    need_root()
    res = subprocess.run([sys.executable, "-m", "labkit", "doctor"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("TFTP conntrack helper", "netfilter NAT", "bridge", "veth", "program in.tftpd"):
        line = next(line for line in res.stdout.splitlines() if line.startswith(name))
        assert line.split()[len(name.split())] == "ok", line
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "lkdoc" not in after
