"""Helpers of the crash-and-signal matrix: run a labkit command, catch it at a moment, kill it.

A *moment* is read from the run's own records as it goes (every few milliseconds):

- ``building``: a testbed's ``state.json`` says ``building`` and its ledger lists a namespace;
- ``reconfiguring``: (``up`` on a running testbed) the ledger gets a new server process;
- ``loading``: a load is announced (``load.json``);
- ``tearing down``: after the load (or, for ``up``, on the way to fewer pods), the ledger
  marks a server process removed.

The machine's record holds what a leak would change: namespaces, the machine's own
links and iptables rules, the global conntrack sysctls, ``/run/labkit``, live
processes that name the test's state folder (``in.tftpd`` serves from it, the loadgen
writes its CSV there, kernels keep their connection files there), and cgroups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from labkit.cgroups import cpu_root
from labkit.host import LocalHost

LAB_NAMES = ("lk", "labkit-")  # names of lab runs that may come and go meanwhile (netns runs, the vm tier)


def ledger_lines(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def observe(state: Path) -> set[str]:
    """The moments a run under ``state`` has reached so far (see the module's docstring)."""
    seen: set[str] = set()
    for run in list(state.glob("netns-*")) + list(state.glob("replay-*/netns-*")):
        lines = ledger_lines(run / "ledger.jsonl")
        kinds = {e.get("id"): e.get("kind") for e in lines if e.get("op") == "create"}
        try:
            doc = json.loads((run / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            doc = {}
        if doc.get("state") == "building" and "netns" in kinds.values():
            seen.add("building")
        if (run / "load.json").exists():
            seen.add("loading")
        processes = [i for i, k in kinds.items() if k == "process"]
        if processes:
            seen.add("servers")
        if any(e.get("op") == "removed" and kinds.get(e.get("id")) == "process" for e in lines):
            seen.add("tearing down")
    return seen


def spawn(state: Path, args: list[str]) -> subprocess.Popen:
    """Start ``python -m labkit ARGS`` with its own state folder."""
    env = dict(os.environ, LABKIT_STATE_DIR=str(state))
    return subprocess.Popen([sys.executable, "-m", "labkit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def labkit(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, LABKIT_STATE_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "labkit", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_for(state: Path, proc: subprocess.Popen, moment: str, after: set[str] = frozenset(),
             timeout: float = 240) -> float:
    """Poll until ``moment`` (and every moment of ``after``) has been seen; return when (monotonic).

    Raises:
        AssertionError: the command ended first, or the moment never came.
    """
    deadline = time.monotonic() + timeout
    need = set(after) | {moment}
    seen: set[str] = set()  # cumulative: a load's announcement is gone once its teardown starts
    while time.monotonic() < deadline:
        seen |= observe(state)
        if need <= seen:
            return time.monotonic()
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}) before {moment!r}: "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.003)
    raise AssertionError(f"{moment!r} never came within {timeout} s")


def processes_naming(text: str) -> list[str]:
    """Live (not zombie) processes whose command line contains ``text``."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and status not in ("Z", "X"):
            out.append(f"{pid} {cmd.strip()[:160]}")
    return out


def lab_cgroups() -> set[str]:
    """The cgroups labkit makes (``lk`` names): the pods' and loadgens' (CPU controller) and the
    notebook kernels'."""
    from labkit.replay.guard import kernel_cgroup_root

    names = set()
    for root in {cpu_root()[0], kernel_cgroup_root()}:
        names |= {p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("lk")}
    return names


def record(state: Path) -> dict:
    """What a leak would change (see the module's docstring)."""
    host = LocalHost()
    rules = host.run(["iptables-save"]).stdout
    run_labkit = Path("/run/labkit")
    return {
        "netns": {line.split()[0] for line in host.run(["ip", "netns", "list"]).stdout.splitlines()},
        "links": {line.split(":")[1].strip().split("@")[0]
                  for line in host.run(["ip", "-o", "link"]).stdout.splitlines()},
        "iptables": [line for line in rules.splitlines() if not line.startswith("#")],
        "run_labkit": sorted(os.listdir(run_labkit)) if run_labkit.is_dir() else None,
        "cgroups": lab_cgroups(),
        "processes": processes_naming(str(state)),
        "state": sorted(str(p.relative_to(state)) for p in state.rglob("*")) if state.exists() else [],
    }


def differences(before: dict, after: dict, ours: set[str]) -> list[str]:
    """What changed from ``before`` to ``after``, ignoring other lab runs' ``lk`` names
    (other tests share this machine) unless they carry one of ``ours`` (this run's ids)."""
    problems = []
    for key in ("netns", "links", "cgroups"):
        changed = before[key] ^ after[key]
        mine = {n for n in changed if any(i in n for i in ours)}
        foreign = {n for n in changed if not n.startswith(LAB_NAMES)}
        if mine or foreign:
            problems.append(f"{key}: {sorted(mine | foreign)}")
    if after["iptables"] != before["iptables"]:
        problems.append("the machine's own iptables rules changed")
    # the runs here keep their state in the test's folder: nothing of theirs may be in /run/labkit
    # (which the lab runs of others use meanwhile)
    strays = [n for n in (after["run_labkit"] or []) if any(i[2:] in n for i in ours)]
    if strays:
        problems.append(f"/run/labkit: {strays}")
    if after["processes"]:
        problems.append(f"processes: {after['processes']}")
    if after["state"]:
        problems.append(f"state folder not empty: {after['state'][:10]}")
    return problems


def run_ids(state: Path) -> set[str]:
    """The ids of the runs recorded under ``state`` (netns runs and replays)."""
    ids = set()
    for run in list(state.glob("netns-*")) + list(state.glob("replay-*/netns-*")):
        ids.add(f"lk{run.name.split('-', 1)[1]}")
    for replay in state.glob("replay-*"):
        ids.add(f"lkreplay-{replay.name.split('-', 1)[1]}")
    return ids
