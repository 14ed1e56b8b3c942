"""One iteration as a notebook sees it: the set-up, the run, the charts, the teardown.

The iteration notebook stays thin: each of its code cells is one call here.
:class:`IterationSession` holds the parameters papermill injected, builds the
testbed, runs :func:`labkit.run.run_iteration`, and reads the iteration's
tables back from its folder for the charts (so a finished folder can be
charted again without running anything).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import pandas as pd

from labkit import background, charts
from labkit.prepare import prepare
from labkit.results import ROW_FILE, read_json, read_table
from labkit.story import iteration_text, load_story, markdown

log = logging.getLogger(__name__)

NODE_SYSCTLS = ("net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_expect_max",
                "net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout_stream")


class IterationSession:
    """The notebook's handle on one iteration.

    Args:
        iteration: the iteration number (1..9).
        profile: ``article``, ``lab``, ``quick`` or a profile file.
        testbed: the testbed backend name (``netns``).
        on: the machine the netns testbed runs on: None for this one, ``vagrant:lab`` (the
            lab VM), an inventory host or ``[user@]host[:port]`` (over SSH).
        out_dir: the iteration's folder; ``results/notebook-<profile>/iteration-<N>`` when None
            (``$LABKIT_RESULTS_DIR`` instead of ``results/`` when set).
        run_id: the replay run's id (set by ``labkit replay``); the testbed then keeps its
            state where the replay driver tears it down.
        duration, cooldown: override the profile's load duration and cool-down (s).
        scenario: another iterations data file.
        compress: write the iteration's CSV tables gzip-compressed.
    """

    def __init__(self, iteration: int, profile: str = "lab", *, testbed: str = "netns",
                 on: str | None = None, out_dir: str | os.PathLike | None = None, run_id: str | None = None,
                 duration: float | None = None, cooldown: float | None = None,
                 scenario: str | None = None, compress: bool = False):
        self.prepared = prepare(iteration, profile, testbed, out_dir, run_id, duration=duration,
                                cooldown=cooldown, scenario=scenario,
                                testbed_options={"on": on} if on else None)
        self.scenario = self.prepared.scenario
        self.iteration = self.prepared.iteration
        self.article = self.prepared.article
        self.profile = self.prepared.profile
        self.testbed_name = testbed
        self.run_id = run_id
        self.out_dir = self.prepared.out_dir
        self._flows = None  # background flows this session started (see up())
        self.compress = compress

    # --- the story ------------------------------------------------------------------

    def title(self):
        """The heading: iteration number and title."""
        it, on = self.iteration, self.prepared.testbed_options.get("on")
        where = f" on `{on}`" if on else ""
        return markdown(f"# Iteration {it.number}: {it.title}\n\n*Profile `{it.profile}` on the "
                        f"`{self.testbed_name}` testbed{where}.*")

    def story(self):
        """What this iteration changes and what the kernel does (Markdown)."""
        it = self.iteration
        where = "Past the article" if it.past_article else "The article"
        return markdown(f"{iteration_text(it.number, 'story')}\n\n> **{where}:** {it.observed}")

    def look_for(self):
        """What to look for in the charts (Markdown)."""
        return markdown(iteration_text(self.iteration.number, "look_for"))

    @staticmethod
    def intro():
        """The lab's one-paragraph introduction (Markdown)."""
        return markdown(str(load_story()["intro"]).strip())

    def setup_table(self) -> pd.DataFrame:
        """Every setting of the iteration: the article's value beside this profile's."""
        it, art = self.iteration, self.article
        rows = [("set-up", art.setup, it.setup),
                ("replicas", art.replicas if art.setup == "nodeport" else "-",
                 it.replicas if it.setup == "nodeport" else "-"),
                ("CPU per pod (cores)", art.cpu_limit or "no limit", it.cpu_limit or "no limit"),
                ("background flows per second (own namespace)", art.background_flows or "-",
                 it.background_flows or "-")]
        for where, a, b in (("node", art.node_sysctls, it.node_sysctls), ("pod", art.pod_sysctls, it.pod_sysctls)):
            for name in a:
                rows.append((f"{where}: {name.split('.')[-1]}", a[name], b.get(name)))
        rows.append(("kubelet allowedUnsafeSysctls", ", ".join(art.allowed_unsafe_sysctls) or "-",
                     ", ".join(it.allowed_unsafe_sysctls) or "-"))
        if it.past_article:
            rows += [("pods track connections", art.pods_track_conntrack, it.pods_track_conntrack),
                     ("node: NOTRACK for the NodePort", art.node_notrack, it.node_notrack),
                     ("kube-proxy mode", art.proxy_mode, it.proxy_mode)]
        rows += [("load duration (s)", art.duration_s, it.duration_s),
                 ("cool-down sampled (s)", art.cooldown_s, it.cooldown_s),
                 ("transfers in flight", art.concurrency, it.concurrency),
                 ("file size (bytes)", art.file_size, it.file_size)]
        return pd.DataFrame(rows, columns=["setting", "article", f"{it.profile} profile"]).set_index("setting")

    def why_different(self):
        """Why the profile's values differ from the article's (Markdown)."""
        prof = self.profile
        text = prof.description or "The article's values as they are."
        calib = (prof.extra or {}).get("calibration")
        if calib:
            lines = [f"- `{d['sysctl'].split('.')[-1]}` {d['article']} -> **{d['lab']}**"
                     + (f" (committed profile: {d['committed']})" if "committed" in d else "") + f": {d['why']}"
                     for d in calib.get("derivation", [])]
            where = ("Derived for this machine before the run" if prof.extra.get("derived_from")
                     else "From `labkit calibrate` on this kind of machine")
            text += f"\n\n{where}:\n\n" + "\n".join(lines)
        return markdown(f"**Why the `{prof.name}` values differ from the article's.** {text}")

    # --- running --------------------------------------------------------------------

    @property
    def testbed(self):
        """The testbed (built on first use, see :func:`labkit.prepare.build_testbed`; not yet up)."""
        return self.prepared.testbed

    def up(self):
        """Bring the testbed up (or reconfigure it) for this iteration; show what is there (Markdown).

        When the iteration runs background flows and none are running (and no replay
        keeps them: ``run_id`` unset), they start here, so that the kernel's garbage
        collector takes up their cycle (up to a minute) while the participant reads
        on and predicts, not at the start of the load step.
        """
        self.testbed.up(self.iteration)
        st = self.testbed.status()
        svc = st.get("service") or {}
        pods = ", ".join(h["name"] for h in st.get("hosts", []) if h.get("role") == "pod") or "none (plain server)"
        return markdown(f"Testbed `{st.get('run_id')}` is **{st.get('state')}** for iteration {st.get('iteration')}: "
                        f"service `{svc.get('node_ip')}:{svc.get('node_port')}/udp`, pods: {pods}.{self._warm_ahead()}")

    def _warm_ahead(self) -> str:
        """Start the iteration's background flows when this session has none running; a sentence on them (or "")."""
        from labkit.run import background_flows

        flows = background_flows(self.testbed, self.iteration)
        if not flows or self.run_id is not None:
            return ""
        info = self._flows.info if self._flows is not None else None
        if info is None:
            if self._flows is not None:  # ours stopped (their error is in their marker): fresh ones
                self._flows.stop()
            where = self.testbed.node_machine()
            self._flows = background.BackgroundFlows(flows, host=where.host, directory=where.state_dir,
                                                     python=where.python).start()
            info = {"warm_at": self._flows.started + self._flows.warm_s}
        left = float(info["warm_at"]) - time.time()
        when = (f"the kernel's garbage collector takes up their cycle within {left:.0f} s (the run step "
                "waits for that if you get there sooner)" if left > 0 else "the garbage collector is on their cycle")
        return (f" {flows:,} short background flows a second run beside it, as on a busy node: {when}.")

    def flows_in_use(self):
        """The background flows this session's runs use: those :meth:`up` started, or in a replay
        (``run_id``) the replay's, found in its state folder; None: each run starts its own."""
        if self.run_id is None or self._flows is not None:
            return self._flows
        where = self.testbed.node_machine()
        return background.find(where.state_dir, host=where.host) if where is not None else None

    def run(self, live: bool = True) -> pd.DataFrame:
        """Run the iteration (testbed up, monitor, load, cool-down); return the key numbers.

        A chart of the load is shown in the cell: redrawn about once a second while
        it runs (``live``), and left as a static image when it ends (papermill and the
        HTML report keep that one).  ``live=False`` draws it once, at the end.
        """
        from labkit.live import LiveChart
        from labkit.run import run_iteration

        it = self.iteration
        chart = LiveChart(f"Iteration {it.number}: the load as it ran", live=live,
                          expected_s=float(it.duration_s) + float(it.cooldown_s) + 2.0).begin()
        run_iteration(self.testbed, it, self.out_dir, compress=self.compress, on_step=chart.step, live=chart,
                      calibration=self.prepared.calibration, flows=self.flows_in_use())
        return self.result_table()

    # --- the article's commands ---------------------------------------------------------

    def sh(self, role: str, command: str):
        """Run one of the article's commands as ``role`` (``node``, ``pod-1``, ``init`` ...) and show it.

        Returns:
            The :class:`~labkit.commands.Shown` command (its Result, and a table where the
            output is one), or a note when this iteration has no such role (no pods in iteration 1).

        Raises:
            TestbedError: the testbed is not up.
        """
        from labkit.commands import sh
        from labkit.exceptions import TestbedError

        if not self.testbed.roles():
            raise TestbedError("the testbed is not up: run `lab.up()` (or `labkit up`) first")
        if role not in self.testbed.roles():
            return markdown(f"*Iteration {self.iteration.number} has no `{role}` "
                            f"({'the server is a plain process on the node' if self.iteration.setup == 'plain' else 'roles: ' + ', '.join(self.testbed.roles())}): "
                            f"nothing to run there.*")
        return sh(self.testbed, role, command)

    def sysctl_w(self):
        """The article's ``sysctl -w`` of this iteration's node values, run for real (where each may be set)."""
        from labkit.commands import Shown, ShownList, sh, sysctl_commands

        lines = sysctl_commands(dict(self.iteration.node_sysctls))
        if not lines:
            return ShownList([sh(self.testbed, "node", "sysctl " + " ".join(NODE_SYSCTLS),
                                 note="Iteration 1 sets nothing: these are the kernel's defaults.")])
        shown: list[Shown] = [sh(self.testbed, role, cmd) for role, cmd in lines]
        return ShownList(shown)

    def pod_sysctls(self):
        """The Deployment's ``securityContext.sysctls``, the kubelet's allowlist, and its verdict.

        Also shows the kubelet's refusal (``SysctlForbidden``) of the article's pod
        sysctls when they are not allowlisted: with an empty allowlist when this
        iteration sets them, under this iteration's allowlist otherwise.
        """
        from labkit.commands import kubelet_admission

        return kubelet_admission(self.iteration, self.scenario.iteration(8, self.profile))

    def question(self):
        """The question to answer before the run (Markdown)."""
        from labkit.workshop import question

        return question(self.iteration.number)

    def check(self, prediction=None) -> pd.DataFrame:
        """After the run: the article's finding for this iteration from your numbers, beside the reference."""
        from labkit.workshop import check

        return check(self.iteration.number, self.out_dir, prediction)

    def down(self) -> str:
        """Bring the testbed down (and the background flows :meth:`up` started) and restore
        the global sysctls; idempotent."""
        try:
            if self.prepared.testbed_built:
                self.prepared.testbed.down()
        finally:
            if self._flows is not None:
                self._flows.stop()
                self._flows = None
        return "testbed down, global sysctls restored"

    # --- results ----------------------------------------------------------------------

    @property
    def row(self) -> dict[str, Any]:
        """This iteration's summary.csv row (from its folder)."""
        return read_json(self.out_dir / ROW_FILE)

    def _window(self) -> tuple[float, float]:
        doc = read_json(self.out_dir / "load-summary.json")
        return float(doc["load_start"]), float(doc["load_stop"]) - float(doc["load_start"])

    def result_table(self) -> pd.DataFrame:
        """The measured numbers that tell this iteration's story."""
        return result_table(self.row)

    def conntrack_chart(self):
        """Conntrack count of node and pods against the max, drops, and kernel log lines."""
        t0, load_s = self._window()
        return charts.conntrack_chart(read_table(self.out_dir, "samples"),
                                      read_table(self.out_dir, "events", required=False),
                                      t0=t0, load_s=load_s,
                                      title=f"Iteration {self.iteration.number}: conntrack tables")

    def expectation_chart(self):
        """The node's expectation count against expect_max."""
        t0, load_s = self._window()
        return charts.expectation_chart(read_table(self.out_dir, "samples"), t0=t0, load_s=load_s,
                                        title=f"Iteration {self.iteration.number}: expectation table (node)")

    def transfers_chart(self):
        """Transfers per second over time, failures by reason."""
        t0, load_s = self._window()
        return charts.transfers_chart(read_table(self.out_dir, "load"), t0=t0, load_s=load_s,
                                      title=f"Iteration {self.iteration.number}: transfers per second")


def result_table(r: dict) -> pd.DataFrame:
    """The measured numbers of a summary row ``r`` that tell its iteration's story (pure)."""
    rows = [
        ("transfers/s (lab, second half of the load)", f"{r['transfers_per_s']:.0f}"),
        ("transfers/s (article)", f"{r['article_transfers_per_s']}"),
        ("transfers ok / failed", f"{r['transfers_ok']} / {r['transfers_failed']}"),
        ("failures by reason", ", ".join(f"{k}: {v}" for k, v in json.loads(r["failed_by_reason"]).items()) or "-"),
        ("nf_conntrack_max / expect_max", f"{r['conntrack_max']} / {r['expect_max']}"),
        ("peak count: node / busiest pod", f"{r['peak_node_count']} / {r['peak_pod_count']}"),
        ("peak expectations (node)", f"{r['peak_expect_count']}"),
        ("drops / early drops: node", f"{r['node_drops']} / {r['node_early_drops']}"),
        ("drops / early drops: pods", f"{r['pod_drops']} / {r['pod_early_drops']}"),
        ('log lines "table full": node / pods', f"{r['node_table_full_logs']} / {r['pod_table_full_logs']}"),
        ('log lines "expectation table full"', f"{r['expect_full_logs']}"),
        ("node count when the load stopped / "
         f"{r['after_stop_s']:g} s later", f"{r['node_count_at_stop']:.0f} / {r['node_count_after_stop']:.0f}"
         if r.get("node_count_at_stop") is not None else "-"),
        ("UDP timeout: node / pod (s)", f"{r['node_udp_timeout']} / {r['pod_udp_timeout']}"),
    ]
    if r.get("predicted_node_fills") is not None:  # the sizing model beside it (labkit size)
        fills = lambda v: "fills" if v else "does not fill"  # noqa: E731
        rows += [
            ("model: transfers/s the tables let through (offered)",
             f"{r['predicted_transfers_per_s']:.0f} ({r['model_offered_per_s']:.0f})"),
            ("model: node table / pod table", f"{fills(r['predicted_node_fills'])} / "
                                              f"{fills(r['predicted_pod_fills'])}"),
            ("measured: node table / pod table", f"{fills(r['measured_node_fills'])} / "
                                                 f"{fills(r['measured_pod_fills'])}"),
            ("model: steady count node / each pod (measured mean, 2nd half)",
             f"{r['predicted_node_count']:.0f} / {r['predicted_pod_count']:.0f} "
             f"({r['mean_node_count']:.0f} / {r['mean_pod_count']:.0f})"),
            ("model: entries' slab memory (measured at the peak, less the start)",
             f"{r['predicted_entry_bytes'] / 1024:.0f} KiB"
             + (f" ({r['slab_lab_bytes_peak'] / 1024:.0f} KiB)" if r.get("slab_lab_bytes_peak") is not None
                else "")),
        ]
    return pd.DataFrame(rows, columns=["measured", "value"]).set_index("measured")
