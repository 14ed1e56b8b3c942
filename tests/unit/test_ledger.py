"""The ledger: written before creation, undone in reverse, exact, idempotent, crash-tolerant."""

import pytest

from labkit import ledger as ledger_mod
from labkit.exceptions import TestbedError
from labkit.ledger import Ledger


@pytest.fixture
def removed(monkeypatch):
    calls = []
    monkeypatch.setitem(ledger_mod.REMOVERS, "netns", lambda e, l: calls.append(e["name"]))
    monkeypatch.setitem(ledger_mod.REMOVERS, "link", lambda e, l: calls.append(e["name"]))
    return calls


def test_undo_removes_in_reverse_order_once(tmp_path, removed):
    led = Ledger(tmp_path / "run")
    a = led.record("netns", name="lkab-node")
    led.note(a, inode=42)
    led.record("link", netns="lkab-node", name="lkabbr")
    led.record("netns", name="lkab-pod1")
    assert led.entries()[0]["inode"] == 42
    led.undo()
    assert removed == ["lkab-pod1", "lkabbr", "lkab-node"]
    assert led.entries() == []
    led.undo()  # idempotent: nothing left to do
    assert len(removed) == 3
    led.discard()
    assert not (tmp_path / "run").exists()


def test_a_forgotten_resource_is_not_removed_again(tmp_path, removed):
    led = Ledger(tmp_path)
    a = led.record("netns", name="one")
    led.record("netns", name="two")
    led.remove(led.entries()[0])
    assert removed == ["one"] and [e["name"] for e in led.entries()] == ["two"]
    assert a == 1


def test_a_torn_last_line_from_a_crash_is_ignored(tmp_path, removed):
    led = Ledger(tmp_path)
    led.record("netns", name="one")
    with open(led.path, "a") as f:
        f.write('{"op": "create", "id": 2, "kind": "net')
    assert [e["name"] for e in led.entries()] == ["one"]


def test_undo_goes_on_after_a_failure_and_reports_it(tmp_path, monkeypatch):
    led = Ledger(tmp_path)
    seen = []

    def flaky(entry, _):
        seen.append(entry["name"])
        if entry["name"] == "bad":
            raise OSError("busy")

    monkeypatch.setitem(ledger_mod.REMOVERS, "netns", flaky)
    led.record("netns", name="first")
    led.record("netns", name="bad")
    led.record("netns", name="last")
    with pytest.raises(TestbedError, match="bad.*busy"):
        led.undo()
    assert seen == ["last", "bad", "first"]
    assert [e["name"] for e in led.entries()] == ["bad"]  # kept for the next clean


def test_paths_outside_the_run_directory_are_never_removed(tmp_path):
    outside = tmp_path / "precious"
    outside.write_text("keep")
    led = Ledger(tmp_path / "run")
    led.record("path", path=str(outside))
    with pytest.raises(TestbedError, match="outside the run directory"):
        led.undo()
    assert outside.read_text() == "keep"
    inside = tmp_path / "run" / "srv"
    inside.mkdir()
    (inside / "f").write_text("x")
    led.record("path", path=str(inside))
    led.remove(led.entries()[-1])
    assert not inside.exists()


def test_unknown_kinds_are_refused(tmp_path):
    with pytest.raises(ValueError):
        Ledger(tmp_path).record("volcano", name="x")
