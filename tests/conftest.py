"""Shared fixtures: root detection and throw-away network namespaces.

Integration tests are marked ``integration``; they skip, naming the reason, only
where a prerequisite truly cannot exist (not root, not Linux, a program missing).
Every namespace a fixture makes is removed afterwards, whatever the test did.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess

import pytest

_counter = itertools.count()


def pytest_configure(config):
    """Ctrl-C as a user at a terminal has it, whoever started the suite: a launcher that
    ignores SIGINT (``cmd &`` in a script, some CI runners) would hand that on to every
    command the tests start, and the tests of what labkit does on Ctrl-C (and the flows'
    watch, which interrupts a load with SIGINT) would see nothing happen."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def need_root() -> None:
    """Skip the calling test unless it runs as root on Linux."""
    if os.name != "posix" or os.uname().sysname != "Linux":
        pytest.skip("needs a Linux kernel")
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, sysctls)")


def need_program(*names: str) -> None:
    """Skip the calling test unless every program is on PATH (sbin included)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [n for n in names if not shutil.which(n, path=path)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make test installs it)")


def unique_name(prefix: str = "lkt") -> str:
    """A resource name unique to this test process, at most 15 characters."""
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"[:15]


@pytest.fixture
def netns():
    """Make a fresh, empty network namespace; remove it after the test."""
    need_root()
    need_program("ip")
    made = []

    def make(name: str | None = None) -> str:
        name = name or unique_name()
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
