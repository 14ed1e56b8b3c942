"""The article's findings, checked from a run's ``summary.csv``.

Each finding is a pure function of the summary table (one row per iteration,
DESIGN.md's columns) that returns a :class:`Finding`: passed, failed, or not
checkable because an iteration it needs was not run.  The thresholds are
DESIGN.md's; the evidence string gives the numbers the verdict rests on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import pandas as pd

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
AFTER_STOP_KEPT = 0.9  # I4: a second after the stop the table still holds this share of its entries
AT_STOP_SHARE = 0.1  # ... and held at least this share of the max at the stop (not idle)


@dataclass(frozen=True)
class Finding:
    """One finding's verdict.

    Attributes:
        id: ``F1``..``F7``, ``I4`` (the iteration-4 observations), ``F8``..``F10`` (past the article).
        claim: what the article found, as checked here.
        result: ``pass``, ``fail`` or ``not run``.
        evidence: the numbers behind the verdict.
    """

    id: str
    claim: str
    result: str
    evidence: str

    @property
    def passed(self) -> bool:
        """True when the finding holds."""
        return self.result == PASS


class _Missing(Exception):
    def __init__(self, number: int):
        self.number = number


def _rows(summary: pd.DataFrame) -> dict[int, pd.Series]:
    if summary.empty:
        return {}
    frame = summary
    if "status" in frame.columns:
        frame = frame[frame["status"].fillna("ok") == "ok"]
    return {int(r["iteration"]): r for _, r in frame.iterrows()}


def _get(rows: dict[int, pd.Series], number: int) -> pd.Series:
    if number not in rows:
        raise _Missing(number)
    return rows[number]


def _num(row: pd.Series, column: str) -> float:
    value = row.get(column, 0)
    return 0.0 if value is None or pd.isna(value) else float(value)


def node_pressure(row: pd.Series) -> float:
    """Drops plus early drops counted in the node's namespace."""
    return _num(row, "node_drops") + _num(row, "node_early_drops")


def pod_pressure(row: pd.Series) -> float:
    """Drops plus early drops counted in the pods' namespaces (summed)."""
    return _num(row, "pod_drops") + _num(row, "pod_early_drops")


def pressure(row: pd.Series) -> float:
    """Drops plus early drops anywhere in the lab."""
    return node_pressure(row) + pod_pressure(row)


def logs(row: pd.Series) -> float:
    """Kernel log lines about full tables (either kind)."""
    return _num(row, "table_full_logs") + _num(row, "expect_full_logs")


def _ratio(a: pd.Series, b: pd.Series) -> float:
    base = _num(b, "transfers_per_s")
    return _num(a, "transfers_per_s") / base if base > 0 else float("inf")


def _tps(row: pd.Series) -> str:
    return f"{_num(row, 'transfers_per_s'):.0f}/s"


def _pressure_text(row: pd.Series) -> str:
    return (f"node drops {_num(row, 'node_drops'):.0f}, early drops {_num(row, 'node_early_drops'):.0f}; "
            f"pod drops {_num(row, 'pod_drops'):.0f}, early drops {_num(row, 'pod_early_drops'):.0f}")


def f1(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 2 serves at most 0.6x iteration 1, with pressure on the node."""
    one, two = _get(rows, 1), _get(rows, 2)
    r = _ratio(two, one)
    return (r <= 0.6 and node_pressure(two) > 0,
            f"it.2 {_tps(two)} = {r:.2f}x it.1 {_tps(one)}; it.2 {_pressure_text(two)}")


def f2(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 3 (three pods) serves at most 1.25x iteration 2."""
    two, three = _get(rows, 2), _get(rows, 3)
    r = _ratio(three, two)
    return (r <= 1.25, f"it.3 {_tps(three)} with {_num(three, 'replicas'):.0f} pods = {r:.2f}x it.2 "
            f"{_tps(two)}; it.3 {_pressure_text(three)}")


def f3(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 5 serves at least 1.5x iteration 2, no expectation-table-full lines, still pressure."""
    two, five = _get(rows, 2), _get(rows, 5)
    r = _ratio(five, two)
    return (r >= 1.5 and _num(five, "expect_full_logs") == 0 and pressure(five) > 0,
            f"it.5 {_tps(five)} = {r:.2f}x it.2 {_tps(two)}; expectation-table-full lines "
            f"{_num(five, 'expect_full_logs'):.0f}; {_pressure_text(five)}")


def f4(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 6 serves at most 1.25x iteration 5 and still has pressure."""
    five, six = _get(rows, 5), _get(rows, 6)
    r = _ratio(six, five)
    return (r <= 1.25 and pressure(six) > 0,
            f"it.6 {_tps(six)} = {r:.2f}x it.5 {_tps(five)}; it.6 {_pressure_text(six)}")


def f5(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 7: the node's peak count stays under 0.9x the max while the pods have pressure."""
    seven = _get(rows, 7)
    peak, cmax = _num(seven, "peak_node_count"), _num(seven, "conntrack_max")
    share = peak / cmax if cmax else float("inf")
    return (share < 0.9 and pod_pressure(seven) > 0,
            f"node peak {peak:.0f} = {share:.2f}x max {cmax:.0f}; pod peak "
            f"{_num(seven, 'peak_pod_count'):.0f}; {_pressure_text(seven)}")


def f6(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 8: no drops, early drops or log lines anywhere, and at least 1.1x iteration 7."""
    seven, eight = _get(rows, 7), _get(rows, 8)
    r = _ratio(eight, seven)
    return (pressure(eight) == 0 and logs(eight) == 0 and r >= 1.1,
            f"it.8 {_tps(eight)} = {r:.2f}x it.7 {_tps(seven)}; {_pressure_text(eight)}; "
            f"log lines {logs(eight):.0f}")


def f7(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 9 (two pods) serves at least 1.1x iteration 8."""
    eight, nine = _get(rows, 8), _get(rows, 9)
    r = _ratio(nine, eight)
    return (r >= 1.1, f"it.9 {_tps(nine)} with {_num(nine, 'replicas'):.0f} pods = {r:.2f}x it.8 {_tps(eight)}")


def i4(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 4: count reaches the max, expectations reach expect_max, both log lines,
    and the count is still high after the load stops: a second after the stop the table
    still holds at least 90 % of the entries it held at the stop, and those were more than a
    tenth of the max.  The entries outlive the load by their UDP timeout; nothing reaps them
    with the load.  On this kernel a garbage-collector pass over a table at least 95 % full
    evicts every unassured entry (all of a TFTP load's) at once, every ten seconds or so
    while the table is full, so the count at the stop may be the max or what refilled since
    the last pass, and a pass may empty the table a few seconds after the stop: hence one
    second, and the share of the count at the stop."""
    four = _get(rows, 4)
    peak, cmax = _num(four, "peak_node_count"), _num(four, "conntrack_max")
    epeak, emax = _num(four, "peak_expect_count"), _num(four, "expect_max")
    after, at_stop = _num(four, "node_count_after_stop"), _num(four, "node_count_at_stop")
    ok = (cmax > 0 and peak >= 0.95 * cmax and emax > 0 and epeak >= 0.95 * emax
          and _num(four, "table_full_logs") > 0 and _num(four, "expect_full_logs") > 0
          and at_stop >= AT_STOP_SHARE * cmax and after >= AFTER_STOP_KEPT * at_stop)
    return ok, (f"node peak {peak:.0f} of max {cmax:.0f}; expectations peak {epeak:.0f} of "
                f"{emax:.0f}; table-full lines {_num(four, 'table_full_logs'):.0f}, "
                f"expectation-table-full lines {_num(four, 'expect_full_logs'):.0f}; count "
                f"{at_stop:.0f} when the load stopped, {after:.0f} "
                f"{_num(four, 'after_stop_s'):.0f} s later")


def f8(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 10: the pods' count stays at zero, no drops anywhere, at least 0.9x iteration 8."""
    eight, ten = _get(rows, 8), _get(rows, 10)
    r = _ratio(ten, eight)
    return (_num(ten, "peak_pod_count") == 0 and pressure(ten) == 0 and r >= 0.9,
            f"it.10 {_tps(ten)} = {r:.2f}x it.8 {_tps(eight)}; pod peak {_num(ten, 'peak_pod_count'):.0f}; "
            f"{_pressure_text(ten)}")


def f9(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 11: transfers fail and the node holds no entry for the NodePort.

    The entries are ``node_nodeport_entries`` (listed when the load stopped); a row
    without that column (an older run) is held to the node's whole peak count, which
    may also hold the node's own traffic (an IGMP report of the pods' bridge).
    """
    eleven = _get(rows, 11)
    ok, failed = _num(eleven, "transfers_ok"), _num(eleven, "transfers_failed")
    listed = eleven.get("node_nodeport_entries")
    listed = None if listed is None or pd.isna(listed) else float(listed)
    entries = _num(eleven, "peak_node_count") if listed is None else listed
    where = ("node peak count" if listed is None else
             f"node entries for the NodePort when the load stopped {listed:.0f} (node peak count, all traffic, "
             f"{_num(eleven, 'peak_node_count'):.0f})")
    return (failed > 0 and ok == 0 and entries == 0,
            f"it.11 {ok:.0f} transfers ok, {failed:.0f} failed ({eleven.get('failed_by_reason', '')}); "
            + (f"{where} {entries:.0f}" if listed is None else where))


STARVED_SHARE = 0.1  # F10: a second half under this share of the whole load's rate says nothing


def f10(rows: dict[int, pd.Series]) -> tuple[bool, str]:
    """Iteration 12 (nftables mode) serves at most 1.25x iteration 2, with drops on the node.

    Where iteration 2 served next to nothing in its load's second half (under a tenth of
    its whole load's rate: a load shorter than the entries' 30 s timeout, whose full table
    frees nothing before it ends, as in the quick profile; what it serves then is a few
    early drops' worth, noise), both are compared over their whole loads instead.
    """
    two, twelve = _get(rows, 2), _get(rows, 12)
    column, span = "transfers_per_s", ""
    whole = _num(two, "transfers_per_s_whole_load")
    if _num(two, column) < STARVED_SHARE * whole:
        column, span = ("transfers_per_s_whole_load", f" over the whole load (it.2 served "
                        f"{_num(two, 'transfers_per_s'):.1f}/s in its second half)")
    a, b = _num(twelve, column), _num(two, column)
    r = a / b if b > 0 else float("inf")
    return (a <= 1.25 * b and node_pressure(twelve) > 0,
            f"it.12 {a:.0f}/s = {r:.2f}x it.2 {b:.0f}/s{span}; it.12 {_pressure_text(twelve)}")


#: Past the article: checked only in a run that went past iteration 9.
PAST_CHECKS: tuple[tuple[str, str, Callable], ...] = (
    ("F8", "iteration 10: the pods' count stays at zero, no drops anywhere, and at least 0.9x iteration 8, "
           "with no unsafe sysctl", f8),
    ("F9", "iteration 11: transfers fail and the node's count stays at zero (NAT needs conntrack)", f9),
    ("F10", "iteration 12 (kube-proxy nftables mode) serves at most 1.25x iteration 2, with drops on the node",
     f10),
)

CHECKS: tuple[tuple[str, str, Callable], ...] = (
    ("F1", "iteration 2 serves at most 0.6x iteration 1, with drops or early drops on the node", f1),
    ("F2", "iteration 3 (three pods) serves at most 1.25x iteration 2", f2),
    ("F3", "iteration 5 serves at least 1.5x iteration 2, no expectation-table-full lines, still pressure", f3),
    ("F4", "iteration 6 serves at most 1.25x iteration 5 and still has pressure", f4),
    ("F5", "iteration 7: node peak count under 0.9x the max while the pods have pressure", f5),
    ("F6", "iteration 8: no drops, early drops or log lines anywhere, and at least 1.1x iteration 7", f6),
    ("F7", "iteration 9 (two pods) serves at least 1.1x iteration 8", f7),
    ("I4", "iteration 4: count reaches the max, expectations reach expect_max, both log lines, "
           "count still high after the load stops (not back to idle)", i4),
)


def check(summary: pd.DataFrame) -> list[Finding]:
    """Check every finding against a summary table.

    Args:
        summary: one row per iteration with DESIGN.md's summary.csv columns (plus
            ``node_count_at_stop``, ``node_count_after_stop``, ``after_stop_s`` for I4).
            Rows whose ``status`` is not ``ok`` are ignored.

    Returns:
        One :class:`Finding` per check, in order F1..F7, I4, then F8..F10 when the
        summary has a row past iteration 9.
    """
    rows = _rows(summary)
    past = not summary.empty and (summary["iteration"] > 9).any()
    out = []
    for fid, claim, fn in CHECKS + (PAST_CHECKS if past else ()):
        try:
            ok, evidence = fn(rows)
        except _Missing as missing:
            out.append(Finding(fid, claim, NOT_RUN, f"iteration {missing.number} was not run"))
            continue
        out.append(Finding(fid, claim, PASS if ok else FAIL, evidence))
    return out


def table(findings: list[Finding]) -> pd.DataFrame:
    """The findings as a DataFrame (id, claim, result, evidence)."""
    return pd.DataFrame([asdict(f) for f in findings], columns=["id", "claim", "result", "evidence"])
