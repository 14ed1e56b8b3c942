"""NetnsHost on real namespaces that the tests create and remove."""

import pytest

from labkit.exceptions import SysctlError, TestbedError
from labkit.host import LocalHost, NetnsHost

pytestmark = pytest.mark.integration

UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"


def _track(ns: str) -> None:
    # conntrack only runs in a namespace once a ruleset there needs it
    NetnsHost(ns).run(["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"])


def test_command_runs_inside_the_namespace(netns):
    ns = netns()
    links = NetnsHost(ns).run(["ip", "-o", "link"]).stdout
    assert "lo" in links and "eth0" not in links


def test_namespaced_sysctl_is_written_there_and_not_outside(netns):
    ns = netns()
    _track(ns)
    host = NetnsHost(ns)
    outside = LocalHost().read_sysctl(UDP_TIMEOUT)
    new = "17" if outside != "17" else "19"
    host.write_sysctl(UDP_TIMEOUT, new)
    assert host.read_sysctl("/proc/sys/net/netfilter/nf_conntrack_udp_timeout") == new
    assert host.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"]).stdout.strip() == new
    assert LocalHost().read_sysctl(UDP_TIMEOUT) == outside


def test_global_sysctl_is_read_only_in_a_namespace(netns):
    ns = netns()
    _track(ns)
    with pytest.raises(SysctlError) as info:
        NetnsHost(ns).write_sysctl("net.netfilter.nf_conntrack_max", 1234)
    assert "nf_conntrack_max" in str(info.value) and "Permission denied" in str(info.value)


def test_value_refused_by_the_kernel_keeps_its_message(netns):
    ns = netns()
    _track(ns)
    with pytest.raises(SysctlError) as info:
        NetnsHost(ns).write_sysctl(UDP_TIMEOUT, "not-a-number")
    assert "Invalid argument" in str(info.value)


def test_missing_namespace_is_a_clear_error():
    with pytest.raises(TestbedError) as info:
        NetnsHost("lk-no-such-ns").read_sysctl(UDP_TIMEOUT)
    assert "lk-no-such-ns" in str(info.value)
