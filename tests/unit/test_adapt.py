"""The lab profile for the machine it runs on: the check's comparison and derivation (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from labkit import adapt
from labkit.adapt import Basis, compare, lifetimes_for, pod_cpu
from labkit.calibrate import EXPECT_MAX, MAX, UDP_TIMEOUT, Measurement, write_profile
from labkit.exceptions import ScenarioError
from labkit.scenario import load_profile, load_scenario

SCENARIO = load_scenario()
LAB = SCENARIO._profile("lab")
BASIS = Basis.of(LAB)
ARTICLE = {n: SCENARIO.iteration(n, "article").article_tps for n in SCENARIO.numbers}


def check_load(rate: float, lifetime: float) -> Measurement:
    return Measurement("check-T3", 3, 1, rate, int(rate * lifetime * 1.2), lifetime, 0)


def derived(rate: float, lifetime: float = 7.3, cores: float = 2.0) -> dict:
    cpu = pod_cpu(cores, BASIS)
    m = check_load(rate, lifetime)
    reasons = compare(BASIS, cores, cpu, m)
    return adapt.adapt(BASIS, LAB, m, cores, cpu, ARTICLE, reasons)


def test_the_committed_lab_profile_names_what_it_was_derived_from():
    assert BASIS.cores == 2 and BASIS.cpu_limit == LAB.cpu_limit
    assert set(BASIS.lifetimes) >= {30, 10, 3} and BASIS.check_capacity > 0


def test_the_same_machine_keeps_the_committed_profile():
    assert compare(BASIS, 2.0, 0.35, check_load(BASIS.check_capacity * 1.05, 7.6)) == []


def test_a_machine_of_the_issue_serving_175_where_ours_served_300_differs_by_capacity():
    reasons = compare(BASIS, 2.0, 0.35, check_load(175.0, 7.3))
    assert len(reasons) == 1 and "175 transfers/s" in reasons[0] and "0.58x" in reasons[0]


def test_a_longer_reaping_lag_differs_by_lifetime():
    reasons = compare(BASIS, 2.0, 0.35, check_load(BASIS.check_capacity, 11.0))
    assert len(reasons) == 1 and "11.0 entry-s" in reasons[0]


def test_fewer_cpus_give_each_pod_its_share_and_that_alone_differs():
    assert pod_cpu(2.0, BASIS) == 0.35 and pod_cpu(4.0, BASIS) == 0.35
    assert pod_cpu(1.0, BASIS) == 0.175 and pod_cpu(0.5, BASIS) == pytest.approx(0.0875, abs=0.001)
    reasons = compare(BASIS, 1.0, 0.175, check_load(BASIS.check_capacity / 2, 7.3))
    assert any("gives the lab 1 CPU(s)" in r and "0.175" in r for r in reasons)


def test_tables_follow_the_measured_capacity():
    slow, fast = derived(175.0)["sysctl_values"][MAX], derived(600.0)["sysctl_values"][MAX]
    committed = LAB.sysctl_values[MAX]
    for article_value in committed:
        assert slow[article_value] < committed[article_value] < fast[article_value]
        assert slow[article_value] == pytest.approx(committed[article_value] * 175 / BASIS.check_capacity, rel=0.03)


def test_a_lag_change_shifts_every_lifetime_alike():
    assert lifetimes_for(BASIS, 9.3) == {30: 59.7, 10: 22.6, 3: 9.3}
    assert lifetimes_for(BASIS, 1.0)[3] == 3.0  # never shorter than the timeout itself


def test_the_derived_profile_keeps_the_article_committed_and_new_value_of_each_setting(tmp_path):
    doc = derived(175.0, cores=1.0)
    rows = {(r["sysctl"], r["article"]): r for r in doc["calibration"]["derivation"]}
    cpu = rows[("CPU per pod (cores)", "no limit")]
    assert (cpu["committed"], cpu["lab"]) == (0.35, 0.175)
    assert rows[(MAX, 131072)]["committed"] == LAB.sysctl_values[MAX][131072]
    assert rows[(EXPECT_MAX, 1024)]["lab"] == doc["sysctl_values"][EXPECT_MAX][1024]
    assert doc["cpu_limit"] == 0.175 and doc["background_flows"] == LAB.background_flows
    assert doc["run"] == {**dict(LAB.run), "concurrency": 32}
    assert "1 CPU(s)" in doc["description"] and doc["derived_from"].startswith("lab (")
    path = write_profile(doc, tmp_path / "profile-lab.yaml")
    loaded = load_profile(path, SCENARIO)
    assert loaded.name == "lab" and Basis.of(loaded).cores == 1.0
    it = SCENARIO.iteration(5, loaded)
    assert it.node_sysctls[MAX] == doc["sysctl_values"][MAX][524288] and it.cpu_limit == 0.175
    assert it.node_sysctls[UDP_TIMEOUT] == 30


def test_a_profile_without_a_basis_cannot_be_checked_and_says_how_to_go_on():
    bare = dataclasses.replace(LAB, extra={})
    with pytest.raises(ScenarioError, match="no calibration.basis.*--no-recalibrate"):
        Basis.of(bare)
    broken = dataclasses.replace(LAB, extra={"calibration": {"basis": {"cores": "two"}}})
    with pytest.raises(ScenarioError, match="incomplete or not numbers"):
        Basis.of(broken)


def test_transfers_in_flight_follow_the_pods_cpu():
    assert adapt.concurrency_for(64, 0.35, BASIS) == 64
    assert adapt.concurrency_for(64, 0.175, BASIS) == 32
    assert adapt.concurrency_for(64, 0.087, BASIS) == 16
    assert adapt.concurrency_for(64, 0.01, BASIS) == 8  # never a trickle
    half = derived(30.0, cores=0.5)
    assert half["run"]["concurrency"] == 16 and half["cpu_limit"] == pytest.approx(0.0875, abs=0.001)
    rows = {r["sysctl"]: r for r in half["calibration"]["derivation"]}
    assert (rows["transfers in flight"]["committed"], rows["transfers in flight"]["lab"]) == (64, 16)
    assert "transfers in flight" not in {r["sysctl"] for r in derived(175.0)["calibration"]["derivation"]}


def test_an_iteration_run_with_a_derived_profile_is_predicted_from_that_profile(tmp_path, monkeypatch):
    """The derived profile is named "lab" too: the model must take its capacity and lifetimes, not the
    committed profile's (a slower machine's iteration 8 then offers its own capacity, not 285/s)."""
    from labkit import capacity, run
    from labkit.session import IterationSession

    doc = derived(175.0, lifetime=9.3)
    path = write_profile(doc, tmp_path / "profile-lab.yaml")
    seen = {}
    monkeypatch.setattr(run, "run_iteration", lambda *a, **kw: seen.update(kw))
    session = IterationSession(8, str(path), out_dir=tmp_path / "it8")
    monkeypatch.setattr(IterationSession, "result_table", lambda self: None)
    session.run()
    cal = seen["calibration"]
    assert cal["capacity_transfers_per_s"] == doc["calibration"]["capacity_transfers_per_s"]
    row = {"transfers_per_s": 0.0, "conntrack_max": session.iteration.node_sysctls[MAX], "replicas": 1,
           "node_udp_timeout": 30, "pod_udp_timeout": 30, "profile": "lab"}
    mine, committed = capacity.predict_row(row, cal), capacity.predict_row(row)
    capacity_here = doc["calibration"]["capacity_transfers_per_s"]
    assert mine["model_offered_per_s"] == pytest.approx(capacity_here) and capacity_here < 0.7 * BASIS.capacity
    assert committed["model_offered_per_s"] == pytest.approx(BASIS.capacity)
    life = capacity.lifetime_from_profile(cal)
    assert dict(life.measured)[30.0] == pytest.approx(doc["calibration"]["basis"]["lifetime_entry_s"][30])
    assert dict(life.measured)[30.0] > BASIS.lifetimes[30]  # the longer reaping lag of this machine


class _FakeTestbed:
    def node_machine(self):
        return None  # (cores are given)

    def down(self):
        pass


def _slow_machine(monkeypatch, serves: float):
    """run_iteration on a machine that serves ``serves``/s: more in flight than it serves in
    the basis's transfer time queue into the client's retries and fail."""
    from labkit import run

    loads = []

    def fake_run(testbed, it, out_dir, **kw):
        loads.append(it.concurrency)
        fits = serves * 64 / BASIS.check_capacity  # in flight it serves in a basis transfer's time
        ok = int(serves * it.duration_s)
        failed = 0 if it.concurrency <= max(2, fits * 1.5) else int(it.concurrency * it.duration_s)
        return {"transfers_per_s": serves, "transfers_ok": ok, "transfers_failed": failed,
                "peak_node_count": int(serves * 7), "mean_node_count": serves * 7.0, "replicas": 1}

    monkeypatch.setattr(run, "run_iteration", fake_run)
    return loads


def test_a_machine_the_check_overwhelms_is_checked_again_with_fewer_in_flight(monkeypatch):
    """A VM under emulation serves a few transfers/s: the first load (64 in flight) loses most of its
    transfers; the check comes down to what it serves in a transfer's time, and the profile keeps that."""
    loads = _slow_machine(monkeypatch, serves=6.0)
    lines = []
    result = adapt.check(_FakeTestbed(), SCENARIO, LAB, cores=2.0, on_step=lines.append)
    assert loads[0] == 64 and loads[-1] < 8 and len(loads) == 2
    assert any("failed with 64 in flight" in line for line in lines)
    assert result.concurrency == loads[-1] and result.profile["run"]["concurrency"] == loads[-1]
    rows = {r["sysctl"]: r for r in result.profile["calibration"]["derivation"]}
    assert "kept in flight" in rows["transfers in flight"]["why"]


def test_a_machine_that_loses_transfers_at_any_concurrency_is_refused(monkeypatch):
    from labkit import run
    from labkit.exceptions import ReplayError

    monkeypatch.setattr(run, "run_iteration", lambda *a, **kw: {
        "transfers_per_s": 150.0, "transfers_ok": 3000, "transfers_failed": 900, "peak_node_count": 900,
        "mean_node_count": 800.0, "replicas": 1})
    fewer = int(150.0 * 64 / BASIS.check_capacity)
    lines = []
    with pytest.raises(ReplayError, match=rf"900 of 3900 transfers failed with {fewer} in flight.*--no-recalibrate"):
        adapt.check(_FakeTestbed(), SCENARIO, LAB, cores=2.0, on_step=lines.append)
    assert any(f"again with {fewer}" in line for line in lines)  # fewer in flight once; it lost as many


def test_a_check_that_served_nothing_in_its_steady_half_comes_down_by_its_whole_load_rate(monkeypatch):
    """In the lab VM the first load's steady rate was 0 (every late transfer failed) while 36 of 352
    had completed: the whole load's rate decides how many go in flight next."""
    from labkit import run

    loads = []

    def fake_run(testbed, it, out_dir, **kw):
        loads.append(it.concurrency)
        if it.concurrency > 4:
            return {"transfers_per_s": 0.0, "transfers_per_s_whole_load": 1.8, "transfers_ok": 36,
                    "transfers_failed": 316, "peak_node_count": 20, "mean_node_count": 10.0, "replicas": 1}
        return {"transfers_per_s": 4.0, "transfers_ok": 80, "transfers_failed": 0, "peak_node_count": 40,
                "mean_node_count": 36.0, "replicas": 1}

    monkeypatch.setattr(run, "run_iteration", fake_run)
    result = adapt.check(_FakeTestbed(), SCENARIO, LAB, cores=2.0)
    assert loads == [64, adapt.MIN_IN_FLIGHT] and result.concurrency == adapt.MIN_IN_FLIGHT

class _OneCpuMachine:
    """A machine reached over SSH with 1 CPU and no cgroup controller (as available_cpus asks)."""

    is_local, name = False, "root@lab"

    def run(self, argv, **kw):
        from labkit.host import Result

        return Result(" ".join(argv), self.name, 0, {"nproc": "1\n", "cat": "0::/\n"}[argv[0]], "", 0.0)

    def exists(self, path):
        return False


class _RemoteNetns:
    """A netns testbed on another machine (1 CPU there, whatever this one has)."""

    is_local = False
    name = "netns"

    def __init__(self):
        self.machine, self.downs = _OneCpuMachine(), 0

    def node_machine(self):
        from labkit.testbed.base import NodeMachine

        return NodeMachine(self.machine, "/run/labkit/replay-x", "python3")

    def down(self):
        self.downs += 1


def test_the_machine_check_measures_the_testbeds_machine_beside_the_replays_flows(monkeypatch):
    import labkit.run

    seen = {}

    def run_iteration(testbed, it, out, **kw):
        seen.update(cpu_limit=it.cpu_limit, flows=kw.get("flows"))
        return {"transfers_per_s": BASIS.check_capacity, "peak_node_count": 1000, "mean_node_count": 900.0,
                "replicas": 1, "transfers_failed": 0, "transfers_ok": 1000}

    monkeypatch.setattr(labkit.run, "run_iteration", run_iteration)
    testbed = _RemoteNetns()
    result = adapt.check(testbed, SCENARIO, LAB, flows="/run/labkit/replay-x/netns-bg-abcde")
    # that machine gives the lab 1 CPU (not this one's): a pod gets its share
    assert result.cores == 1.0 and seen["cpu_limit"] == pod_cpu(1.0, BASIS) < BASIS.cpu_limit
    assert seen["flows"] == "/run/labkit/replay-x/netns-bg-abcde" and testbed.downs == 2
    assert any("1 CPU(s) where the profile was derived with 2" in r for r in result.reasons)


def test_a_replay_checks_a_netns_testbed_on_another_machine_too(monkeypatch, tmp_path):
    from labkit.replay import driver

    checked = []

    class Manifest:
        data = {"run_id": "20261201-lab-x"}

        def save(self):
            pass

    def check(testbed, scenario, committed, *, on_step=None, flows=None):
        checked.append((testbed, flows))
        return adapt.Check(1.0, 0.175, check_load(100, 7.3), BASIS, ["slower"], None)

    testbed = _RemoteNetns()
    monkeypatch.setattr(driver, "build_testbed", lambda name, run_id: testbed)
    monkeypatch.setattr(driver, "_teardown", lambda options, run_id, number: None)
    monkeypatch.setattr(adapt, "check", check)
    options = driver.ReplayOptions(profile="lab", iterations=[2], out=tmp_path, report=None)
    assert driver._check_machine(options, tmp_path, Manifest(), flows="their flows") == "lab"
    assert checked == [(testbed, "their flows")]
    assert Manifest.data["calibration"]["differs"] is True
