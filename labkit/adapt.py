"""The ``lab`` profile for the machine it runs on: check that machine, derive its own values.

The machine is the netns testbed's (this one, or one reached over SSH: its
:meth:`~labkit.testbed.base.Testbed.node_machine`); "this machine" below is that one.

The committed ``lab`` profile was derived by ``labkit calibrate`` on one machine
(its ``calibration.basis``: the CPUs the lab had, one pod's capacity, the
entry lifetimes).  Its table sizes admit a share of *that* machine's capacity;
on a machine half as fast no table after iteration 4 fills, and on one twice as
fast every table does.  So before its first iteration a ``lab`` replay measures
this machine with one short load (:func:`check`, :data:`CHECK_S` seconds, one
pod at a :data:`CHECK_TIMEOUT` s UDP timeout with tables no load fills, the
background flows warm) and compares it with the basis (:func:`compare`):

* **CPU**: a pod's CPU limit is the basis's share of the machine
  (``cpu_limit x cores / basis cores``, never more than the basis's), so that two
  pods, the client and the kernel's share still fit in what this machine gives
  the lab (its CPUs, less any cgroup quota above the lab); the transfers in
  flight follow the pod's CPU (:func:`concurrency_for`);
* **capacity**: the transfers/s that one pod serves at that limit;
* **entry lifetime**: the entry-seconds one transfer holds in the node at the
  short timeout, which is the timeout plus the kernel's reaping lag.

When one differs by more than :data:`TOLERANCE`, :func:`adapt` derives the
profile for this machine with :func:`labkit.calibrate.derive_from`, the same
rule ``labkit calibrate`` applies: the capacity is the basis's, scaled by the
measured ratio; the lifetime at each timeout is the basis's, shifted by the
measured change of the reaping lag (two entries per transfer, each living its
timeout plus the lag, so a lag change shifts every lifetime alike).  The
derived document records the measurement, the basis and, for every value, the
article's, the committed and the derived one.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from labkit.calibrate import (MAX_FAILED_SHARE, Measurement, measurement_iteration, derive_from,
                              measurement)
from labkit.exceptions import ReplayError, ScenarioError

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 3  # seconds: the count is steady within seconds, so a short load measures it
CHECK_S = 20.0
TOLERANCE = 0.15  # what one short load can tell apart from noise (calibration loads vary by ~6 %)
PROFILE_FILE = "profile-lab.yaml"
CHECK_ATTEMPTS = 3  # a machine far slower than the basis gets two more loads with fewer in flight
MIN_IN_FLIGHT = 2


@dataclass(frozen=True)
class Basis:
    """What a lab profile was derived from (its ``calibration.basis``).

    Attributes:
        cores: CPUs the lab had.
        cpu_limit: CPU cores per pod.
        capacity: one pod's transfers/s at a 10 s timeout (the derivation's capacity).
        check_capacity: one pod's transfers/s at the check's timeout (what a check compares).
        lifetimes: entry-seconds per transfer in the node, by UDP timeout.
        peak_t10: the node's peak count under one pod at a 10 s timeout.
    """

    cores: float
    cpu_limit: float
    capacity: float
    check_capacity: float
    lifetimes: dict[int, float]
    peak_t10: float

    @classmethod
    def of(cls, profile: Any) -> "Basis":
        """The basis of a :class:`~labkit.scenario.Profile`.

        Raises:
            ScenarioError: the profile has no complete ``calibration.basis``.
        """
        raw = ((profile.extra or {}).get("calibration") or {}).get("basis")
        where = f"profile {profile.name!r} ({profile.source})"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where} has no calibration.basis: it cannot be checked against this machine "
                                "(run `labkit calibrate`, or replay with --no-recalibrate)")
        try:
            lifetimes = {int(k): float(v) for k, v in raw["lifetime_entry_s"].items()}
            basis = cls(float(raw["cores"]), float(raw["cpu_limit"]), float(raw["capacity_transfers_per_s"]),
                        float(raw["check_transfers_per_s"]), lifetimes, float(raw["peak_node_count_t10"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ScenarioError(f"{where}: calibration.basis is incomplete or not numbers ({exc})") from None
        missing = {30, 10, CHECK_TIMEOUT} - set(lifetimes)
        if missing:
            raise ScenarioError(f"{where}: calibration.basis.lifetime_entry_s lacks the timeouts {sorted(missing)}")
        return basis


@dataclass
class Check:
    """One machine check: what was measured, how it compares, and the profile it led to.

    Attributes:
        cores: CPUs this machine gives the lab.
        cpu_limit: the CPU per pod the check ran with (and the profile uses).
        measured: the check's load.
        basis: the committed profile's basis.
        reasons: why this machine differs (empty: it does not; the committed profile is used).
        profile: the derived profile document, None when the committed one is used.
        concurrency: the transfers in flight of the load it kept (fewer than the
            profile's on a machine the first load overwhelmed).
    """

    cores: float
    cpu_limit: float
    measured: Measurement
    basis: Basis
    reasons: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    concurrency: int | None = None

    def record(self) -> dict[str, Any]:
        """The check as the run's manifest keeps it."""
        return {"cores": self.cores, "cpu_limit": self.cpu_limit, "concurrency": self.concurrency,
                "measured": dataclasses.asdict(self.measured),
                "basis": dataclasses.asdict(self.basis), "tolerance": TOLERANCE,
                "differs": bool(self.reasons), "reasons": self.reasons,
                "derivation": (self.profile or {}).get("calibration", {}).get("derivation")}


def pod_cpu(cores: float, basis: Basis) -> float:
    """A pod's CPU limit on a machine that gives the lab ``cores``: the basis's share, at most its value."""
    return round(min(basis.cpu_limit, basis.cpu_limit * cores / basis.cores), 3)


def concurrency_for(concurrency: int, cpu_limit: float, basis: Basis) -> int:
    """Transfers in flight for a pod of ``cpu_limit``: the basis's, in proportion to the pod's CPU.

    A pod with half the CPU gets half the transfers in flight, so a transfer takes as
    long as on the basis machine (Little's law) instead of queueing into the client's
    retries; at least 8.
    """
    return max(8, int(round(concurrency * cpu_limit / basis.cpu_limit)))


def lifetimes_for(basis: Basis, lifetime_check: float) -> dict[int, float]:
    """Each timeout's lifetime on this machine: the basis's, shifted by the measured lag change."""
    shift = lifetime_check - basis.lifetimes[CHECK_TIMEOUT]
    return {t: round(max(float(t), v + shift), 2) for t, v in basis.lifetimes.items()}


def compare(basis: Basis, cores: float, cpu_limit: float, measured: Measurement,
            tolerance: float = TOLERANCE) -> list[str]:
    """Why this machine needs its own profile (empty: the committed one fits) (pure)."""
    reasons = []
    if cpu_limit != basis.cpu_limit:
        reasons.append(f"this machine gives the lab {cores:g} CPU(s) where the profile was derived with "
                       f"{basis.cores:g}: a pod gets {cpu_limit:g} CPU instead of {basis.cpu_limit:g}, so that two "
                       "pods, the client and the kernel still fit")
    ratio = measured.transfers_per_s / basis.check_capacity
    if abs(ratio - 1) > tolerance:
        reasons.append(f"one pod served {measured.transfers_per_s:.0f} transfers/s where the profile's machine "
                       f"served {basis.check_capacity:.0f} ({ratio:.2f}x, more than {tolerance:.0%} apart)")
    base_l = basis.lifetimes[CHECK_TIMEOUT]
    if measured.lifetime is None or abs(measured.lifetime / base_l - 1) > tolerance:
        reasons.append(f"a transfer held {measured.lifetime} entry-s at a {CHECK_TIMEOUT} s timeout where the "
                       f"profile's machine measured {base_l:g} (more than {tolerance:.0%} apart)")
    return reasons


def adapt(basis: Basis, committed: Any, measured: Measurement, cores: float, cpu_limit: float,
          article: dict[int, int], reasons: list[str], concurrency: int | None = None) -> dict[str, Any]:
    """The lab profile for this machine, derived from the check (pure).

    Args:
        basis: the committed profile's basis.
        committed: the committed :class:`~labkit.scenario.Profile`.
        measured: the check's load.
        cores, cpu_limit: this machine's CPUs for the lab and the CPU per pod.
        article: the article's transfers/s per iteration.
        reasons: why it differs (kept in the description).
        concurrency: the transfers in flight the check had to come down to on a slow
            machine (None: it kept the profile's); the profile's loads use it too.

    Returns:
        A profile document (``name: lab``) whose derivation rows also hold the committed value.
    """
    ratio = measured.transfers_per_s / basis.check_capacity
    capacity = basis.capacity * ratio
    lifetimes = lifetimes_for(basis, measured.lifetime or basis.lifetimes[CHECK_TIMEOUT])
    peak_t10 = basis.peak_t10 * ratio * lifetimes[10] / basis.lifetimes[10]
    run = dict(committed.run)
    run["concurrency"] = concurrency_for(int(run["concurrency"]), cpu_limit, basis)
    per_transfer_s = run["concurrency"] / basis.check_capacity
    slowed = concurrency is not None and concurrency < run["concurrency"]
    if slowed:
        run["concurrency"] = concurrency
    doc = derive_from(capacity, lifetimes, peak_t10, article, cpu_limit=cpu_limit,
                      run=run, background_flows=committed.background_flows)
    for row in doc["calibration"]["derivation"]:
        table = committed.sysctl_values.get(row["sysctl"], {})
        row["committed"] = table.get(row["article"], row["article"])
    if run["concurrency"] != committed.run["concurrency"]:
        doc["calibration"]["derivation"].insert(0, {
            "sysctl": "transfers in flight", "article": "-", "lab": run["concurrency"],
            "committed": committed.run["concurrency"],
            "why": (f"what this machine kept in flight without losing transfers ({measured.transfers_per_s:.1f} "
                    f"transfers/s x the {per_transfer_s:.2f} s a transfer takes on the profile's machine)"
                    if slowed else f"the committed {committed.run['concurrency']} in proportion to the pod's CPU "
                    f"({cpu_limit:g} of {basis.cpu_limit:g}), so a transfer takes as long as there")})
    doc["calibration"]["derivation"].insert(0, {
        "sysctl": "CPU per pod (cores)", "article": "no limit", "lab": cpu_limit, "committed": committed.cpu_limit,
        "why": f"the committed {basis.cpu_limit:g} of {basis.cores:g} CPU(s), as a share of the {cores:g} this "
               "machine gives the lab (never more)"})
    doc["description"] = (
        f"The lab profile derived for this machine before the run: it gives the lab {cores:g} CPU(s), one pod "
        f"with {cpu_limit:g} CPU served {measured.transfers_per_s:.0f} transfers/s at a {CHECK_TIMEOUT} s UDP "
        f"timeout and a transfer held {measured.lifetime} entry-s there, where the committed profile's machine "
        f"measured {basis.check_capacity:.0f}/s and {basis.lifetimes[CHECK_TIMEOUT]:g} entry-s. "
        + " ".join(r[0].upper() + r[1:] + "." for r in reasons)
        + f" So: capacity {capacity:.0f}/s (the committed {basis.capacity:.0f}/s x {ratio:.2f}) and lifetimes "
        + ", ".join(f"{v:g} entry-s at {t} s" for t, v in sorted(lifetimes.items(), reverse=True))
        + "; each table admits the share of capacity the article's table admitted, as `labkit calibrate` derives it.")
    doc["derived_from"] = f"lab ({committed.source})"
    doc["calibration"]["basis"] = {
        "cores": cores, "cpu_limit": cpu_limit, "capacity_transfers_per_s": round(capacity, 1),
        "check_transfers_per_s": round(measured.transfers_per_s, 1), "lifetime_entry_s": lifetimes,
        "peak_node_count_t10": int(peak_t10)}
    doc["calibration"]["check"] = dataclasses.asdict(measured)
    doc["calibration"]["committed_basis"] = dataclasses.asdict(basis)
    return doc


def check(testbed: Any, scenario: Any, committed: Any, *, cores: float | None = None,
          tolerance: float = TOLERANCE, on_step: Callable[[str], None] | None = None,
          flows: Any = None) -> Check:
    """Measure the testbed's machine with one short load and compare it with ``committed``'s basis.

    The machine measured is the one the netns testbed runs on (its
    :meth:`~labkit.testbed.base.Testbed.node_machine`: this one, or one reached over
    SSH).  The background flows should be running (the caller's, ``flows``), as in the
    lab's loads; the check does not wait for them to be warm (see
    :func:`labkit.run.run_iteration`).

    Args:
        testbed: the netns testbed to measure on (brought down afterwards).
        scenario: the :class:`~labkit.scenario.Scenario`.
        committed: the lab :class:`~labkit.scenario.Profile` to check.
        cores: CPUs that machine gives the lab (measured there with
            :func:`labkit.cgroups.available_cpus` when None).
        tolerance: how far capacity and lifetime may be from the basis.
        on_step: receives progress lines.
        flows: the caller's background flows (see :func:`labkit.run.run_iteration`); None:
            the check's load starts its own.

    Returns:
        The :class:`Check`; its ``profile`` is the derived document when the machine differs.

    Raises:
        ScenarioError: the profile has no basis to compare with.
        ReplayError: the check's load lost transfers (something else limited it).
        TestbedError, MonitorError, LoadgenError: a part failed.
    """
    from labkit.cgroups import available_cpus
    from labkit.run import run_iteration

    step = on_step or (lambda line: log.info("%s", line))
    basis = Basis.of(committed)
    where = testbed.node_machine()
    if cores is None:
        cores = available_cpus(where.host if where is not None else None)
    cores = round(cores, 2)
    cpu = pod_cpu(cores, basis)
    base = scenario.iteration(8, committed)
    it = dataclasses.replace(measurement_iteration(base, "check", udp_timeout=CHECK_TIMEOUT, replicas=1,
                                                   duration=CHECK_S), cpu_limit=cpu,
                             concurrency=concurrency_for(base.concurrency, cpu, basis))
    step(f"machine check: {CHECK_S:g} s load, one pod with {cpu:g} CPU ({cores:g} CPU(s) for the lab), "
         f"{CHECK_TIMEOUT} s UDP timeout, tables no load fills")
    per_transfer_s = it.concurrency / basis.check_capacity  # Little's law on the profile's machine
    for attempt in range(1, CHECK_ATTEMPTS + 1):
        with tempfile.TemporaryDirectory(prefix="labkit-check-") as tmp:
            try:
                testbed.down()
                # no wait for the collector's cycle: the tables never fill, and the flows' listing
                # reaps expired entries from their first second
                row = run_iteration(testbed, it, Path(tmp), wait_warm=False, flows=flows)
            finally:
                testbed.down()
        m = measurement(f"check-T{CHECK_TIMEOUT}", row, udp_timeout=CHECK_TIMEOUT)
        if m.failed <= MAX_FAILED_SHARE * max(1, row["transfers_ok"]):
            break
        # Overwhelmed: a machine much slower than the profile's (a VM under emulation) served
        # m.transfers_per_s while the rest queued into the client's 1 s retries.  As many in
        # flight as it serves in the time a transfer takes on the profile's machine.
        served = max(m.transfers_per_s, float(row.get("transfers_per_s_whole_load") or 0.0))
        fewer = max(MIN_IN_FLIGHT, int(served * per_transfer_s))
        if attempt == CHECK_ATTEMPTS or served <= 0 or fewer > 0.8 * it.concurrency:
            raise ReplayError(f"machine check: {m.failed} of {row['transfers_ok'] + m.failed} transfers failed "
                              f"with {it.concurrency} in flight, so something other than the pod's CPU limited "
                              "the load (a busy machine?); run again when it is quiet, or keep the committed "
                              "profile with --no-recalibrate")
        step(f"machine check: {m.failed} of {row['transfers_ok'] + m.failed} transfers failed with "
             f"{it.concurrency} in flight; this machine served {served:.1f}/s, so again with {fewer}")
        it = dataclasses.replace(it, concurrency=fewer)
    reasons = compare(basis, cores, cpu, m, tolerance)
    result = Check(cores, cpu, m, basis, reasons, concurrency=it.concurrency)
    step(f"machine check: {m.transfers_per_s:.0f} transfers/s, {m.lifetime} entry-s per transfer (the profile's "
         f"machine: {basis.check_capacity:.0f}/s, {basis.lifetimes[CHECK_TIMEOUT]:g} entry-s)")
    if reasons:
        article = {n: scenario.iteration(n, "article").article_tps for n in scenario.numbers}
        result.profile = adapt(basis, committed, m, cores, cpu, article, reasons,
                               concurrency=it.concurrency if attempt > 1 else None)
    return result
