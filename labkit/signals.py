"""SIGTERM and SIGHUP end a labkit command the way Ctrl-C (SIGINT) does.

Python turns SIGINT into :class:`KeyboardInterrupt`, and every command tears down
what it made on the way out (``finally`` blocks, the testbed's ``down``, the
replay's teardown and manifest).  ``kill``, ``timeout``, a closed terminal and
service managers send SIGTERM or SIGHUP instead, whose default is to die on the
spot and leave everything behind.  :func:`orderly_signals` makes them raise the
same exception, so one code path serves all three; :attr:`Caught.signum` says
which signal it was (the exit code is 128 + its number, as a shell reports).

While a testbed is being built or cleaned, :class:`Interrupts` defers them instead:
the signal is noted and raised at the next safe point, so cleanup never races a
child that is still making what it makes.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

ORDERLY = (signal.SIGTERM, signal.SIGHUP)
_active: list["Caught"] = []


@dataclass
class Caught:
    """The signal that interrupted the command (SIGINT unless another was caught)."""

    signum: int | None = None

    @property
    def name(self) -> str:
        """``SIGTERM``, ``SIGHUP`` or ``SIGINT``."""
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number."""
        return 128 + int(self.signum or signal.SIGINT)


def noted(signum: int) -> None:
    """Tell the command which signal came, when a handler of its own (one that defers the
    signal to a safe point) caught it instead of :func:`orderly_signals`."""
    if _active:
        _active[-1].signum = signum


@contextmanager
def orderly_signals() -> Iterator[Caught]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt like SIGINT (main thread only)."""
    caught = Caught()
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def interrupt(signum, frame):
        caught.signum = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def note_sigint(signum, frame):
        caught.signum = signum
        raise KeyboardInterrupt("SIGINT")

    old = {s: signal.signal(s, interrupt) for s in ORDERLY}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, note_sigint)
    _active.append(caught)
    try:
        yield caught
    finally:
        _active.remove(caught)
        for s, handler in old.items():
            signal.signal(s, handler)


class Interrupts:
    """SIGINT/SIGTERM/SIGHUP while building are noted, and raised at the next safe point.

    A signal raised at an arbitrary point could land while a child (``ip netns add``)
    is still being started, and the cleanup would run before the child made what
    it makes.  So the handler only notes the signal; :meth:`check` (called before
    each ledger record and in waits) raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")

    @contextmanager
    def deferred(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, frame):
            self.signum = signum
            noted(signum)  # the command's exit code says which signal it was

        old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
            self.check()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.signum = None


def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP off while cleaning up (a second signal must not leave half a lab);
    one that came meanwhile is raised as KeyboardInterrupt once the cleanup is done."""
    return Interrupts().deferred()
