"""Conntrack sizing: predict each namespace's table from a rate, recommend sizes (pure).

The model (``docs/capacity.md`` has the derivation and its sources):

* **Entries.** One TFTP transfer through the NodePort makes ``node_entries``
  conntrack entries in the node's namespace (2: the request, left UNREPLIED,
  and the data flow the helper's expectation admits) and ``pod_entries`` in a
  pod that tracks (2 again).  On current kernels (6.x) a UDP flow gets the
  stream timeout only after it has lived 2 s, so every entry of a 5 KB
  transfer lives the plain ``udp_timeout``; on the article's 3.10 kernel the
  data flow got ``udp_timeout_stream`` at once (``stream_entries`` = 1).
* **Lifetime.** An expired entry stays counted until a garbage-collector pass
  (or a lookup that walks past it) reaps it: ``reap_lag_s``.  One transfer
  holds ``L(T) = entries x (T + lag)`` entry-seconds, unless a calibration
  measured ``L`` at some timeouts (``labkit calibrate``), then the line
  through those points is used.
* **Steady count** (Little's law): ``N = rate x L(T)`` per namespace; a pod
  sees ``rate / replicas``.  Every namespace is held against the one global
  ``nf_conntrack_max``, so a table *fills* when its ``N`` reaches the max.  A
  full table lets through at most ``max / L`` transfers/s (its *ceiling*),
  and the load then serves the lowest ceiling.
* **Expectations**: one per transfer in the node while it waits for the
  server's first reply (``expect_wait_s``), plus one for each abandoned
  transfer until its master entry dies.
* **Memory**: entries x the ``nf_conntrack`` slab's bytes per object (from
  ``/proc/slabinfo``, parsed by :func:`parse_slabinfo`), expectations x the
  expectation cache's, plus the hash tables (buckets x pointer size).

kube-proxy's own figure (:func:`kube_proxy_max`) is shown beside every
recommendation: ``max(maxPerCore x cores, min)``, set in the node's namespace
only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any, Mapping

from labkit.exceptions import SizingError
from labkit.monitor.parse import PAGE_SIZE, SlabCache, parse_slabinfo  # noqa: F401  (re-exported)

POINTER_BYTES = 8  # struct hlist_nulls_head: one pointer per bucket (64-bit)
# Measured on the project's Linux 6.18 machine (tests/data/slabinfo-6.18-idle.txt and
# /sys/kernel/slab/nf_conntrack_expect): 256-byte conntrack objects, 16 to a 4 KiB page;
# expectations share a merged 232-byte cache, 17 to a page.
ENTRY_BYTES = PAGE_SIZE / 16
EXPECT_BYTES = PAGE_SIZE / 17
NODE_ENTRIES = 2.0
POD_ENTRIES = 2.0
REAP_LAG_S = 1.0       # gc passes 1-2 s apart on a busy node (docs/kernel-notes.md)
EXPECT_WAIT_S = 0.01   # RRQ to the server's first DATA packet on an idle server
KUBE_PROXY_MAX_PER_CORE = 32768  # pkg/proxy/apis/config/v1alpha1/defaults.go
KUBE_PROXY_MIN = 131072
DEFAULT_HEADROOM = 0.5
MIN_UDP_TIMEOUT = 5    # a TFTP client waits up to 5 s between retransmissions
ROUND_TO = 1024
FILL_SHARE = 1.0       # a table fills when its steady count reaches the max


def _positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SizingError(f"must be a number, got {value!r}", field=name) from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise SizingError(f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", field=name)
    return number


def _integer(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SizingError(f"must be an integer >= {minimum}, got {value!r}", field=name)
    return value


# --- the kernel's slab caches --------------------------------------------------------

def entry_bytes(caches: Mapping[str, SlabCache] | None) -> float:
    """Bytes one conntrack entry costs: the ``nf_conntrack`` cache's, else 6.18's 256."""
    cache = (caches or {}).get("nf_conntrack")
    return cache.bytes_per_object if cache else ENTRY_BYTES


def kernel_buckets(requested: int) -> int:
    """The bucket count the kernel allocates for ``requested``: a multiple of a page of pointers."""
    per_page = PAGE_SIZE // POINTER_BYTES
    return int(math.ceil(requested / per_page) * per_page)


def kernel_expect_max(buckets: int) -> int:
    """The kernel's default ``nf_conntrack_expect_max`` for a hash of ``buckets``: 4 x buckets/256."""
    return max(1, buckets // 256) * 4


# --- entry lifetime -----------------------------------------------------------------

@dataclass(frozen=True)
class Lifetime:
    """Entry-seconds one transfer holds in a namespace at a UDP timeout.

    Attributes:
        entries: conntrack entries per transfer in the node.
        reap_lag_s: seconds an expired entry stays counted until it is reaped.
        stream_entries: of those, entries that live the stream timeout (0 on 6.x
            for a 5 KB transfer; 1 on the article's 3.10 kernel).
        measured: ``((timeout_s, entry_s), ...)`` measured in the node; with two
            or more the least-squares line through them replaces the formula.
    """

    entries: float = NODE_ENTRIES
    reap_lag_s: float = REAP_LAG_S
    stream_entries: float = 0.0
    measured: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        _positive(self.entries, "entries")
        _positive(self.reap_lag_s, "reap_lag_s", allow_zero=True)
        _positive(self.stream_entries, "stream_entries", allow_zero=True)
        if self.stream_entries > self.entries:
            raise SizingError(f"must be <= entries ({self.entries:g}), got {self.stream_entries!r}",
                              field="stream_entries")
        for t, life in self.measured:
            _positive(t, "measured timeout")
            _positive(life, "measured entry-seconds")

    def entry_seconds(self, timeout: float, stream_timeout: float | None = None) -> float:
        """Entry-seconds per transfer in the node at ``timeout`` (and ``stream_timeout``)."""
        timeout = _positive(timeout, "udp_timeout")
        points = sorted(set(self.measured))
        if len(points) >= 2:
            n = len(points)
            mx = sum(t for t, _ in points) / n
            my = sum(v for _, v in points) / n
            sxx = sum((t - mx) ** 2 for t, _ in points)
            slope = sum((t - mx) * (v - my) for t, v in points) / sxx
            return max(0.0, my + slope * (timeout - mx))
        stream = timeout if stream_timeout is None else max(timeout, stream_timeout)
        plain = self.entries - self.stream_entries
        return plain * (timeout + self.reap_lag_s) + self.stream_entries * (stream + self.reap_lag_s)


def lifetime_from_profile(calibration: Mapping[str, Any] | None, **kwargs: Any) -> Lifetime:
    """A :class:`Lifetime` with the node lifetimes a calibration measured, if any.

    Reads ``calibration.lifetimes`` (``{timeout: entry-s}``), else the basis's
    ``lifetime_entry_s`` (what a profile derived for this machine by
    :mod:`labkit.adapt` holds), else the ``measurements`` ``labkit calibrate``
    writes (one pod, ``nodeport-T*``).
    """
    points: dict[float, float] = {}
    cal = calibration or {}
    for t, life in (cal.get("lifetimes") or {}).items():
        points[float(t)] = float(life)
    for t, life in ((cal.get("basis") or {}).get("lifetime_entry_s") or {}).items():
        points.setdefault(float(t), float(life))
    for m in cal.get("measurements") or []:
        if m.get("lifetime") and m.get("udp_timeout") and int(m.get("replicas", 1)) == 1:
            points.setdefault(float(m["udp_timeout"]), float(m["lifetime"]))
    return Lifetime(measured=tuple(sorted(points.items())), **kwargs)


# --- prediction -----------------------------------------------------------------------

@dataclass(frozen=True)
class Tables:
    """The conntrack settings a prediction is made for.

    Attributes:
        conntrack_max, expect_max: the global maxima.
        node_udp_timeout, node_udp_timeout_stream: the node namespace's timeouts.
        pod_udp_timeout, pod_udp_timeout_stream: each pod's; ``pod_udp_timeout``
            None when the pods do not track connections.
        replicas: pods behind the service (0: the server runs on the node, no NAT).
        buckets: the conntrack hash size (None: the kernel's default, = max).
    """

    conntrack_max: int
    expect_max: int
    node_udp_timeout: float = 30
    pod_udp_timeout: float | None = 30
    replicas: int = 1
    node_udp_timeout_stream: float | None = None
    pod_udp_timeout_stream: float | None = None
    buckets: int | None = None

    def __post_init__(self):
        _integer(self.conntrack_max, "conntrack_max")
        _integer(self.expect_max, "expect_max")
        _positive(self.node_udp_timeout, "node_udp_timeout")
        if self.pod_udp_timeout is not None:
            _positive(self.pod_udp_timeout, "pod_udp_timeout")
        _integer(self.replicas, "replicas", 0)
        if self.buckets is not None:
            _integer(self.buckets, "buckets")


@dataclass(frozen=True)
class Prediction:
    """What the model expects of a load at ``rate`` transfers/s on ``tables``.

    Counts are per namespace (``pod_count`` is one pod's); ``*_fills`` says
    whether that table reaches the max; ``served_per_s`` is the rate the
    tables let through (the lowest ceiling); memory is in bytes.
    """

    rate: float
    served_per_s: float
    node_entry_s: float
    pod_entry_s: float
    node_count: float
    pod_count: float
    expect_count: float
    node_fills: bool
    pod_fills: bool
    expect_fills: bool
    node_ceiling_per_s: float
    pod_ceiling_per_s: float | None
    entry_bytes: float
    memory_bytes: float
    hash_bytes: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def predict(rate: float, tables: Tables, lifetime: Lifetime | None = None, *,
            pod_entries: float = POD_ENTRIES, expect_wait_s: float = EXPECT_WAIT_S,
            abandoned_per_s: float = 0.0, other_entries: float = 0.0,
            slab: Mapping[str, SlabCache] | None = None,
            duration_s: float | None = None) -> Prediction:
    """Predict each table at ``rate`` new transfers per second (pure).

    Args:
        rate: transfers (or flows) per second offered to the service.
        tables: the settings.
        lifetime: the node's entry lifetime model (default: 2 entries, 1 s lag).
        pod_entries: entries per transfer in a pod that tracks.
        expect_wait_s: seconds an expectation waits for the server's first reply.
        abandoned_per_s: transfers per second the client gives up on; each leaves
            its expectation until its master entry dies.
        other_entries: entries other namespaces hold (counted in memory only).
        slab: parsed ``/proc/slabinfo`` for the entry size (default: 6.18's).
        duration_s: the load's length, when it is shorter than an entry's life
            (the count then peaks at ``rate x entries x duration``).

    Raises:
        SizingError: a value is out of range (the field is named).
    """
    rate = _positive(rate, "rate")
    _positive(pod_entries, "pod_entries", allow_zero=True)
    _positive(expect_wait_s, "expect_wait_s", allow_zero=True)
    _positive(abandoned_per_s, "abandoned_per_s", allow_zero=True)
    life = lifetime or Lifetime()
    mx = tables.conntrack_max
    nodeport = tables.replicas > 0
    node_l = life.entry_seconds(tables.node_udp_timeout, tables.node_udp_timeout_stream) if nodeport else 0.0
    tracks = nodeport and tables.pod_udp_timeout is not None and pod_entries > 0
    pod_l = (life.entry_seconds(tables.pod_udp_timeout, tables.pod_udp_timeout_stream)
             * pod_entries / life.entries) if tracks else 0.0
    if duration_s is not None:
        span = _positive(duration_s, "duration_s")
        node_l = min(node_l, life.entries * span)
        pod_l = min(pod_l, pod_entries * span)
    node_ceiling = mx / node_l if node_l else math.inf
    pod_ceiling = tables.replicas * mx / pod_l if pod_l else math.inf
    served = min(rate, node_ceiling, pod_ceiling)
    node_fills = node_l > 0 and min(rate, pod_ceiling) * node_l >= FILL_SHARE * mx
    pod_fills = pod_l > 0 and min(rate, node_ceiling) / tables.replicas * pod_l >= FILL_SHARE * mx
    node_count = min(served * node_l, mx)
    pod_count = min(served / tables.replicas * pod_l, mx) if pod_l else 0.0
    per_entry = node_l / life.entries if node_l else 0.0
    expect = (served * expect_wait_s + abandoned_per_s * per_entry) if nodeport else 0.0
    size = entry_bytes(slab)
    buckets = kernel_buckets(tables.buckets or mx)
    hash_bytes = buckets * POINTER_BYTES + max(1, buckets // 256) * POINTER_BYTES
    entries = node_count + tables.replicas * pod_count + other_entries
    memory = entries * size + min(expect, tables.expect_max) * EXPECT_BYTES + hash_bytes
    return Prediction(rate, served, node_l, pod_l, node_count, pod_count, expect,
                      bool(node_fills), bool(pod_fills), bool(nodeport and expect >= tables.expect_max),
                      node_ceiling, pod_ceiling if pod_l else None, size, memory, hash_bytes)


# --- recommendation and kube-proxy -------------------------------------------------------

def kube_proxy_max(cores: int, max_per_core: int = KUBE_PROXY_MAX_PER_CORE,
                   minimum: int = KUBE_PROXY_MIN) -> int | None:
    """The ``nf_conntrack_max`` kube-proxy sets on a node of ``cores`` CPUs.

    ``max(maxPerCore x cores, min)`` (``getConntrackMax``); None when
    ``maxPerCore`` is 0, i.e. kube-proxy leaves the max alone.
    """
    _integer(cores, "cores")
    _integer(max_per_core, "max_per_core", 0)
    _integer(minimum, "min", 0)
    if max_per_core == 0:
        return None
    return max(max_per_core * cores, minimum)


def kube_proxy_buckets(conntrack_max: int, current: int) -> int:
    """The hash size after kube-proxy's SetMax: raised to max/4 when smaller, else left."""
    return current if current >= conntrack_max // 4 else conntrack_max // 4


@dataclass(frozen=True)
class Recommendation:
    """Sizes for a target rate with a headroom.

    Attributes:
        conntrack_max, buckets, expect_max: the sysctls/module parameter to set.
        node_udp_timeout, pod_udp_timeout: the UDP timeouts to set (the pods' the
            same as the node's, through the kubelet's allowed unsafe sysctls).
        prediction: the model at the target rate with these sizes.
        why: one line per choice.
    """

    conntrack_max: int
    buckets: int
    expect_max: int
    node_udp_timeout: float
    pod_udp_timeout: float | None
    prediction: Prediction
    why: list[str] = field(default_factory=list)


def _round_up(value: float, step: int = ROUND_TO) -> int:
    return int(math.ceil(max(value, 1) / step) * step)


def recommend(rate: float, tables: Tables, lifetime: Lifetime | None = None, *,
              headroom: float = DEFAULT_HEADROOM, cap: int | None = None,
              min_udp_timeout: float = MIN_UDP_TIMEOUT, **kwargs: Any) -> Recommendation:
    """Recommend a max, a bucket count, expect_max and timeouts for ``rate`` (pure).

    The pods get the node's UDP timeout (the article's iteration 8).  When a
    ``cap`` on ``nf_conntrack_max`` is given (memory, policy) and the tables
    would not fit under it at the given timeouts, the timeouts are shortened to
    the longest that fit, never under ``min_udp_timeout``.

    Args:
        rate: the target transfers/s.
        tables: the current settings (timeouts, replicas; its max is not used).
        headroom: extra room over the predicted steady count (0.5 = 50 %).
        cap: the largest max allowed, or None.
        min_udp_timeout: the shortest UDP timeout allowed.
        kwargs: passed to :func:`predict`.

    Raises:
        SizingError: a bad value, or nothing fits under ``cap`` (said how much is needed).
    """
    rate = _positive(rate, "rate")
    headroom = _positive(headroom, "headroom", allow_zero=True)
    _positive(min_udp_timeout, "min_udp_timeout")
    life = lifetime or Lifetime()
    pod_entries = kwargs.get("pod_entries", POD_ENTRIES)
    why = []
    timeout = tables.node_udp_timeout
    pod_timeout = None if tables.pod_udp_timeout is None else timeout

    def need(t: float) -> float:
        node = rate * life.entry_seconds(t)
        pod = (rate / max(1, tables.replicas) * life.entry_seconds(t) * pod_entries / life.entries
               if pod_timeout is not None else 0.0)
        return max(node, pod) * (1 + headroom)

    if tables.pod_udp_timeout is not None and tables.pod_udp_timeout != timeout:
        why.append(f"pods: UDP timeout {tables.pod_udp_timeout:g} s -> {timeout:g} s, the node's "
                   "(allowedUnsafeSysctls + securityContext.sysctls); each pod is held against the same max")
    if cap is not None and need(timeout) > _integer(cap, "max"):
        t = timeout
        while t > min_udp_timeout and need(t) > cap:
            t = max(min_udp_timeout, t - 1)
        if need(t) > cap:
            raise SizingError(f"{rate:g} transfers/s needs a max of {math.ceil(need(t))} even at the "
                              f"shortest UDP timeout allowed ({min_udp_timeout:g} s); raise it above "
                              f"{cap}", field="max")
        why.append(f"UDP timeout {timeout:g} s -> {t:g} s: the longest at which the tables fit under "
                   f"max {cap}")
        timeout = t
        pod_timeout = None if pod_timeout is None else t
    if timeout < min_udp_timeout:
        why.append(f"UDP timeout {timeout:g} s is under {min_udp_timeout:g} s: a TFTP client may wait that "
                   "long between retransmissions, and a retried packet then finds no NAT entry")
    conntrack_max = _round_up(need(timeout))
    if cap is not None:
        conntrack_max = min(conntrack_max, cap)
    proposed = Tables(conntrack_max, 1, timeout, pod_timeout, tables.replicas)
    pre = predict(rate, proposed, life, **kwargs)
    busiest = max(pre.node_count, pre.pod_count)
    why.append(f"nf_conntrack_max {conntrack_max}: the busiest namespace holds {busiest:.0f} entries "
               f"at {rate:g}/s ({pre.node_entry_s:.1f} entry-s per transfer in the node), plus "
               f"{headroom:.0%}, rounded up to {ROUND_TO}")
    total = pre.node_count + tables.replicas * pre.pod_count
    buckets = kernel_buckets(max(conntrack_max, total * (1 + headroom)))
    why.append(f"buckets {buckets}: one per entry of the max (the kernel's own default ratio: "
               "chains of 2, each entry hashed twice), and the hash is shared by every namespace "
               f"({total:.0f} entries in all)")
    expect_max = max(kernel_expect_max(buckets), _round_up(pre.expect_count * (1 + headroom), 64))
    why.append(f"nf_conntrack_expect_max {expect_max}: {pre.expect_count:.1f} expectations waiting at "
               f"{rate:g}/s plus {headroom:.0%}, and never under the kernel's default for "
               f"{buckets} buckets ({kernel_expect_max(buckets)})")
    final = Tables(conntrack_max, expect_max, timeout, pod_timeout, tables.replicas, buckets=buckets)
    return Recommendation(conntrack_max, buckets, expect_max, timeout, pod_timeout,
                          predict(rate, final, life, **kwargs), why)


def memory_text(nbytes: float) -> str:
    """Bytes as KiB/MiB/GiB for people."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


# --- predicted against measured (the replay's summary rows) ---------------------------------

MEASURED_FULL_SHARE = 0.95  # the kernel's own mark: a gc pass evicts at 95 % of the max
SLAB_SETTLE_S = 2.0  # a torn-down testbed's entries were freed within this of the next load's start
SLAB_BYTES = "slab_conntrack_bytes"  # the monitor's metric (init namespace): nf_conntrack slab in use


@lru_cache(maxsize=8)
def _calibration(profile: str) -> Mapping[str, Any]:
    from labkit.scenario import load_scenario

    prof = load_scenario().profiles.get(str(profile))
    return dict((prof.extra or {}).get("calibration") or {}) if prof else {}


def _number(row: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def predict_row(row: Mapping[str, Any], calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model's columns for one summary.csv row, made from the row's settings and rate.

    The offered rate is the larger of the measured rate and the pods' calibrated
    capacity (``calibration.capacity_transfers_per_s`` x replicas): where a table
    throttled the load, the measured rate is that table's ceiling, not the demand.
    Without a calibrated capacity it is the larger of the second half's and the
    whole load's rate (a short load whose table filled serves nothing in its second
    half).  Where the model finds that no table throttles that rate, the entries are
    counted from the measured rate itself: nothing throttled the load, so the pods
    served what was measured (less than calibrated when the machine's CPU was shared
    with other work).
    Entry lifetimes are the calibration's where it measured them.

    Args:
        row: a summary.csv row (``labkit.run.summarize``).
        calibration: the profile's ``calibration`` block (default: looked up by the
            row's ``profile``).

    The predicted counts are the mean over the load's second half, as the monitor's
    ``mean_*_count`` (the steady count, unless entries outlive half the load:
    :func:`second_half_share`); the memory is the entries' at the load's end (its peak).

    Returns:
        ``model_offered_per_s``, ``predicted_*`` and ``measured_*_fills`` columns;
        the predictions are None where the load served nothing.
    """
    cal = _calibration(str(row.get("profile"))) if calibration is None else calibration
    replicas = int(_number(row, "replicas", 0) or 0)
    node_fill = _measured_fill(row, "peak_node_count", ("node_drops", "node_early_drops"))
    pod_fill = _measured_fill(row, "peak_pod_count", ("pod_drops", "pod_early_drops")) if replicas else False
    out: dict[str, Any] = {"measured_node_fills": node_fill, "measured_pod_fills": pod_fill}
    measured = _number(row, "transfers_per_s", 0.0) or 0.0
    capacity = _number(cal, "capacity_transfers_per_s")
    if capacity is None:
        # no calibrated capacity (the quick profile): the whole load's rate, which includes the
        # seconds before a table filled, is the better floor of the demand than the second half's
        measured = max(measured, _number(row, "transfers_per_s_whole_load", 0.0) or 0.0)
    offered = max(measured, (capacity or 0.0) * replicas)
    keys = ("model_offered_per_s", "predicted_transfers_per_s", "predicted_node_fills", "predicted_pod_fills",
            "predicted_expect_fills", "predicted_node_count", "predicted_pod_count", "predicted_expect_count",
            "predicted_entry_bytes", "predicted_memory_bytes")
    if str(row.get("node_notrack", False)).lower() in ("true", "1"):
        # untracked NodePort traffic is never NAT'ed: nothing reaches the pods, nothing is tracked
        return {**out, **dict(zip(keys, (round(offered, 2), 0.0, False, False, False, 0.0, 0.0, 0.0, 0, 0)))}
    if offered <= 0 or not _number(row, "conntrack_max"):
        return {**out, **{k: None for k in keys}}
    tracks = str(row.get("pods_track_conntrack", True)).lower() not in ("false", "0")
    tables = Tables(
        int(_number(row, "conntrack_max")), max(1, int(_number(row, "expect_max", 1) or 1)),
        _number(row, "node_udp_timeout", 30.0) or 30.0,
        (_number(row, "pod_udp_timeout", 30.0) or 30.0) if tracks and replicas else None, replicas,
        _number(row, "node_udp_timeout_stream"), _number(row, "pod_udp_timeout_stream"))
    duration = _number(row, "duration_s") or None
    life = lifetime_from_profile(cal)

    def model(rate: float) -> Prediction:
        return predict(rate, tables, life,
                       expect_wait_s=(_number(row, "latency_p50_ms", 10.0) or 10.0) / 1000.0,
                       abandoned_per_s=(_number(row, "transfers_failed", 0.0) or 0.0) / (duration or 1.0),
                       duration_s=duration)

    p = model(offered)
    if not (p.node_fills or p.pod_fills) and 0 < measured < offered:
        # no table throttled the load, so the pods served what was measured (fewer than calibrated
        # when the machine's CPU was shared): the entries come from that rate, not the calibration's
        p = replace(model(measured), served_per_s=p.served_per_s)
    # the counts as the monitor's mean over the load's second half; the memory at its end (the peak)
    node_mean = _second_half(p.node_count, p.node_entry_s / life.entries, duration, p.node_fills)
    pod_mean = _second_half(p.pod_count, p.pod_entry_s / POD_ENTRIES, duration, p.pod_fills)
    entries = p.node_count + replicas * p.pod_count
    values = (round(offered, 2), round(p.served_per_s, 2), p.node_fills, p.pod_fills, p.expect_fills,
              round(node_mean, 1), round(pod_mean, 1), round(p.expect_count, 1),
              int(entries * p.entry_bytes), int(p.memory_bytes))
    return {**out, **dict(zip(keys, values))}


def second_half_share(entry_life_s: float, duration_s: float) -> float:
    """The mean count over a load's second half, as a share of the count at its end (pure).

    Entries of life ``L`` (at most the load's length ``D``: the count at the end is
    ``rate x L``) grow as ``rate x min(t, L)``: steady from ``t = L``, so 1 when
    ``L <= D/2``; else the mean of ``min(t, L)`` over ``[D/2, D]`` divided by ``L``
    (3/4 when ``L = D``: the count still grows through the whole load).
    """
    life, span = min(entry_life_s, duration_s), duration_s
    if life <= span / 2 or life <= 0:
        return 1.0
    mean = ((life * life - span * span / 4) / 2 + (span - life) * life) / (span / 2)
    return mean / life


def _second_half(count: float, entry_life_s: float, duration_s: float | None, fills: bool) -> float:
    if fills or not duration_s or entry_life_s <= 0:
        return count
    return count * second_half_share(entry_life_s, duration_s)


def _measured_fill(row: Mapping[str, Any], peak: str, counters: tuple[str, ...]) -> bool:
    mx = _number(row, "conntrack_max", 0.0) or 0.0
    pressure = sum(_number(row, c, 0.0) or 0.0 for c in counters)
    return bool(mx and ((_number(row, peak, 0.0) or 0.0) >= MEASURED_FULL_SHARE * mx or pressure > 0))


def slab_columns(samples: Any, load_start: float, load_stop: float) -> dict[str, Any]:
    """Measured slab memory of conntrack entries: at the load's start and its peak during the load.

    Args:
        samples: the monitor's samples with a ``t`` column (Unix seconds).
        load_start, load_stop: the load's window.

    The slab is the machine's: the start is its last sample before the load, unless it
    fell in the load's first :data:`SLAB_SETTLE_S` seconds, when a previous testbed's
    entries were still being freed as the load began (measured: 3,464 objects 0.4 s
    before a quick iteration 7, 720 a second later); the lowest of those is the start
    then.  Otherwise the lab's own entries only add to it from the load's start.  The
    peak is that of the samples' running median of three: the background flows' namespaces
    move the machine's slab by a few hundred objects from one second to the next.

    Returns:
        ``slab_bytes_start``, ``slab_bytes_peak`` and ``slab_lab_bytes_peak`` (the
        peak less the start: what the lab's own entries took); None where the
        monitor did not sample the slab.
    """
    part = samples[samples["metric"] == SLAB_BYTES] if len(samples) else samples
    if part is None or part.empty:
        return {"slab_bytes_start": None, "slab_bytes_peak": None, "slab_lab_bytes_peak": None}
    part = part.sort_values("t")
    before = part[part["t"] <= load_start]
    start = float((before if not before.empty else part.iloc[:1])["value"].iloc[-1])
    settling = part[(part["t"] > load_start) & (part["t"] <= load_start + SLAB_SETTLE_S)]
    if not settling.empty:
        start = min(start, float(settling["value"].min()))
    window = part[(part["t"] >= load_start) & (part["t"] <= load_stop)]
    values = (window if not window.empty else part)["value"]
    if len(values) >= 3:  # one sample a second: a median of three keeps a plateau, not one flows' spike
        values = values.rolling(3, center=True).median().dropna()
    peak = float(values.max())
    return {"slab_bytes_start": int(start), "slab_bytes_peak": int(peak),
            "slab_lab_bytes_peak": int(max(0.0, peak - start))}


def compare(summary: Any, *, recompute: bool = False, calibration: Mapping[str, Any] | None = None) -> Any:
    """Per iteration: the model's prediction beside the measurement, and whether it is close.

    Works on a summary.csv frame with or without the predicted columns (an older
    run's are computed from its rows; ``recompute`` computes them again with this
    model and ``calibration``, the profile block the run used).  ``steady_error`` is predicted/measured - 1
    of the node's (and the busiest pod's) mean count over the load's second
    half, where that table did not fill; ``memory_error`` likewise for the slab.

    Returns:
        A DataFrame indexed by iteration.
    """
    import pandas as pd

    rows = []
    for _, r in summary.sort_values("iteration").iterrows():
        row = r.to_dict()
        if recompute or "predicted_node_fills" not in row or pd.isna(row.get("predicted_node_fills")):
            row.update(predict_row(row, calibration))
        out = {"iteration": int(row["iteration"]), "transfers_per_s": row.get("transfers_per_s"),
               "predicted_transfers_per_s": row.get("predicted_transfers_per_s")}
        notrack = _truthy(row.get("node_notrack")) and _number(row, "node_nodeport_entries") is not None
        for ns in ("node", "pod"):
            pred, meas = _value(row.get(f"predicted_{ns}_fills")), _value(row.get(f"measured_{ns}_fills"))
            out[f"{ns}_fills predicted/measured"] = f"{_yn(pred)}/{_yn(meas)}"
            out[f"{ns}_fills_right"] = None if pred is None or meas is None else _truthy(pred) == _truthy(meas)
            count, mean = _number(row, f"predicted_{ns}_count"), _number(row, f"mean_{ns}_count")
            if ns == "node" and notrack:
                # NOTRACK: the model speaks of the NodePort's entries; the node's own traffic (an IGMP
                # report of the pods' bridge) may hold one more
                mean = _number(row, "node_nodeport_entries")
            out[f"{ns}_steady predicted"] = count
            out[f"{ns}_steady measured"] = mean
            out[f"{ns}_steady_error"] = _steady_error(count, mean) if not _truthy(meas) else None
        lab = _number(row, "slab_lab_bytes_peak")
        pred_mem = _number(row, "predicted_entry_bytes")
        out["predicted_entry_bytes"] = pred_mem
        out["slab_lab_bytes_peak"] = lab
        # nothing predicted (the plain server, NOTRACK): the slab then moves only with the machine's
        # other entries (the background flows'), which no ratio to zero describes
        out["memory_error"] = round(pred_mem / lab - 1.0, 3) if lab and pred_mem else None
        rows.append(out)
    return pd.DataFrame(rows).set_index("iteration")


def _value(value: Any) -> Any:
    """None for a missing cell (None or NaN, as read back from summary.csv)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _truthy(value: Any) -> bool:
    value = _value(value)
    return value is not None and bool(value) and str(value).lower() not in ("false", "0", "0.0")


def _steady_error(predicted: float | None, measured: float | None) -> float | None:
    """predicted/measured - 1; 0 where both are 0 (nothing tracked, as predicted); None without both."""
    if predicted is None or measured is None:
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else math.inf
    return round(predicted / measured - 1.0, 3)


def _yn(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "fills" if bool(value) and str(value).lower() != "false" else "no"


MODEL_TOLERANCE = 0.25  # issue 16's bar: steady counts and memory within 25 % of the measurement


def verdict(check: Any, tolerance: float = MODEL_TOLERANCE) -> list[tuple[str, bool, str]]:
    """Whether the model held over one run (:func:`compare`'s frame): three claims (pure).

    1. the fills / does-not-fill call is right for every namespace of every iteration;
    2. the steady count is within ``tolerance`` of the measured mean wherever the table
       did not fill (node, and the busiest pod);
    3. the entries' memory is within ``tolerance`` of the slab usage measured at the peak.

    An iteration without a prediction (it served nothing) or without a measurement
    (no slab samples) is named as unchecked, not counted as right.

    Returns:
        ``(claim, holds, evidence)`` for each of the three.
    """
    import pandas as pd

    def listed(items: list[str]) -> str:
        return ", ".join(items) if items else "none"

    wrong, unchecked, far, mem_far, mem_none = [], [], [], [], []
    for number, r in check.iterrows():
        for ns in ("node", "pod"):
            right = r.get(f"{ns}_fills_right")
            if right is None or pd.isna(right):
                unchecked.append(f"{number} {ns}")
            elif not bool(right):
                wrong.append(f"{number} {ns} ({r[f'{ns}_fills predicted/measured']})")
            err = r.get(f"{ns}_steady_error")
            if err is not None and not pd.isna(err) and abs(float(err)) > tolerance:
                far.append(f"{number} {ns} {float(err):+.0%}")
        err = r.get("memory_error")
        if err is None or pd.isna(err):
            mem_none.append(str(number))
        elif abs(float(err)) > tolerance:
            mem_far.append(f"{number} {float(err):+.0%}")
    errors = [abs(float(e)) for ns in ("node", "pod") for e in check.get(f"{ns}_steady_error", [])
              if e is not None and not pd.isna(e)]
    mems = [abs(float(e)) for e in check.get("memory_error", []) if e is not None and not pd.isna(e)]
    return [
        ("fills / does-not-fill right for every namespace", not wrong,
         f"wrong: {listed(wrong)}; unchecked: {listed(unchecked)}"),
        (f"steady count within {tolerance:.0%} where the table did not fill", not far and bool(errors),
         f"{len(errors)} checked, largest {max(errors, default=0):.0%}; beyond: {listed(far)}"),
        (f"memory within {tolerance:.0%} of the slab at the peak", not mem_far and bool(mems),
         f"{len(mems)} checked, largest {max(mems, default=0):.0%}; beyond: {listed(mem_far)}; "
         f"not compared (no slab samples, or no entry predicted): {listed(mem_none)}"),
    ]
