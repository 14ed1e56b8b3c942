"""GlobalSysctls on the real kernel: saved first, restored exactly, one owner at a time."""

import json

import pytest

from labkit.exceptions import SysctlError, TestbedError
from labkit.host import LocalHost
from labkit.sysctls import GlobalSysctls

pytestmark = pytest.mark.integration
EXPECT_MAX = "net.netfilter.nf_conntrack_expect_max"


@pytest.fixture
def dirs(tmp_path):
    from tests.conftest import need_root
    need_root()
    return tmp_path / "state-a", tmp_path / "state-b", str(tmp_path / "claim")


def test_set_saves_the_original_before_writing_and_restore_gives_it_back(dirs):
    a, _, claim = dirs
    host = LocalHost()
    before = host.read_sysctl(EXPECT_MAX)
    g = GlobalSysctls("run-a", directory=a, claim_path=claim)
    try:
        g.set({EXPECT_MAX: int(before) + 7})
        assert host.read_sysctl(EXPECT_MAX) == str(int(before) + 7)
        assert json.loads((a / "global-sysctls.json").read_text())["saved"][EXPECT_MAX] == before
        g.set({EXPECT_MAX: int(before) + 9})  # a second set keeps the first original
        assert g.saved()[EXPECT_MAX] == before
    finally:
        g.restore()
    assert host.read_sysctl(EXPECT_MAX) == before
    assert not (a / "global-sysctls.json").exists()
    assert g.restore() == {}  # idempotent


def test_a_second_run_cannot_take_the_globals_while_one_holds_them(dirs):
    a, b, claim = dirs
    before = LocalHost().read_sysctl(EXPECT_MAX)
    first = GlobalSysctls("run-a", directory=a, claim_path=claim)
    try:
        first.set({EXPECT_MAX: int(before) + 1})
        with pytest.raises(TestbedError) as info:
            GlobalSysctls("run-b", directory=b, claim_path=claim).set({EXPECT_MAX: 5}, wait=0.3)
        assert "labkit clean" in str(info.value)
    finally:
        first.restore()
    assert LocalHost().read_sysctl(EXPECT_MAX) == before


def test_a_namespaced_sysctl_is_refused(dirs):
    a, _, claim = dirs
    with pytest.raises(SysctlError) as info:
        GlobalSysctls("run-a", directory=a, claim_path=claim).set(
            {"net.netfilter.nf_conntrack_udp_timeout": 10})
    assert "nf_conntrack_udp_timeout" in str(info.value)


