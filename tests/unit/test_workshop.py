"""Workshop mode without root: command display and parsers, the live chart, predict-then-check,
the sandbox's checks, the testbed picture and the ``labkit notebook`` command line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

from labkit import commands, jupyter, live, workshop
from labkit.exceptions import LabkitError, PodRejected, ScenarioError, TestbedError
from labkit.host import LocalHost, Result
from labkit.monitor.parse import KernelEvent
from labkit.scenario import load_scenario

DATA = Path(__file__).resolve().parents[1] / "data"


# --- the article's commands ---------------------------------------------------------------

def test_conntrack_S_becomes_a_table_per_cpu_with_a_total():
    frame = commands.conntrack_S_table((DATA / "conntrack_S_pressure.txt").read_text())
    assert list(frame.index[:2]) == [0, 1] and frame.index[-1] == "total"
    assert frame.loc[1, "drop"] == 8143 and frame.loc[1, "early_drop"] == 266
    assert frame.loc["total", "drop"] == frame.drop(index="total")["drop"].sum()


def test_expectation_list_tail_reads_the_count_of_the_last_line():
    assert commands.expect_list_tail("conntrack v1.4.4 (conntrack-tools): 1024 expectations have been shown.\n") == 1024
    assert commands.expect_list_tail("conntrack v1.4.7 (conntrack-tools): 0 expectations have been shown.") == 0
    assert commands.expect_list_tail("nothing") is None


def test_sysctl_w_lines_run_the_globals_in_the_machines_namespace_and_timeouts_on_the_node():
    lines = commands.sysctl_commands({"net.netfilter.nf_conntrack_udp_timeout": 10,
                                      "net.netfilter.nf_conntrack_max": 524288,
                                      "net.netfilter.nf_conntrack_expect_max": 8192})
    assert lines == [("init", "sysctl -w net.netfilter.nf_conntrack_expect_max=8192"),
                     ("init", "sysctl -w net.netfilter.nf_conntrack_max=524288"),
                     ("node", "sysctl -w net.netfilter.nf_conntrack_udp_timeout=10")]


class _Bed:
    """A testbed whose every role is this machine (commands that need no root)."""

    def host(self, role):
        return LocalHost(role)


def test_sh_runs_for_real_and_shows_the_prompt_command_and_output():
    shown = commands.sh(_Bed(), "node", "echo 131072")
    assert shown.ok and shown.value() == 131072
    page = shown._repr_html_()
    assert "[node]# echo 131072" in page and "131072" in page.split("</b>", 1)[1]
    assert repr(shown).splitlines() == ["[node]# echo 131072", "131072"]


def test_sh_shows_a_failed_command_with_its_stderr_and_exit_code_instead_of_raising():
    shown = commands.sh(_Bed(), "node", "echo 'sysctl: permission denied' >&2; exit 255")
    assert not shown.ok
    assert "permission denied" in shown._repr_html_() and "(exit code 255)" in shown._repr_html_()


def test_sh_parses_conntrack_S_output_into_a_table():
    text = (DATA / "conntrack_S_pressure.txt").read_text()
    result = Result("conntrack -S", "node", 0, text, "", 0.01)
    bed = SimpleNamespace(host=lambda role: SimpleNamespace(run=lambda *a, **k: result))
    shown = commands.sh(bed, "node", "conntrack -S")
    assert shown.table is not None and shown.table.loc["total", "drop"] >= 8143
    assert "<table" in shown._repr_html_()


def test_the_kubelet_refuses_the_pod_timeouts_unless_allowlisted():
    sc = load_scenario()
    eight, two = sc.iteration(8, "quick"), sc.iteration(2, "quick")
    panel = commands.kubelet_admission(eight, eight)
    text = repr(panel)
    assert "nf_conntrack_udp_timeout" in text and "admitted (2 sysctl(s)" in text
    assert "SysctlForbidden" in text  # the same pod on a kubelet without the allowlist
    panel = commands.kubelet_admission(two, eight)
    assert panel.blocks[-1][2] is True and "SysctlForbidden" in panel.blocks[-1][1]


# --- the live chart -----------------------------------------------------------------------

class FakeMonitor:
    """Ticks like the Monitor's: the node fills, drops rise, a log line appears."""

    def __init__(self):
        self.t = time.time()
        self.n = 0
        self.events = []

    def latest(self):
        self.n += 1
        now = self.t + self.n
        values = {"nf_conntrack_count": min(1000, 300 * self.n), "nf_conntrack_max": 1000,
                  "stat_drop": 50 * self.n * self.n, "stat_early_drop": 5 * self.n}
        if self.n == 3:
            self.events.append(("local", now, KernelEvent("table_full", "nf_conntrack: table full", 1)))
        return {("local", "node"): (now, values), ("local", "pod-1"): (now, {**values, "stat_drop": 0}),
                ("local", "init"): (now, values)}

    def new_events(self, since=0):
        return self.events[since:]


def test_live_chart_series_follow_the_monitor_and_the_load():
    chart = live.LiveChart("it", interval=0.05, show=False)
    chart.begin()
    monitor = FakeMonitor()
    chart.start(monitor)
    for k in range(4):
        chart.progress({"elapsed_s": float(k), "ok": 100 * k, "failed": 3 * k})
    time.sleep(0.3)
    chart.stop()
    s = chart.series
    assert set(s.counts) == {"node", "pod-1"}  # the machine's own namespace is not the lab's
    assert s.counts["node"][-1][1] == 1000 and s.maxima[-1][1] == 1000
    assert max(v for _t, v in s.drops["node"]) > 0 and all(v == 0 for _t, v in s.drops["pod-1"])
    assert [round(ok) for _t, ok, _f in s.transfers] == [100, 100, 100]
    assert [k for _t, k in s.marks] == ["table_full"]
    assert chart.redraws >= 3 and chart.status == "done"


def test_live_chart_places_transfers_where_the_load_had_them_not_where_the_lines_arrived():
    chart = live.LiveChart("it", interval=10, show=False)
    chart.start(FakeMonitor())
    t0 = chart._t0
    # the feed's lines all come now, in one batch, though the load wrote them at 0.5, 1.5 and 2.5 s
    for k in range(3):
        chart.progress({"elapsed_s": 0.5 + k, "ok": 100 * k, "failed": 0, "at": t0 + 0.5 + k})
    chart.stop()
    assert [round(t, 1) for t, _ok, _f in chart.series.transfers] == [1.5, 2.5]
    late = live.LiveChart("it", interval=10, show=False)  # a line without its time: placed on arrival
    late.start(FakeMonitor())
    late.progress({"elapsed_s": 3.0, "ok": 0, "failed": 0})
    late.progress({"elapsed_s": 4.0, "ok": 50, "failed": 0})
    late.stop()
    assert late.series.transfers[0][0] == pytest.approx(1.0, abs=0.2)  # arrived at 0 s as its second 3


def test_live_chart_keeps_its_beat_when_a_drawing_is_slow(monkeypatch):
    chart = live.LiveChart("it", interval=0.2, show=False)
    monkeypatch.setattr(chart, "_redraw", lambda: time.sleep(0.12))
    monitor = FakeMonitor()
    chart.start(monitor)
    time.sleep(1.05)
    chart._stop.set()
    chart._thread.join(2)
    # five beats of 0.2 s in 1.05 s; drawing after each (0.12 s) must not stretch them to 0.32 s (three)
    assert monitor.n >= 1 + 4, monitor.n


def test_live_chart_draws_counts_drops_transfers_and_log_marks():
    s = live.Series(counts={"node": [(0, 10), (1, 900)], "pod-1": [(0, 5), (1, 400)]},
                    maxima=[(1, 1000)], drops={"node": [(1, 120.0)]}, early_drops={"node": [(1, 12.0)]},
                    transfers=[(1, 80.0, 2.0)], marks=[(1.2, "table_full"), (1.5, "expect_table_full")])
    fig = live.draw(s, title="Iteration 2: live", status="load", span=20)
    top, middle, bottom = fig.axes
    assert [t.get_text() for t in top.get_legend().get_texts()] == \
        ["node count", "pod-1 count", "nf_conntrack_max = 1,000"]
    assert [t.get_text() for t in middle.get_legend().get_texts()] == ["node drops/s", "node early drops/s"]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == \
        ["transfers/s (verified)", "failed/s", "kernel: table full (1)", "kernel: expectation table full (1)"]
    assert bottom.get_xlim()[1] >= 20
    empty = live.draw(live.Series())
    assert "waiting for the first sample ..." in [t.get_text() for t in empty.axes[0].texts]


def test_live_chart_png_changes_as_the_load_goes_on():
    chart = live.LiveChart("it", show=False)
    chart.series.counts["node"] = [(0, 10)]
    first = chart.png()
    chart.series.counts["node"].append((5, 800))
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and chart.png() != first


def test_batch_mode_samples_but_draws_only_at_the_end():
    chart = live.LiveChart("it", interval=0.02, show=False, live=False)
    chart.begin()
    chart.start(FakeMonitor())
    time.sleep(0.2)
    assert chart.redraws == 0 and chart.series.points > 2
    chart.stop()
    assert chart.redraws == 1


# --- predict, then check ----------------------------------------------------------------------

def _row(number, tps, **extra):
    base = {"iteration": number, "transfers_per_s": tps, "article_transfers_per_s": 1000, "profile": "quick",
            "node_drops": 0, "node_early_drops": 0, "pod_drops": 0, "pod_early_drops": 0,
            "table_full_logs": 0, "expect_full_logs": 0, "replicas": 1, "status": "ok",
            "conntrack_max": 1024, "peak_node_count": 0, "peak_pod_count": 0}
    return {**base, **extra}


def test_check_uses_the_participants_own_numbers_and_names_where_the_others_came_from(tmp_path):
    own = tmp_path / "iteration-2"
    own.mkdir()
    (own / "summary-row.json").write_text(json.dumps(_row(2, 50, node_drops=900)))
    table = workshop.check(2, own, "less")
    assert table.loc["your prediction", "value"] == "less"
    assert table.loc["what happened (your numbers)", "value"] == "less"  # 50/s against the reference's it.1
    assert table.loc["finding F1", "value"].startswith("iteration 2 serves at most 0.6x")
    assert table.loc["on your data", "value"] == "pass" and "it.2 50/s" in table.loc["evidence (yours)", "value"]
    assert table.loc["reference run", "value"].startswith("pass: it.2")
    assert "it.1: reference run" in table.loc["other iterations taken from", "value"]
    evidence = table.loc["evidence (yours)", "value"]
    assert len(evidence) > 50 and evidence in table._repr_html_()  # shown whole, not cut to 50 characters
    # a run of iteration 1 of the same profile next to it is taken instead of the reference's
    one = tmp_path / "iteration-1"
    one.mkdir()
    (one / "summary-row.json").write_text(json.dumps(_row(1, 55)))
    table = workshop.check(2, own, "less")
    assert table.loc["what happened (your numbers)", "value"] == "same"
    assert table.loc["on your data", "value"] == "fail"
    assert "it.1: your run" in table.loc["other iterations taken from", "value"]


def test_what_happened_answers_each_question_from_the_rows():
    rows = {4: pd.Series(_row(4, 50, node_count_at_stop=900, node_count_after_stop=880)),
            7: pd.Series(_row(7, 200, peak_node_count=300, peak_pod_count=1024)),
            8: pd.Series(_row(8, 330)), 1: pd.Series(_row(1, 321.4))}
    assert workshop.what_happened(4, rows) == "stays"
    assert workshop.what_happened(7, rows) == "pod full"
    assert workshop.what_happened(8, rows) == "more"
    assert workshop.what_happened(1, rows) == "321"


def test_every_iteration_has_a_question():
    for n in range(1, 10):
        assert "Predict" in workshop.question(n).data and len(workshop.question(n).data) > 80


# --- the testbed picture ---------------------------------------------------------------------

def test_testbed_picture_shows_what_status_says():
    status = {"testbed": "netns", "state": "up", "run_id": "ab12", "iteration": 9, "profile": "quick",
              "service": {"node_ip": "10.69.0.1", "node_port": 30069},
              "node_sysctls": {"net.netfilter.nf_conntrack_max": 4096},
              "hosts": [{"role": "client", "name": "client", "ip": "10.69.0.2"},
                        {"role": "node", "name": "node", "ip": "10.69.0.1"},
                        {"role": "pod", "name": "pod-1", "ip": "10.244.0.2", "cpu_limit": 0.35,
                         "sysctls": {"net.netfilter.nf_conntrack_udp_timeout": 10}},
                        {"role": "pod", "name": "pod-2", "ip": "10.244.0.3", "cpu_limit": 0.35, "sysctls": {}}]}
    fig = workshop.testbed_picture(status)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts) + " ".join(t.get_text() for t in fig.texts)
    for word in ("client", "node", "pod-1", "pod-2", "10.244.0.3", "NodePort 10.69.0.1:30069/udp",
                 "nf_conntrack_max=4096", "nf_conntrack_udp_timeout=10", "iteration 9"):
        assert word in texts
    down = workshop.testbed_picture({"testbed": "netns", "state": "down", "hosts": []})
    assert "The testbed is down" in down.axes[0].texts[0].get_text()


# --- the sandbox's checks (nothing changes on a refusal) ---------------------------------------

def _sandbox():
    from labkit.sandbox import Sandbox

    return Sandbox("quick")


@pytest.mark.parametrize("field,value", [("conntrack_max", -5), ("expect_max", 0), ("replicas", 0),
                                         ("pod_udp_timeout", -1), ("duration", 2.5), ("replicas", True)])
def test_sandbox_refuses_a_bad_number_naming_the_parameter(field, value):
    sb = _sandbox()
    values = {**sb.defaults(), field: value}
    with pytest.raises(ScenarioError) as info:
        sb.iteration(**values)
    assert f"field {field}" in str(info.value) or field in str(info.value)
    assert repr(value) in str(info.value)


def test_sandbox_values_become_an_iteration():
    sb = _sandbox()
    it = sb.iteration(**{**sb.defaults(), "replicas": 3, "pod_udp_timeout": None, "pod_udp_timeout_stream": None,
                         "allow_unsafe_sysctls": False, "cpu_per_pod": None, "duration": 5})
    assert (it.replicas, it.cpu_limit, it.duration_s, it.allowed_unsafe_sysctls) == (3, None, 5.0, ())
    assert dict(it.pod_sysctls) == {} and it.node_sysctls["net.netfilter.nf_conntrack_max"] == 4096


def test_sandbox_attempt_shows_the_refusal_and_the_testbed_as_it_is(monkeypatch, tmp_path):
    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path))
    sb = _sandbox()
    panel = sb.attempt(**{**sb.defaults(), "conntrack_max": -5})
    (title, text, refused), (_, state, _) = panel.blocks
    assert refused and "refused before anything changed (ScenarioError)" == title
    assert "conntrack_max" in text and "-5" in text and state == "down"
    panel = sb.attempt(**{**sb.defaults(), "allow_unsafe_sysctls": False})
    assert "SysctlForbidden" in panel.blocks[0][1] and "PodRejected" in panel.blocks[0][0]


def test_check_max_names_the_namespace_that_tracks_more():
    from labkit.sysctls import check_max

    host = SimpleNamespace(read_sysctl=lambda name: "731")
    with pytest.raises(TestbedError, match="already tracks 731 connections in the testbed's node namespace"):
        check_max(host, 100, "in the testbed's node namespace")
    check_max(host, 731)


# --- errors in a notebook, labkit notebook -------------------------------------------------------

def test_readable_errors_is_a_no_op_outside_ipython():
    assert workshop.readable_errors() is False


def test_readable_errors_shows_a_labkit_error_as_the_cells_error_in_one_line():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shown = []  # what a kernel sends as the cell's error output (papermill reads name and message)
        shell._showtraceback = lambda etype, value, stb: shown.append((etype.__name__, str(value), stb))
        assert workshop.readable_errors() is True
        result = shell.run_cell("from labkit.exceptions import TestbedError\n"
                                "raise TestbedError('the testbed is not up')")
        assert not result.success and type(result.error_in_exec).__name__ == "TestbedError"
        assert shown == [("TestbedError", "the testbed is not up",
                          ["\x1b[31mTestbedError\x1b[0m: the testbed is not up"])]
        shell.run_cell("1/0")  # other errors keep their traceback
        assert shown[-1][0] == "ZeroDivisionError" and len(shown[-1][2]) > 1
    finally:
        InteractiveShell.clear_instance()


def test_notebook_command_listens_on_loopback_with_a_token_and_labkits_kernel():
    argv = jupyter.command(8890, "sekrit", root=False)
    assert "--ServerApp.ip=127.0.0.1" in argv and "--ServerApp.port=8890" in argv
    assert "--IdentityProvider.token=sekrit" in argv
    assert "--MappingKernelManager.default_kernel_name=labkit" in argv
    assert "--allow-root" not in argv and "--allow-root" in jupyter.command(8890, "x", root=True)
    # no "fetch news?" pop-up over the notebook: the lab's settings answer it
    settings = Path(next(a for a in argv if a.startswith("--LabApp.app_settings_dir=")).split("=", 1)[1])
    overrides = json.loads((settings / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


def test_notebook_command_refuses_without_the_kernel(tmp_path):
    with pytest.raises(LabkitError, match="kernel 'labkit' is not registered"):
        jupyter.kernel_spec(tmp_path)


def test_free_port_skips_a_port_in_use():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert jupyter.free_port(busy, tries=5) != busy


def test_the_notebooks_stay_thin():
    """One parameters cell each; code cells are short calls: no def, class or loops."""
    import nbformat

    for name in ("iteration.ipynb", "00-start-here.ipynb", "sandbox.ipynb"):
        nb = nbformat.read(Path(__file__).resolve().parents[2] / "notebooks" / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, name
        for cell in code:
            assert not any(line.lstrip().startswith(("def ", "class ", "for ", "while "))
                           for line in cell.source.splitlines()), (name, cell.source)
            assert len(cell.source.splitlines()) <= 14, (name, cell.source)


# --- background flows start with the testbed, so the load step need not wait for them -------

class FakeFlows:
    made: list = []

    def __init__(self, flows, **where):
        self.flows, self.where, self.started, self.warm_s, self.stopped = flows, where, time.time(), 61.0, False
        self.failed_with = None
        FakeFlows.made.append(self)

    def start(self):
        return self

    @property
    def info(self):
        return None if self.stopped or self.failed_with else {"warm_at": self.started + self.warm_s}

    def stop(self):
        self.stopped = True


class UpTestbed:
    name = "netns"
    is_local = True

    def __init__(self):
        self.ups, self.downs = 0, 0

    def node_machine(self):  # the flows run on the testbed's machine
        from labkit.host import LocalHost
        from labkit.testbed.base import NodeMachine

        return NodeMachine(LocalHost("init"), "/run/labkit-test-state", "python-there")

    def up(self, iteration):
        self.ups += 1

    def down(self):
        self.downs += 1

    def status(self):
        return {"run_id": "ab12", "state": "up", "iteration": 2, "service": {"node_ip": "10.69.0.1", "node_port": 30069},
                "hosts": [{"role": "pod", "name": "pod-1"}]}


def _session(monkeypatch, run_id=None, found=None):
    from labkit import background, prepare
    from labkit.session import IterationSession

    FakeFlows.made = []
    monkeypatch.setattr(background, "BackgroundFlows", FakeFlows)
    monkeypatch.setattr(background, "find", lambda directory, host=None: found)
    monkeypatch.setattr(prepare, "build_testbed", lambda *a, **kw: UpTestbed())
    session = IterationSession(2, "lab", run_id=run_id)
    assert session.iteration.background_flows > 0  # the lab profile runs them
    return session


def test_up_starts_the_background_flows_so_they_warm_while_the_participant_reads(monkeypatch):
    session = _session(monkeypatch)
    text = session.up().data
    assert len(FakeFlows.made) == 1 and FakeFlows.made[0].flows == session.iteration.background_flows
    assert FakeFlows.made[0].where["directory"] == "/run/labkit-test-state"  # on the testbed's machine
    assert FakeFlows.made[0].where["python"] == "python-there"
    assert "background flows" in text and ("within 61 s" in text or "within 60 s" in text)
    assert session.flows_in_use() is FakeFlows.made[0]  # the run step uses these, not new ones
    session.down()
    assert FakeFlows.made[0].stopped and session.testbed.downs == 1


def test_up_keeps_its_own_flows_replaces_failed_ones_and_a_replay_leaves_them_to_its_driver(monkeypatch):
    session = _session(monkeypatch)
    session.up()
    session.up()  # the next iteration's up: the same flows
    assert len(FakeFlows.made) == 1
    FakeFlows.made[0].failed_with = "OSError: injected"
    session.up()  # they failed: fresh ones
    assert len(FakeFlows.made) == 2 and FakeFlows.made[0].stopped and session.flows_in_use() is FakeFlows.made[1]
    session.down()
    replay = _session(monkeypatch, run_id="20261201-lab-x", found="/run/labkit/replay-x/netns-bg-abcde")
    assert "background" not in replay.up().data and FakeFlows.made == []
    assert replay.flows_in_use() == "/run/labkit/replay-x/netns-bg-abcde"  # the replay's, found in its folder


def test_sandbox_widgets_show_a_bad_value_refused_in_their_output(monkeypatch, tmp_path):
    pytest.importorskip("ipywidgets")
    import IPython.display

    monkeypatch.setenv("LABKIT_STATE_DIR", str(tmp_path))
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    sb = _sandbox()
    box = sb.widgets(**sb.defaults())
    field = next(c for c in box.children if getattr(c, "description", "") == "nf_conntrack_max")
    field.value = -5
    next(c for c in box.children if getattr(c, "description", "") == "run the load").click()
    (title, text, refused), (_, state, _) = shown[-1].blocks
    assert refused and title == "refused before anything changed (ScenarioError)"
    assert "conntrack_max" in text and "-5" in text and state == "down"
