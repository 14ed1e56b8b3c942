"""The summary notebook's view of a run folder: lab beside article, findings, sysctls.

:class:`RunSummary` reads ``summary.csv`` and ``manifest.json`` of a run and
returns what the summary notebook shows; :meth:`RunSummary.findings` also
writes ``findings.csv`` for the index page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from labkit import charts
from labkit.findings import check, table
from labkit.results import FINDINGS_FILE, MANIFEST_FILE, SUMMARY_FILE, read_json, write_csv
from labkit.story import load_story, markdown


class RunSummary:
    """The summary of one run folder.

    Args:
        run_dir: ``results/<run-id>``.
        profile: the profile the run used (for the article/profile sysctl table).
    """

    def __init__(self, run_dir: str | os.PathLike, profile: str | None = None):
        self.run_dir = Path(run_dir)
        self.summary = pd.read_csv(self.run_dir / SUMMARY_FILE)
        manifest = self.run_dir / MANIFEST_FILE
        self.manifest = read_json(manifest) if manifest.exists() else {}
        self.profile = self._local(profile or self.manifest.get("profile_used")
                                   or self.manifest.get("profile") or "lab")

    def _local(self, profile: str) -> str:
        """A profile file recorded with the run, found in the run folder wherever that now lives."""
        if str(profile).endswith((".yaml", ".yml")) and not Path(profile).exists():
            here = self.run_dir / Path(profile).name
            if here.exists():
                return str(here)
        return str(profile)

    def calibration(self):
        """Which lab profile the run used and why: the machine check and each derived value (Markdown)."""
        cal = self.manifest.get("calibration")
        if not cal:
            return markdown(f"The run used the `{Path(self.profile).stem}` profile as it is "
                            "(no machine check: it is not a `lab` replay on the netns testbed).")
        if cal.get("skipped"):
            return markdown(f"**Profile used: the committed `lab` profile.** {cal['skipped']}.")
        m, b = cal["measured"], cal["basis"]
        base_lifetime = {str(k): v for k, v in b["lifetimes"].items()}[str(m["udp_timeout"])]  # JSON keys are text
        seen = (f"Before the first iteration, one {m['udp_timeout']} s-timeout load measured this machine: it gives "
                f"the lab {cal['cores']:g} CPU(s); one pod with {cal['cpu_limit']:g} CPU served "
                f"**{m['transfers_per_s']:.0f} transfers/s** and a transfer held **{m['lifetime']} entry-s** in "
                f"the node. The committed `lab` profile was derived on a machine where the same load gave "
                f"{b['check_capacity']:.0f}/s and {base_lifetime:g} entry-s "
                f"with {b['cpu_limit']:g} CPU per pod on {b['cores']:g} CPU(s) (tolerance {cal['tolerance']:.0%}).")
        if not cal.get("differs"):
            return markdown(f"**Profile used: the committed `lab` profile.** {seen} Within tolerance.")
        rows = "\n".join(f"| {d['sysctl'].replace('net.netfilter.', '')} | {d['article']} | {d.get('committed', '')} "
                          f"| **{d['lab']}** | {d['why']} |" for d in cal.get("derivation") or [])
        return markdown(f"**Profile used: the `lab` profile derived for this machine** (`profile-lab.yaml` in the run "
                        f"folder). {seen} It differs: " + "; ".join(cal["reasons"]) + ".\n\n"
                        "| value | article | committed | this machine | why |\n|---|---|---|---|---|\n" + rows)

    def intro(self):
        """The summary's introduction, with the run's identity (Markdown)."""
        m = self.manifest
        env = m.get("environment", {})
        shown = (f"{m.get('profile', 'lab')} (derived for this machine: {Path(self.profile).name})"
                 if str(self.profile).endswith((".yaml", ".yml")) else self.profile)
        where = f"Linux {env.get('kernel', '?')} on {env.get('cpus', '?')} CPUs"
        tb = m.get("testbed_machine")
        if tb:   # --on: the kernel under test is that machine's, the notebooks ran here
            where = (f"the testbed on `{m.get('on') or tb.get('name')}`: Linux {tb.get('kernel', '?')} "
                     f"({tb.get('distro', '?')}) on {tb.get('cpus', '?')} CPUs; the notebooks on "
                     f"{env.get('hostname', 'this machine')}: {where}")
        who = (f"Run `{m.get('run_id', self.run_dir.name)}`, profile `{shown}`, {where}, "
               f"{len(self.summary)} iteration(s) completed.") if m else ""
        return markdown(f"{load_story()['summary']['intro'].strip()}\n\n{who}")

    def throughput_chart(self):
        """Lab transfers/s per iteration beside the article's, both relative to iteration 1."""
        base = int(charts.relative_base(self.summary)["iteration"])
        return charts.throughput_chart(self.summary, title=f"Transfers per second, relative to iteration {base}")

    def table(self) -> pd.DataFrame:
        """Per iteration: lab and article transfers/s (absolute and relative) and the pressure seen."""
        s = self.summary.sort_values("iteration")
        base = charts.relative_base(s)
        vs = f"vs it. {int(base['iteration'])}"
        out = pd.DataFrame({
            "iteration": s["iteration"],
            "part": ["article" if n <= 9 else "past the article" for n in s["iteration"]],
            "title": s.get("title", ""),
            "lab transfers/s": s["transfers_per_s"].round(0).astype(int),
            f"lab {vs}": charts.ratio(s["transfers_per_s"], base["transfers_per_s"]).round(2),
            "article transfers/s": s["article_transfers_per_s"],
            f"article {vs}": charts.ratio(s["article_transfers_per_s"], base["article_transfers_per_s"]).round(2),
            "failed": s["transfers_failed"],
            "node peak / max": [f"{a:.0f} / {b:.0f}" for a, b in zip(s["peak_node_count"], s["conntrack_max"])],
            "pod peak": s["peak_pod_count"],
            "drops node / pods": [f"{a:.0f} / {b:.0f}" for a, b in zip(s["node_drops"], s["pod_drops"])],
            "early drops node / pods": [f"{a:.0f} / {b:.0f}" for a, b in
                                        zip(s["node_early_drops"], s["pod_early_drops"])],
            "log lines table / expect": [f"{a:.0f} / {b:.0f}" for a, b in
                                         zip(s["table_full_logs"], s["expect_full_logs"])],
        })
        return out.set_index("iteration")

    def model_check(self) -> pd.DataFrame:
        """The sizing model (``labkit.capacity``) beside the measurement, per iteration."""
        from labkit.capacity import compare

        cols = ["transfers_per_s", "predicted_transfers_per_s", "node_fills predicted/measured",
                "node_steady predicted", "node_steady measured", "node_steady_error",
                "pod_fills predicted/measured", "pod_steady predicted", "pod_steady measured",
                "pod_steady_error", "predicted_entry_bytes", "slab_lab_bytes_peak", "memory_error"]
        return compare(self.summary)[cols]

    def model_verdict(self):
        """Whether the model held in this run: fills calls, steady counts, memory (Markdown)."""
        from labkit.capacity import compare, verdict

        lines = [f"- **{'holds' if holds else 'does not hold'}**: {claim} ({evidence})"
                 for claim, holds, evidence in verdict(compare(self.summary))]
        return markdown("\n".join(lines))

    def model_chart(self):
        """Predicted against measured: transfers/s and each namespace's steady count."""
        return charts.model_chart(self.model_check(), title="The sizing model beside the measurement")

    def findings(self):
        """F1-F7 and the iteration-4 observations, checked; also written to ``findings.csv``.

        Returns:
            A pandas Styler: the whole claim and evidence, pass in green, fail in red.
        """
        frame = table(check(self.summary))
        write_csv(frame, self.run_dir / FINDINGS_FILE)
        colors = {"pass": "color: #1a7f37; font-weight: bold", "fail": "color: #c62828; font-weight: bold"}
        return (frame.set_index("id").style
                .map(lambda v: colors.get(v, "color: #8a6d00"), subset=["result"])
                .set_properties(**{"text-align": "left", "white-space": "normal"}))

    def sysctls(self) -> pd.DataFrame:
        """The sysctls of each iteration: this profile's value, the article's in brackets."""
        from labkit.scenario import load_scenario

        rows = load_scenario().article_values(self.profile)
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        frame["column"] = frame["where"] + ": " + frame["sysctl"].str.replace("net.netfilter.nf_conntrack_", "", regex=False)
        frame["shown"] = [f"{v} ({a})" if v != a else f"{v}" for v, a in zip(frame["value"], frame["article"])]
        pivot = frame.pivot(index="iteration", columns="column", values="shown").fillna("default")
        return pivot.reindex(sorted(set(self.summary["iteration"]) | set(range(1, 10)))).fillna("-")

    def environment(self) -> pd.DataFrame:
        """Where and with what the run ran (from the manifest)."""
        m = self.manifest
        env = m.get("environment", {})
        git = env.get("git") or {}
        rows = [("run started", m.get("started")), ("testbed", m.get("testbed")), ("kernel", env.get("kernel")), ("distribution", env.get("distro")), ("CPUs", env.get("cpus")),
                ("Python", env.get("python")), ("labkit revision", f"{git.get('revision')}"
                                                 + (" (uncommitted changes)" if git.get("dirty") else "")),
                *[(f"package {k}", v) for k, v in (env.get("packages") or {}).items()]]
        tb = m.get("testbed_machine")
        if tb:   # --on: the testbed's machine first; kernel, distribution and CPUs below are the notebooks'
            rows[2:5] = [("testbed machine", m.get("on") or tb.get("name")), ("testbed kernel", tb.get("kernel")),
                         ("testbed distribution", tb.get("distro")), ("testbed CPUs", tb.get("cpus")),
                         ("notebooks' kernel", env.get("kernel")), ("notebooks' distribution", env.get("distro")),
                         ("notebooks' CPUs", env.get("cpus"))]
        return pd.DataFrame(rows, columns=["", "value"]).set_index("")
