"""``index.html``: one self-contained page that links every report of a run.

It lists each iteration with its status (a failed one with its reason), the
lab's transfers/s beside the article's, and links to the HTML report, the
executed notebook and the data files; then the summary report and, when the
summary notebook wrote them, the findings.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from labkit.results import FINDINGS_FILE, INDEX_FILE, iteration_dir
from labkit.util import atomic_write

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok, .pass { color: #1a7f37; font-weight: 600; } .failed, .fail { color: #c62828; font-weight: 600; }
.running, .interrupted, .pending, .not-run { color: #8a6d00; font-weight: 600; }
.small { font-size: 0.85em; color: #555; }
"""


def _status_cell(status: str, reason: str | None = None) -> str:
    text = html.escape(status)
    if reason:
        text += f'<br><span class="small">{html.escape(reason)}</span>'
    return f'<td class="{html.escape(status)}">{text}</td>'


def _num(value: Any, fmt: str = "{:.0f}") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return '<td class="num">-</td>'
    try:
        return f'<td class="num">{fmt.format(value)}</td>'
    except (ValueError, TypeError):
        return f'<td class="num">{html.escape(str(value))}</td>'


def _link(folder: str, name: str | None, label: str) -> str:
    return f'<a href="{html.escape(folder)}/{html.escape(name)}">{label}</a>' if name else ""


def render(run_dir: Path, manifest: dict[str, Any]) -> str:
    """Return the index page of a run as HTML text."""
    env = manifest.get("environment", {})
    rows = []
    past_shown = False
    for number in manifest.get("iterations_requested", []):
        if int(number) > 9 and not past_shown:  # iterations 10-12 go past the article: a group of their own
            rows.append("<tr><th colspan='7'>Past the article (no article numbers)</th></tr>")
            past_shown = True
        entry = manifest.get("iterations", {}).get(str(number))
        folder = iteration_dir(run_dir, number).name
        if not entry:
            rows.append(f"<tr><td>{number}</td><td></td>{_status_cell('pending')}"
                        "<td></td><td></td><td></td><td></td></tr>")
            continue
        row = entry.get("row") or {}
        files = [f for f in entry.get("files", []) if f.endswith((".csv", ".csv.gz", ".json"))]
        links = " ".join(x for x in (
            _link(folder, entry.get("html"), "report"),
            _link(folder, "iteration.ipynb" if "iteration.ipynb" in entry.get("files", []) else None,
                  "notebook"),
        ) if x)
        data = " ".join(_link(folder, f, html.escape(f)) for f in files)
        rows.append(
            f"<tr><td>{number}</td><td>{html.escape(str(row.get('title', '')))}</td>"
            f"{_status_cell(entry.get('status', '?'), entry.get('error'))}"
            f"{_num(row.get('transfers_per_s'))}"
            f"{_num(row.get('article_transfers_per_s') if int(number) <= 9 else None)}"  # none past the article
            f"<td>{links}</td><td class='small'>{data}</td></tr>")
    summary = manifest.get("summary") or {}
    summary_html = ""
    if summary:
        link = f'<a href="{summary["html"]}">summary report</a>' if summary.get("html") else ""
        summary_html = (f"<h2>Summary</h2><p>{link} "
                        f"<span class='{summary.get('status')}'>{html.escape(summary.get('status', ''))}</span>"
                        f"{' - ' + html.escape(summary['error']) if summary.get('error') else ''}</p>")
    findings_html = _findings(run_dir / FINDINGS_FILE)
    calibration_html = _calibration(manifest)
    title = f"labkit replay {manifest.get('run_id', run_dir.name)}"
    meta = (f"profile <b>{html.escape(str(manifest.get('profile')))}</b> on the "
            f"{html.escape(str(manifest.get('testbed')))} testbed &middot; status "
            f"<span class='{html.escape(str(manifest.get('status')))}'>{html.escape(str(manifest.get('status')))}</span>"
            f" &middot; started {html.escape(str(manifest.get('started')))}"
            + (f" &middot; {manifest['duration_s']:.0f} s" if manifest.get("duration_s") else "")
            + _testbed_machine(manifest)
            + f"<br>{'notebooks: ' if manifest.get('testbed_machine') else ''}"
            f"Linux {html.escape(str(env.get('kernel')))} &middot; {html.escape(str(env.get('distro')))}"
            f" &middot; {env.get('cpus')} CPUs &middot; labkit {html.escape(str((env.get('git') or {}).get('revision') or '')[:10])}"
            f" &middot; <a href='manifest.json'>manifest.json</a>"
            + (" &middot; <a href='summary.csv'>summary.csv</a>" if (run_dir / "summary.csv").exists() else ""))
    start_here = (' New here? Read <a href="start-here.html">start here</a> first.'
                  if (run_dir / "start-here.html").exists() else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">{meta}</p>
<p>The nine iterations of <i>Exposing TFTP Server as Kubernetes Service, Part 6</i>, replayed on a
real Linux kernel: each report tells what the iteration changes, shows the conntrack tables and the
transfers per second, and compares the lab with the article.{start_here}</p>
{calibration_html}<h2>Iterations</h2>
<table><thead><tr><th>#</th><th>iteration</th><th>status</th><th>lab transfers/s</th>
<th>article transfers/s</th><th>reports</th><th>data</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{summary_html}{findings_html}
</body></html>
"""


def _calibration(manifest: dict[str, Any]) -> str:
    """Which profile the run used and why, and what happened to its background flows."""
    parts = []
    cal = manifest.get("calibration") or {}
    if cal.get("skipped"):
        parts.append(html.escape(cal["skipped"]))
    elif cal:
        m = cal.get("measured") or {}
        seen = (f"machine check: one pod with {cal.get('cpu_limit')} CPU served {_fmt(m.get('transfers_per_s'))} "
                f"transfers/s, {m.get('lifetime')} entry-s per transfer")
        if cal.get("differs"):
            parts.append(f"{html.escape(seen)}; this machine differs from the committed lab profile's "
                         f"({html.escape('; '.join(cal.get('reasons') or []))}): the run used the profile derived "
                         "for it, <a href='profile-lab.yaml'>profile-lab.yaml</a>")
        else:
            parts.append(f"{html.escape(seen)}: within tolerance, the committed lab profile was used")
    for flows in manifest.get("background_flows") or []:
        if flows.get("failed"):
            parts.append(f"background flows started {html.escape(str(flows.get('started')))} "
                         f"<span class='failed'>failed</span> {html.escape(str(flows.get('failed')))}: "
                         f"{html.escape(str(flows.get('error')))}")
    return "".join(f"<p class='meta'>{p}</p>" for p in parts)


def _fmt(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "?"


def _findings(path: Path) -> str:
    if not path.exists():
        return ""
    frame = pd.read_csv(path)
    rows = "".join(
        f"<tr><td>{html.escape(str(r.get('id')))}</td><td>{html.escape(str(r.get('claim')))}</td>"
        f"{_status_cell(str(r.get('result')))}<td class='small'>{html.escape(str(r.get('evidence')))}</td></tr>"
        for r in frame.to_dict("records"))
    return ("<h2>Findings</h2><table><thead><tr><th>id</th><th>claim</th><th>result</th>"
            f"<th>evidence</th></tr></thead><tbody>{rows}</tbody></table>")


def write(run_dir: Path, manifest: Any) -> Path:
    """Write ``index.html`` of a run folder atomically; return its path."""
    data = manifest.data if hasattr(manifest, "data") else manifest
    path = Path(run_dir) / INDEX_FILE
    atomic_write(path, render(Path(run_dir), data).encode())
    return path


def _testbed_machine(manifest: dict) -> str:
    """The ``--on`` machine's kernel, distribution and CPUs (HTML; empty for a run on this machine)."""
    tb = manifest.get("testbed_machine")
    if not tb:
        return ""
    return (f"<br>testbed on {html.escape(str(manifest.get('on') or tb.get('name')))}: "
            f"Linux {html.escape(str(tb.get('kernel')))} &middot; {html.escape(str(tb.get('distro')))}"
            f" &middot; {tb.get('cpus')} CPUs")
