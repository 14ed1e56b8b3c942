"""Host and Result behaviour that needs neither root nor network."""

import os
import time

import pytest

from labkit.exceptions import CommandFailed, CommandTimedOut, SysctlError
from labkit.host import LocalHost, Result, sysctl_name, sysctl_path


@pytest.mark.parametrize("name, path", [
    ("net.netfilter.nf_conntrack_max", "/proc/sys/net/netfilter/nf_conntrack_max"),
    ("/proc/sys/net/netfilter/nf_conntrack_max", "/proc/sys/net/netfilter/nf_conntrack_max"),
    ("net.ipv4.conf.eth0/1.rp_filter", "/proc/sys/net/ipv4/conf/eth0.1/rp_filter"),
])
def test_sysctl_names_in_both_forms_map_to_proc_sys(name, path):
    assert sysctl_path(name) == path


def test_sysctl_dotted_form_round_trips():
    assert sysctl_name("/proc/sys/net/netfilter/nf_conntrack_udp_timeout") == \
        "net.netfilter.nf_conntrack_udp_timeout"


@pytest.mark.parametrize("bad", ["", "net..max", "/etc/passwd", "/proc/sys/../etc", "net.netfilter.a b",
                                 "net.netfilter.x;rm"])
def test_bad_sysctl_names_are_refused_naming_the_name(bad):
    with pytest.raises(SysctlError) as info:
        sysctl_path(bad)
    assert "invalid sysctl name" in str(info.value)


def test_run_returns_result_with_exit_code_streams_and_duration():
    res = LocalHost().run("echo out; echo err >&2; exit 3", check=False)
    assert (res.exit_code, res.stdout, res.stderr, res.ok) == (3, "out\n", "err\n", False)
    assert res.host == "local" and res.duration >= 0
    assert "exit=3" in repr(res)


def test_check_raises_command_failed_with_the_result():
    with pytest.raises(CommandFailed) as info:
        LocalHost().run(["sh", "-c", "echo boom >&2; exit 2"])
    assert info.value.result.exit_code == 2
    assert "boom" in str(info.value)


def test_argv_is_not_shell_interpreted():
    res = LocalHost().run(["echo", "$HOME; false"])
    assert res.stdout == "$HOME; false\n"


def test_missing_program_gives_exit_127_not_an_exception():
    res = LocalHost().run(["labkit-no-such-program"], check=False)
    assert res.exit_code == 127 and "not found" in res.stderr


def test_deadline_ends_the_command_and_its_children():
    start = time.monotonic()
    with pytest.raises(CommandTimedOut) as info:
        LocalHost().run("sleep 30 & sleep 30; wait", timeout=0.5)
    assert time.monotonic() - start < 5
    assert info.value.timeout == 0.5


def test_large_output_on_both_streams_completes():
    cmd = "head -c 10485760 /dev/zero | tr '\\0' a; head -c 10485760 /dev/zero | tr '\\0' b >&2"
    res = LocalHost().run(cmd, timeout=60)
    assert len(res.stdout) == len(res.stderr) == 10 * 1024 * 1024


def test_input_reaches_stdin():
    assert LocalHost().run(["cat"], input="hello").stdout == "hello"


def test_files_put_and_get(tmp_path):
    host = LocalHost()
    src = tmp_path / "a"
    src.write_bytes(b"\x00\x01data")
    host.put(src, str(tmp_path / "b"), mode=0o600)
    assert os.stat(tmp_path / "b").st_mode & 0o777 == 0o600
    host.get(str(tmp_path / "b"), tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == b"\x00\x01data"


def test_result_is_immutable():
    res = Result("true", "h", 0, "", "", 0.0)
    with pytest.raises(Exception):
        res.exit_code = 1  # type: ignore[misc]


def test_an_interrupted_command_gets_to_clean_up_before_it_is_ended(tmp_path):
    # Ctrl-C during a long command (a load, a replay step): the command sees SIGINT
    # and runs its own cleanup, as at a terminal, instead of dying mid-write.
    import signal
    import sys
    import threading
    marker = tmp_path / "cleaned"
    child = ("import time\n"
             "try:\n    time.sleep(30)\n"
             f"finally:\n    open({str(marker)!r}, 'w').write('yes')\n")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        LocalHost().run([sys.executable, "-c", child], timeout=60)
    timer.cancel()
    assert time.monotonic() - start < 10
    assert marker.read_text() == "yes"
