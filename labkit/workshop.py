"""Workshop mode: the testbed's picture, predict-then-check, and errors a participant can read.

* :func:`testbed_picture` draws the running testbed from its ``labkit status
  --json`` document (client, node with its NodePort, pods with their CPU and
  sysctls), so the picture is always the testbed that is there;
* :func:`question` and :func:`check` are the two halves of "predict, then
  check": the question asked before a run, and after it the article's finding
  for that iteration computed from the participant's own numbers
  (:mod:`labkit.findings`), beside the reference run's;
* :func:`readable_errors` makes a :class:`~labkit.exceptions.LabkitError` in a
  notebook cell show as its message (the cell still fails).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from labkit import findings
from labkit.results import REFERENCE_RUN, ROW_FILE, SUMMARY_FILE, read_json
from labkit.story import load_story, markdown

FINDING_OF = {2: "F1", 3: "F2", 4: "I4", 5: "F3", 6: "F4", 7: "F5", 8: "F6", 9: "F7"}
COMPARED_WITH = {2: 1, 3: 2, 5: 2, 6: 5, 8: 7, 9: 8}  # "more, same or less" than this iteration
SAME_BAND = (0.8, 1.25)  # a ratio inside counts as "about the same" (findings' 1.25x)


# --- the testbed's picture ------------------------------------------------------------------

def _pod_lines(pod: dict[str, Any]) -> list[str]:
    cpu = pod.get("cpu_limit")
    lines = [pod.get("ip", ""), f"in.tftpd, CPU {cpu if cpu else 'no limit'}"]
    return lines + [f"{k.split('.')[-1]}={v}" for k, v in (pod.get("sysctls") or {}).items()]


def testbed_picture(status: dict[str, Any]) -> Figure:
    """Draw the testbed a ``labkit status --json`` document describes.

    Args:
        status: the document (``testbed.status()``); ``state: down`` draws a note instead.

    Returns:
        A matplotlib Figure (not registered with pyplot).
    """
    hosts = status.get("hosts") or []
    pods = [h for h in hosts if h.get("role") == "pod"]
    pod_lines = [_pod_lines(pod) for pod in pods]
    pod_h = 0.65 + 0.17 * max([len(lines) for lines in pod_lines] + [2])  # title, then its lines
    height = max(2.7, 0.5 + (pod_h + 0.15) * len(pods))
    fig = Figure(figsize=(10, height), dpi=80)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 10)
    ax.set_ylim(0, height)
    ax.axis("off")
    if status.get("state") in (None, "down") or not hosts:
        ax.text(5, height / 2, "The testbed is down: nothing to draw.\nRun the next cell (or `labkit up`) "
                "to build it.", ha="center", va="center", fontsize=13, color="0.3")
        return fig
    by_role = {h["role"]: h for h in hosts if h.get("role") in ("client", "node")}
    svc = status.get("service") or {}
    mid = height / 2

    def box(x, y, w, h, title, lines, color):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="0.3"))
        ax.text(x + w / 2, y + h - 0.18, title, ha="center", va="top", fontsize=11, weight="bold")
        ax.text(x + w / 2, y + h - 0.5, "\n".join(lines), ha="center", va="top", fontsize=8.5,
                family="monospace")

    client = by_role.get("client", {})
    box(0.2, mid - 0.6, 2.0, 1.2, "client", [client.get("ip", ""), "loadgen (TFTP reads)"], "#e8f0fe")
    node = by_role.get("node", {})
    sysctls = status.get("node_sysctls") or {}
    node_lines = [node.get("ip", ""), f"NodePort {svc.get('node_ip', '')}:{svc.get('node_port', '')}/udp"]
    node_lines += [f"{k.split('.')[-1]}={v}" for k, v in sysctls.items()]
    box(3.2, mid - 0.95, 2.9, 1.9, "node", node_lines, "#fff4e0")
    ax.annotate("", xy=(3.15, mid), xytext=(2.25, mid), arrowprops={"arrowstyle": "->", "lw": 1.5})
    if not pods:
        ax.text(4.65, mid - 1.15, "plain in.tftpd on the node (no NAT)", ha="center", fontsize=8.5)
    top = mid + (pod_h + 0.15) * len(pods) / 2  # the pods' column, centred on the node
    for i, (pod, lines) in enumerate(zip(pods, pod_lines)):
        y = top - (i + 1) * (pod_h + 0.15) + 0.075
        box(7.0, y, 2.8, pod_h, pod.get("name", f"pod-{i + 1}"), lines, "#e6f4ea")
        ax.annotate("", xy=(6.95, y + pod_h / 2), xytext=(6.15, mid), arrowprops={"arrowstyle": "->", "lw": 1.2})
    fig.text(0.01, 0.01, f"{status.get('testbed')} testbed {status.get('run_id', '')}: {status.get('state')}, "
             f"iteration {status.get('iteration')} ({status.get('profile')} profile)", fontsize=8, color="0.35")
    return fig


def status() -> dict[str, Any]:
    """Run ``labkit status --json`` (this environment's labkit) and return its document.

    Raises:
        CommandFailed: the command failed.
    """
    import sys

    from labkit.host import LocalHost

    result = LocalHost().run([sys.executable, "-m", "labkit", "status", "--json"], timeout=60)
    return json.loads(result.stdout)


def guide():
    """How to use the notebooks (Markdown, from ``story.yaml``)."""
    return markdown(str(load_story()["workshop"]["start"]).strip())


def sandbox_intro():
    """The sandbox's introduction (Markdown, from ``story.yaml``)."""
    return markdown(str(load_story()["workshop"]["sandbox"]).strip())


def steps(profile: str = "lab"):
    """The story's steps: what each iteration changes, the article's number, a link to run it (Markdown)."""
    from labkit.scenario import load_scenario

    lines = ["| step | what changes | replicas | article transfers/s | run it |", "| --- | --- | --- | --- | --- |"]
    for it in load_scenario().iterations(profile):
        lines.append(f"| {it.number} | {it.title} | {it.replicas if it.setup == 'nodeport' else '-'} | "
                     f"{it.article_tps:,} | [iteration.ipynb](iteration.ipynb) with `iteration = {it.number}` |")
    return markdown("\n".join(lines) + "\n\nThen [sandbox.ipynb](sandbox.ipynb): your own values.")


def picture(status: dict[str, Any]):
    """:func:`testbed_picture` as a PNG image a notebook shows (no pyplot backend needed)."""
    import io

    from IPython.display import Image
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(testbed_picture(status)).print_png(buf)
    return Image(data=buf.getvalue(), format="png")


# --- predict, then check ------------------------------------------------------------------

def question(number: int):
    """The question to answer before iteration ``number`` runs (Markdown)."""
    text = str(load_story().get("questions", {}).get(number, "")).strip()
    return markdown(f"**Predict before you run it.** {text}\n\nWrite your answer in the next cell "
                    "(`prediction = ...`); the check after the run compares it with what happened.")


def _rows_for(number: int, own_dir: Path) -> tuple[pd.DataFrame, dict[int, str]]:
    """This iteration's row, and the rows the finding needs: a sibling folder's, else the reference's."""
    own = read_json(own_dir / ROW_FILE)
    rows, source = {number: own}, {number: "your run"}
    reference = pd.read_csv(REFERENCE_RUN / SUMMARY_FILE) if (REFERENCE_RUN / SUMMARY_FILE).exists() else pd.DataFrame()
    for other in range(1, 10):
        if other == number:
            continue
        sibling = own_dir.parent / f"iteration-{other}" / ROW_FILE
        if sibling.exists() and read_json(sibling).get("profile") == own.get("profile"):
            rows[other], source[other] = read_json(sibling), "your run"
        elif not reference.empty and other in set(reference["iteration"]):
            rows[other] = reference[reference["iteration"] == other].iloc[0].to_dict()
            source[other] = "reference run"
    return pd.DataFrame(list(rows.values())), source


def what_happened(number: int, rows: dict[int, pd.Series]) -> str:
    """The answer to iteration ``number``'s question, from the rows (``more``, ``stays`` ...)."""
    row = rows[number]
    if number == 1:
        return f"{float(row['transfers_per_s']):.0f}"
    if number == 4:
        at_stop, after = float(row.get("node_count_at_stop") or 0), float(row.get("node_count_after_stop") or 0)
        return "stays" if at_stop > 0 and after >= findings.AFTER_STOP_KEPT * at_stop else "falls"
    if number == 7:
        cmax = float(row["conntrack_max"]) or float("inf")
        if float(row["peak_node_count"]) >= 0.95 * cmax:
            return "node full"
        return "pod full" if float(row["peak_pod_count"]) >= 0.95 * cmax else "nothing full"
    base = float(rows[COMPARED_WITH[number]]["transfers_per_s"])
    ratio = float(row["transfers_per_s"]) / base if base else float("inf")
    return "less" if ratio < SAME_BAND[0] else "more" if ratio > SAME_BAND[1] else "same"


def check(number: int, own_dir: str | os.PathLike, prediction: Any = None) -> pd.DataFrame:
    """The finding of iteration ``number`` from the participant's own data, beside the reference.

    Args:
        number: the iteration.
        own_dir: its folder (``summary-row.json`` written by the run); rows of other
            iterations the finding needs come from sibling folders of the same profile,
            else from the reference run (``results/reference``), and the table says which.
        prediction: what the participant wrote before the run.

    Returns:
        A two-column table (``what``, ``value``).
    """
    frame, source = _rows_for(number, Path(own_dir))
    rows = {int(r["iteration"]): r for _, r in frame.iterrows()}
    own = rows[number]
    out = [("your prediction", "(none written)" if prediction in (None, "") else str(prediction))]
    try:
        out.append(("what happened (your numbers)", what_happened(number, rows)))
    except KeyError:
        out.append(("what happened (your numbers)", "needs an iteration that is neither run nor in the reference"))
    ref = pd.read_csv(REFERENCE_RUN / SUMMARY_FILE) if (REFERENCE_RUN / SUMMARY_FILE).exists() else pd.DataFrame()
    ref_row = ref[ref["iteration"] == number].iloc[0] if not ref.empty and number in set(ref["iteration"]) else None
    out.append(("transfers/s: yours / reference run / article",
                f"{float(own['transfers_per_s']):.0f} / "
                f"{'-' if ref_row is None else format(float(ref_row['transfers_per_s']), '.0f')} / "
                f"{own['article_transfers_per_s']}"))
    fid = FINDING_OF.get(number)
    if fid:
        mine = {f.id: f for f in findings.check(frame)}[fid]
        out += [(f"finding {fid}", mine.claim), ("on your data", mine.result), ("evidence (yours)", mine.evidence)]
        ref_findings = REFERENCE_RUN / "findings.csv"
        if ref_findings.exists():
            theirs = pd.read_csv(ref_findings).set_index("id").loc[fid]
            out.append(("reference run", f"{theirs['result']}: {theirs['evidence']}"))
    others = sorted(k for k in source if k != number)
    if others:
        out.append(("other iterations taken from", ", ".join(f"it.{k}: {source[k]}" for k in others)))
    return FullTable(out, columns=["what", "value"]).set_index("what")


class FullTable(pd.DataFrame):
    """A DataFrame shown whole in a notebook: no cell cut to 50 characters and an ellipsis
    (a finding's evidence is the point of the table)."""

    @property
    def _constructor(self):
        return FullTable

    def _repr_html_(self):
        with pd.option_context("display.max_colwidth", None):
            return super()._repr_html_()


# --- errors a participant can read ----------------------------------------------------------

def readable_errors() -> bool:
    """In an IPython kernel, show a LabkitError as its type and message, not a traceback.

    The cell still fails (papermill and "run all" stop there).  Returns True when
    installed (False outside IPython).
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    from labkit.exceptions import LabkitError

    def handler(shell, etype, value, tb, tb_offset=None):
        # IPython only calls a custom handler and shows nothing itself: _showtraceback is what
        # puts the cell's error output (name, message) in the notebook, as papermill and the
        # replay's failure record read it; the traceback shown is one line
        stb = [f"\x1b[31m{etype.__name__}\x1b[0m: {value}"]
        shell._showtraceback(etype, value, stb)
        return stb

    shell.set_custom_exc((LabkitError,), handler)
    return True


def status_json(testbed: Any) -> dict[str, Any]:
    """The ``labkit status --json`` document of ``testbed`` (a round trip through JSON)."""
    return json.loads(json.dumps(testbed.status()))
