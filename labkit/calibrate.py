"""``labkit calibrate``: derive the ``lab`` profile from this machine and this kernel.

The article's numbers come from a machine that served 5,100 transfers/s with
one pod and a kernel (3.10) whose conntrack entries lived differently.  A lab on
a small machine keeps the story only if each table is as tight, relative to
what the machine can serve, as the article's was.  So calibration measures two
things on the netns testbed, with the lab's per-pod CPU budget:

* **capacity** ``C``: transfers/s one pod serves through the NodePort when no
  table is in the way (and the plain server of iteration 1, for reference);
* **entry lifetime per transfer** ``L(T)``: the conntrack entries x seconds
  one transfer holds in a namespace at UDP timeout ``T``, i.e. the node's mean
  count over the second half of a load divided by the rate (Little's law).  It
  covers the two entries per transfer and the time the kernel's garbage
  collector takes to reap expired ones, which is why it is more than ``2 T``.

Then for each article value of ``nf_conntrack_max``, taken where the article
found it to be the limit (131072 in iteration 2, 524288 in iteration 5,
1048576 in iteration 6), the lab value is::

    lab_max = article_tps(iteration) / article_capacity * C * L(30 s)

with ``article_capacity`` = the article's one-pod rate without table pressure
(iteration 8, 5,100/s): the lab table admits the same share of the machine's
capacity as the article's table admitted of the article's.  ``expect_max``
keeps the article's ratio to the default max (1024 : 131072), at least 8, but the
default's stays below the transfers in flight (they hold at most one expectation each, so
on a slow machine keeping 2 in flight a table of 8 could never fill) and the raised one
(8192) at least that.  The 30 s UDP
timeout stays (it is the pods' kernel default, and iteration 7 hinges on the
node's timeout differing from the pod's); the article's 10 s stays 10 s only if
it shortens the measured entry lifetime by at least 40 % and one pod's node
count at 10 s fills no more of iteration 8's table than the article's did
(200K of 512K); otherwise the shortest measured timeout (3 s) takes its place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from labkit.charts import seconds
from labkit.util import atomic_write

log = logging.getLogger(__name__)

MAX = "net.netfilter.nf_conntrack_max"
EXPECT_MAX = "net.netfilter.nf_conntrack_expect_max"
UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"
UDP_STREAM = "net.netfilter.nf_conntrack_udp_timeout_stream"
ARTICLE_CAPACITY_ITERATION = 8
# article nf_conntrack_max value -> the iteration where the article found it to be the limit
BINDING_ITERATION = {131072: 2, 524288: 5, 1048576: 6}
DEFAULT_MAX, DEFAULT_EXPECT_MAX = 131072, 1024
ROOMY_MAX, ROOMY_EXPECT = 400_000, 20_000  # measurement tables no lab load can fill
TIMEOUTS = (30, 10, 3)
# The article's 10 s cut a transfer's entry lifetime 7x on its kernel; keep 10 s here only if
# it shortens the measured lifetime by at least this share, else use the shortest measured.
SHORTEN_BY = 0.4
# ... and only if one pod's node count at 10 s stays within the share of iteration 8's table the
# article's count reached (it peaked at 200K of 512K); else two pods would fill the table.
ARTICLE_IT8_SHARE = 200_000 / 524_288
NODE_TIMEOUT_MAX = 524288  # the article's max in iterations 7-9, where the node's timeout is short
MAX_FAILED_SHARE = 0.05  # a busy machine loses a few transfers to 1 s client timeouts
LAB_RUN = {"duration_s": 50, "cooldown_s": 5, "concurrency": 64, "file_size": 5120}


@dataclass(frozen=True)
class Measurement:
    """One calibration load.

    Attributes:
        name: what it measured (``plain``, ``nodeport-T30``, ...).
        udp_timeout: the UDP timeout in force on node and pod (None for plain).
        replicas: pods.
        transfers_per_s: verified transfers per second.
        peak_node_count: the node's highest conntrack count.
        lifetime: entries x seconds per transfer in the node: its mean count over the
            second half of the load divided by the rate (Little's law), None for plain.
        failed: failed transfers (a calibration load must have none).
    """

    name: str
    udp_timeout: int | None
    replicas: int
    transfers_per_s: float
    peak_node_count: int
    lifetime: float | None
    failed: int


def measurement(name: str, row: dict[str, Any], samples: pd.DataFrame | None = None,
                udp_timeout: int | None = None) -> Measurement:
    """Build a :class:`Measurement` from a run's summary row (pure)."""
    rate = float(row["transfers_per_s"])
    peak = int(row["peak_node_count"])
    mean = float(row.get("mean_node_count") or peak)
    lifetime = mean / rate if udp_timeout and rate > 0 else None
    return Measurement(name, udp_timeout, int(row["replicas"]), rate, peak,
                       round(lifetime, 2) if lifetime else None, int(row["transfers_failed"]))


def derive(measurements: list[Measurement], article: dict[int, int], *, cpu_limit: float,
           run: dict[str, Any] | None = None, background_flows: int = 0,
           cores: float | None = None) -> dict[str, Any]:
    """Derive the ``lab`` profile from measurements (pure).

    Args:
        measurements: at least ``nodeport-T30`` and ``nodeport-T10`` (one pod).
        article: the article's transfers/s per iteration number.
        cpu_limit: CPU cores per pod used in the measurements.
        run: the profile's run settings (duration, cool-down, concurrency, file size).
        background_flows: the background flows per second the measurements ran beside.
        cores: CPUs the measured machine gave the lab (default: this machine's, see
            :func:`labkit.cgroups.available_cpus`).

    Returns:
        A profile document (the shape ``labkit/data/iterations.yaml`` uses), with a
        ``calibration`` section holding the measurements and each derivation.
    """
    by_name = {m.name: m for m in measurements}
    t30, t10 = by_name["nodeport-T30"], by_name["nodeport-T10"]
    lifetimes = {m.udp_timeout: m.lifetime for m in measurements
                 if m.name.startswith("nodeport-T") and m.replicas == 1 and m.lifetime}
    profile = derive_from(t10.transfers_per_s, lifetimes, t10.peak_node_count, article,
                          cpu_limit=cpu_limit, run=run, background_flows=background_flows)
    profile["calibration"]["measurements"] = [dataclasses.asdict(m) for m in measurements]
    profile["calibration"]["basis"] = basis_of(measurements, cpu_limit, cores)
    return profile


def basis_of(measurements: list[Measurement], cpu_limit: float, cores: float | None = None) -> dict[str, Any]:
    """What a profile was derived from, in the form a later machine check compares with (pure)."""
    from labkit.cgroups import available_cpus

    by_name = {m.name: m for m in measurements}
    return {
        "cores": round(cores if cores is not None else available_cpus(), 2),
        "cpu_limit": cpu_limit,
        "capacity_transfers_per_s": round(by_name["nodeport-T10"].transfers_per_s, 1),
        "check_transfers_per_s": round(by_name["nodeport-T3"].transfers_per_s, 1) if "nodeport-T3" in by_name else None,
        "lifetime_entry_s": {m.udp_timeout: m.lifetime for m in measurements
                             if m.name.startswith("nodeport-T") and m.replicas == 1 and m.lifetime},
        "peak_node_count_t10": by_name["nodeport-T10"].peak_node_count,
    }


def derive_from(capacity: float, lifetimes: dict[int, float], peak_t10: float, article: dict[int, int], *,
                cpu_limit: float, run: dict[str, Any] | None = None,
                background_flows: int = 0) -> dict[str, Any]:
    """Derive the ``lab`` profile from one pod's capacity and the entry lifetimes (pure).

    Args:
        capacity: transfers/s one pod serves through the NodePort with no table in the way.
        lifetimes: entry-seconds per transfer in the node at UDP timeouts 30, 10 (and 3) s.
        peak_t10: the node's peak count under one pod's load at a 10 s timeout.
        article: the article's transfers/s per iteration number.
        cpu_limit, run, background_flows: as :func:`derive`.

    Returns:
        The profile document, its ``calibration.derivation`` listing each value and why.
    """
    l30, l10, l3 = lifetimes[30], lifetimes[10], lifetimes.get(3)
    art_capacity = article[ARTICLE_CAPACITY_ITERATION]
    maxes, derivation = {}, []
    for value, number in BINDING_ITERATION.items():
        share = article[number] / art_capacity
        lab = int(math.ceil(share * capacity * l30 / 64.0) * 64)
        maxes[value] = lab
        derivation.append({
            "sysctl": MAX, "article": value, "lab": lab,
            "why": f"iteration {number}: article {article[number]}/s of {art_capacity}/s = "
                   f"{share:.3f} x lab capacity {capacity:.0f}/s x lifetime {l30:.1f} entry-s"})
    short, why = 10, []
    shortened = l10 <= (1 - SHORTEN_BY) * l30
    share = peak_t10 / maxes[NODE_TIMEOUT_MAX]
    if not shortened:
        why.append("expired entries wait to be reaped, so 10 s does not shorten their life as it did on "
                   "the article's kernel")
    if share > ARTICLE_IT8_SHARE:
        why.append(f"at 10 s one pod's load filled {share:.0%} of iteration 8's table, more than the "
                   f"article's {ARTICLE_IT8_SHARE:.0%} (200K of 512K), and two pods (iteration 9) would "
                   "fill it")
    if why and l3 is not None:
        short = 3
    else:
        why = []
    derivation.append({
        "sysctl": UDP_TIMEOUT, "article": 10, "lab": short,
        "why": f"measured: a transfer held {l10:.0f} entry-s at a 10 s timeout, {l30:.0f} "
               f"at 30 s" + (f", {l3:.0f} at 3 s" if l3 is not None else "")
               + ("; " + "; ".join(why) if why else "")})
    scale = maxes[DEFAULT_MAX] / DEFAULT_MAX
    expects = {}
    # N transfers in flight hold at most N expectations (one per request until the server
    # answers): the default's table must stay below that, for a server that falls behind
    # to fill it as the article's did (I4), and the raised one at least that, so it cannot
    in_flight = int((run or LAB_RUN)["concurrency"])
    cap = max(1, in_flight - 1)
    for value in (1024, 8192):
        expects[value] = max(8, int(round(value * scale)))
        why = f"the article's ratio to the default max: {value} x {maxes[DEFAULT_MAX]}/{DEFAULT_MAX}"
        if value == DEFAULT_EXPECT_MAX and expects[value] > cap:
            expects[value] = cap
            why += f", below the {in_flight} transfers in flight (they hold at most {in_flight})"
        elif value != DEFAULT_EXPECT_MAX and expects[value] < in_flight:
            expects[value] = in_flight
            why += f", at least the {in_flight} transfers in flight"
        derivation.append({"sysctl": EXPECT_MAX, "article": value, "lab": expects[value], "why": why})
    return {
        "name": "lab",
        "description": (
            f"Calibrated on this machine: one pod with {cpu_limit} CPU serves {capacity:.0f} "
            f"transfers/s; a transfer holds {l30:.0f} entry-seconds at a 30 s UDP timeout "
            f"({l10:.0f} at 10 s). Each table admits the share of capacity the article's "
            "table admitted."),
        "run": dict(run or LAB_RUN),
        "cpu_limit": cpu_limit,
        "pods_track_conntrack": True,
        "background_flows": background_flows,
        "sysctl_values": {MAX: maxes, EXPECT_MAX: expects, UDP_TIMEOUT: {30: 30, 10: short}},
        "calibration": {
            "capacity_transfers_per_s": round(capacity, 1),
            "article_capacity_transfers_per_s": art_capacity,
            "derivation": derivation,
        },
    }


def measurement_iteration(base, name: str, *, udp_timeout: int | None, replicas: int,
                          duration: float) -> Any:
    """``base`` with tables no load fills and ``udp_timeout`` on node and pod: a measurement load."""
    node = dict(base.node_sysctls)
    pod = dict(base.pod_sysctls)
    if udp_timeout is not None:
        node.update({MAX: ROOMY_MAX, EXPECT_MAX: ROOMY_EXPECT, UDP_TIMEOUT: udp_timeout,
                     UDP_STREAM: max(udp_timeout, 20)})
        pod.update({UDP_TIMEOUT: udp_timeout, UDP_STREAM: max(udp_timeout, 20)})
    return dataclasses.replace(base, node_sysctls=node, pod_sysctls=pod, replicas=replicas,
                               duration_s=duration, cooldown_s=1.0, title=f"calibration: {name}")


def calibrate(*, testbed_name: str = "netns", cpu_limit: float = 0.35, quick: bool = False,
              on_step: Callable[[str], None] | None = None, testbed: Any = None) -> dict[str, Any]:
    """Measure capacity and entry lifetimes on the testbed; return the derived profile.

    Each load runs long enough for the garbage collector to reap expired
    entries a few times (the UDP timeout plus 30 s, and the mean is taken over
    its second half).  The background flows run on the testbed's machine, and the
    basis records the CPUs of that machine (this one, or one reached over SSH).

    Args:
        testbed: the testbed to measure on (default ``get_testbed(testbed_name)``).

    Raises:
        TestbedError, MonitorError, LoadgenError: a part failed.
        ReplayError: a calibration load had failed transfers (something else limited it).
    """
    from labkit.exceptions import ReplayError
    from labkit.cgroups import available_cpus
    from labkit.run import background_flows, flows_for, run_iteration
    from labkit.scenario import load_scenario
    from labkit.testbed import get_testbed

    scenario = load_scenario()
    article = {n: scenario.iteration(n, "article").article_tps for n in scenario.numbers}
    step = on_step or (lambda line: log.info("%s", line))
    extra = 0 if quick else 30
    plan = [("plain", scenario.iteration(1, "lab"), None, 1, 15 if quick else 20)]
    for t in TIMEOUTS:
        plan.append((f"nodeport-T{t}", scenario.iteration(8, "lab"), t, 1, t + extra + 5))
    plan.append(("nodeport-T10-2pods", scenario.iteration(9, "lab"), 10, 2, 15 if quick else 20))
    results = []
    testbed = testbed if testbed is not None else get_testbed(testbed_name, global_wait=120)
    where = testbed.node_machine()
    cores = available_cpus(where.host if where is not None else None)
    flows = background_flows(testbed, scenario.iteration(8, "lab"))
    with tempfile.TemporaryDirectory(prefix="labkit-calibrate-") as tmp, \
            flows_for(testbed, scenario.iteration(8, "lab"), on_wait=step) as in_use:
        try:
            for name, base, timeout, replicas, duration in plan:
                it = dataclasses.replace(measurement_iteration(base, name, udp_timeout=timeout,
                                                            replicas=replicas, duration=duration),
                                         cpu_limit=cpu_limit)
                step(f"calibrate: {name}, {duration:g} s")
                # a fresh testbed each time: entries left by the previous load would count
                testbed.down()
                row = run_iteration(testbed, it, Path(tmp) / name, flows=in_use)
                m = measurement(name, row, udp_timeout=timeout)
                if m.failed > MAX_FAILED_SHARE * max(1, row["transfers_ok"]):
                    raise ReplayError(f"calibration load {name} had {m.failed} failed transfers of "
                                      f"{row['transfers_ok'] + m.failed}: something other than the pod's "
                                      "CPU limited it (a busy machine?); run it again when the machine is quiet")
                step(f"calibrate: {name}: {m.transfers_per_s:.0f} transfers/s, node peak "
                     f"{m.peak_node_count}" + (f", {m.lifetime:.1f} entry-s per transfer" if m.lifetime else ""))
                results.append(m)
        finally:
            testbed.down()
    return derive(results, article, cpu_limit=cpu_limit, background_flows=flows, cores=cores)


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    """Write a profile document as YAML (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(profile, sort_keys=False, width=100).encode())
    return path


def comparison(profile: dict[str, Any]) -> pd.DataFrame:
    """Each article value beside the lab value and why (for the CLI and the notebooks)."""
    return pd.DataFrame(profile.get("calibration", {}).get("derivation", []),
                        columns=["sysctl", "article", "lab", "why"])
