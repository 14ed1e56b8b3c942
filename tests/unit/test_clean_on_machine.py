"""``labkit clean`` on a machine given as a Host: the same result as here, every file through the Host.

``ShellHost`` only knows how to run a command (here): every file and process primitive then
takes the path an SSH host takes, one command each; :func:`labkit.cleanup.clean` must find,
keep and remove exactly what it does on this machine natively.  No root, no network.
"""

import json
import os
import shutil
import socket

from labkit.cleanup import OWNER_NAME, boot_id, clean, live_owner, owner_record
from labkit.host import Host, run_subprocess
from labkit.ledger import Ledger, proc_start_time
from labkit.machine import ThisMachineOps


class ShellHost(Host):
    """A machine reached only through commands (as over SSH); its lock is a local flock."""

    name = "shellhost"
    lock = ThisMachineOps.lock
    boot = None  # a boot id of its own (as another machine's), else this machine's

    def __init__(self):
        self.commands = 0

    def _run(self, cmd, *, timeout, input, env):
        self.commands += 1
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        return run_subprocess(argv, " ".join(argv), self.name, timeout=timeout, input=input, env=env)

    def read_file(self, path):
        if path == "/proc/sys/kernel/random/boot_id" and self.boot:
            return self.boot.encode()
        with open(path, "rb") as f:
            return f.read()

    def write_file(self, path, data, mode=None):
        with open(path, "wb") as f:
            f.write(data)


DEAD = {"pid": 2 ** 22 + 7, "start": 1}


def _leftovers_of_crashes(state):
    """A state directory as crashes leave it: a dead replay, a live one, a killed testbed with a
    damaged ledger, a dead testbed, background flows of a dead process, stale temporary files."""
    dead = state / "replay-dead" / "netns-abcde"
    dead.mkdir(parents=True)
    Ledger(dead).record("path", path=str(dead / "srv"))
    (dead / "srv").mkdir()
    (dead / ".state.json.x1y2.tmp").write_text("{")
    (state / "replay-dead" / OWNER_NAME).write_text(json.dumps(DEAD))
    live = state / "replay-live" / "netns-fghij"
    live.mkdir(parents=True)
    Ledger(live).record("path", path=str(live / "srv"))
    (live / "srv").mkdir()
    (state / "replay-live" / OWNER_NAME).write_text(json.dumps({"pid": os.getppid()}))
    killed = state / "netns-klmno"
    killed.mkdir()
    ledger = Ledger(killed)
    ledger.record("path", path=str(killed / "srv"))
    (killed / "srv").mkdir()
    with open(ledger.path, "ab") as f:  # damaged in the middle, a record after it
        f.write(b"{not a record\n" + json.dumps({"op": "create", "id": 2, "kind": "path", "time": 0,
                                                  "path": str(killed / "logs")}).encode() + b"\n")
    (killed / "logs").mkdir()
    (killed / "state.json").write_text(json.dumps({"state": "up", "run_id": "klmno", "pods": []}))
    (killed / OWNER_NAME).write_text(json.dumps(DEAD))
    done = state / "netns-pqrst"
    done.mkdir()
    Ledger(done).record("path", path=str(done / "srv"))
    (done / "srv").mkdir()
    (state / "netns-bg-zz9").mkdir()
    (state / "netns-bg-zz9" / "flows.log").write_text("x")
    (state / "background-flows.json").write_text(json.dumps({**DEAD, "netns": "lkbgzz90"}))
    (state / ".global-sysctls.json.abcd.tmp").write_text("{")


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_clean_through_a_host_does_what_it_does_here(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    _leftovers_of_crashes(here)
    shutil.copytree(here, there)
    for ledger in there.rglob("ledger.jsonl"):  # the copies' ledgers name the copies' paths
        ledger.write_text(ledger.read_text().replace(str(here), str(there)))
    local = clean(here)
    machine = ShellHost()
    remote = clean(there, host=machine)
    assert machine.commands > 0  # it went through the Host
    assert [line.replace(str(here), "") for line in local.removed] == \
        [line.replace(str(there), "") for line in remote.removed]
    assert [line.replace(str(here), "") for line in local.kept] == \
        [line.replace(str(there), "") for line in remote.kept]
    assert local.problems == remote.problems == []
    assert _tree(here) == _tree(there) == ["replay-live", "replay-live/netns-fghij", "replay-live/netns-fghij/"
                                           "ledger.jsonl", "replay-live/netns-fghij/srv", "replay-live/owner.json"]
    assert "path " + str(there / "netns-klmno" / "logs") in remote.removed  # past the damaged line
    assert f"stale marker {there / 'background-flows.json'}" in remote.removed
    assert any("replay live is running" in k for k in remote.kept)


def test_an_owner_is_looked_for_on_the_machine_it_names(tmp_path):
    me = owner_record()
    assert (me["boot_id"], me["machine"]) == (boot_id(), socket.gethostname())
    parent = {"pid": os.getppid(), "start": proc_start_time(os.getppid())}
    assert live_owner(json.dumps(parent).encode())  # an old record: a process of this machine
    assert live_owner(json.dumps({**parent, "boot_id": boot_id()}).encode())
    assert live_owner(json.dumps(me).encode()) is None  # this process is not another run
    # this machine before a reboot: gone, whatever runs under that pid now
    assert live_owner(json.dumps({**parent, "boot_id": "old", "machine": socket.gethostname()}).encode()) is None
    # the state's machine (another boot id): the process is looked for there
    machine = ShellHost()
    machine.boot = "the-other-machine"
    on_it = json.dumps({**parent, "boot_id": "the-other-machine", "machine": "m2"}).encode()
    assert live_owner(on_it, machine) and live_owner(json.dumps({**DEAD, "boot_id": "the-other-machine"}).encode(),
                                                     machine) is None
    # a third machine: not to be looked at from here, so left alone, and said so
    third = {**DEAD, "boot_id": "third", "machine": "controller-2"}
    assert live_owner(json.dumps(third).encode(), machine)["elsewhere"]
    run = tmp_path / "netns-abcde"
    run.mkdir()
    Ledger(run).record("path", path=str(run / "srv"))
    (run / "srv").mkdir()
    (run / OWNER_NAME).write_text(json.dumps(third))
    report = clean(tmp_path, host=machine)
    assert (run / "srv").exists() and not report.removed and not report.problems
    [kept] = report.kept
    assert "abcde" in kept and "on machine controller-2" in kept and "left alone" in kept


def test_a_replay_runs_teardown_cleans_its_folder_on_the_testbeds_machine(tmp_path, monkeypatch):
    from labkit.testbed.netns import NetnsTestbed

    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path))
    folder = tmp_path / "replay-rp1"
    for rid in ("abcde", "fghij"):  # the notebook's testbed and one a dead kernel left
        run = folder / f"netns-{rid}"
        run.mkdir(parents=True)
        Ledger(run).record("path", path=str(run / "srv"))
        (run / "srv").mkdir()
        (run / "state.json").write_text(json.dumps({"state": "up", "run_id": rid}))
        (run / OWNER_NAME).write_text(json.dumps(DEAD))
    machine = ShellHost()
    testbed = NetnsTestbed.for_replay("rp1", host=machine)
    status = testbed.status()  # `labkit status`, read through the Host: the namespaces are gone
    assert status["state"] == "broken" and status["machine"] == "shellhost"
    assert f"namespace lk{testbed.run_id}-client is missing" in status["problems"]
    removed = testbed.teardown()
    assert sorted(removed) == [f"path {folder / 'netns-abcde' / 'srv'}", f"path {folder / 'netns-fghij' / 'srv'}"]
    assert not folder.exists() and testbed.run_id is None and machine.commands > 0
