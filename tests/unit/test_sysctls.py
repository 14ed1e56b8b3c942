"""GlobalSysctls' rules, on a fake machine whose /proc/sys is a dict."""

import pytest

from labkit.exceptions import TestbedError
from labkit.host import Host
from labkit.sysctls import GlobalSysctls


class FakeMachine(Host):
    name = "fake"

    def __init__(self, files):
        self.files = files

    def _run(self, *a, **k):  # pragma: no cover - not used
        raise AssertionError

    def read_file(self, path):
        return self.files[path].encode()

    def write_file(self, path, data, mode=None):
        self.files[path] = data.decode().strip()


def test_max_is_never_lowered_below_what_the_machine_tracks(tmp_path):
    m = FakeMachine({"/proc/sys/net/netfilter/nf_conntrack_max": "262144",
                     "/proc/sys/net/netfilter/nf_conntrack_count": "5000"})
    g = GlobalSysctls("r", host=m, directory=tmp_path / "s", claim_path=str(tmp_path / "claim"))
    with pytest.raises(TestbedError) as info:
        g.set({"net.netfilter.nf_conntrack_max": 4000})
    assert "already tracks 5000" in str(info.value)
    assert m.files["/proc/sys/net/netfilter/nf_conntrack_max"] == "262144"
    g.set({"net.netfilter.nf_conntrack_max": 6000})
    assert m.files["/proc/sys/net/netfilter/nf_conntrack_max"] == "6000"
    assert g.restore() == {"net.netfilter.nf_conntrack_max": "262144"}
    assert m.files["/proc/sys/net/netfilter/nf_conntrack_max"] == "262144"
