"""The batch: every iteration's notebook, then the summary, into one replay run's folder.

For each iteration the driver makes ``iteration-<N>/``, runs
``notebooks/iteration.ipynb`` there with papermill, and then, however the
notebook ended, tears that notebook's testbed down and reads the global
sysctls back.  A failed notebook (a cell raised, the kernel died, a cell ran
past its deadline) is recorded as failed and the batch goes on.  The driver
writes only into the folder of the notebook it is running; ``--resume`` skips
what completed and moves an earlier failed attempt aside
(``iteration-<N>.attempt-<K>``) instead of writing over it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from labkit import background
from labkit.exceptions import ReplayError
from labkit.replay import guard
from labkit.replay import index as index_page
from labkit.replay.kernel import KERNEL_NAME, ensure_kernel
from labkit.replay.manifest import Manifest, machine_environment, now, read_sysctls
from labkit.replay.notebook import Outcome, execute, render_html
from labkit.scenario import load_scenario
from labkit.util import writable_dir
from labkit.prepare import build_testbed
from labkit.results import (ROW_FILE, SUMMARY_FILE, iteration_dir, read_json, replay_run_dir, results_root,
                            summary_frame, write_csv)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
ITERATION_NOTEBOOK = NOTEBOOKS / "iteration.ipynb"
START_HERE_NOTEBOOK = NOTEBOOKS / "00-start-here.ipynb"
START_HERE_HTML = "start-here.html"  # the reports' "New here?" link, rendered into the run folder
SUMMARY_NOTEBOOK = NOTEBOOKS / "summary.ipynb"

# (run_id, iteration) -> None: brings that notebook's testbed down, restores sysctls.
Teardown = Callable[[str, int], None]
# One line of progress for a person watching (the CLI prints it).
Report = Callable[[str], None]


@dataclass
class ReplayOptions:
    """What to replay and where.

    Attributes:
        profile: scenario profile (``article``, ``lab``, ``quick``).
        iterations: the iteration numbers, in the order to run them.
        out: the replay run's folder; ``results/<run-id>`` when None (see
            :func:`labkit.results.replay_run_dir`).
        resume: continue the run in ``out`` (or the newest run of this profile).
        testbed: testbed backend name passed to the notebooks.
        on: the machine the netns testbed runs on (``--on``: ``vagrant:lab``, an inventory
            host, ``[user@]host[:port]``), passed to the notebooks; None: this one.
        kernel: Jupyter kernel name; registered for this Python when missing.
        cell_timeout: seconds one cell may run; None lets the notebook decide nothing
            (no deadline).
        notebook, summary_notebook: the notebooks (summary None to skip it).
        parameters: extra parameters for every iteration notebook.
        teardown: the testbed teardown after each iteration notebook; None uses the
            teardown of the replay run's testbed (:meth:`labkit.testbed.base.Testbed.teardown`
            of the testbed :func:`labkit.prepare.build_testbed` builds for the notebooks).
        report: receives one line per step; None stays silent.
        progress_bar: papermill's per-cell bar (for a terminal).
        show_code: keep code cells in the HTML reports.
        recalibrate: for the ``lab`` profile on a netns testbed (on this machine or another), check
            the testbed's machine before the first iteration and derive its own profile when it differs
            (:mod:`labkit.adapt`); False keeps the committed profile as it is.
    """

    profile: str = "lab"
    iterations: list[int] = field(default_factory=lambda: list(range(1, 10)))
    out: Path | None = None
    resume: bool = False
    testbed: str = "netns"
    on: str | None = None
    kernel: str = KERNEL_NAME
    cell_timeout: float | None = None
    notebook: Path = ITERATION_NOTEBOOK
    summary_notebook: Path | None = SUMMARY_NOTEBOOK
    parameters: dict[str, Any] = field(default_factory=dict)
    teardown: Teardown | None = None
    report: Report | None = None
    progress_bar: bool = False
    show_code: bool = False
    recalibrate: bool = True


def new_replay_run_id(profile: str) -> str:
    """A replay run's id, which sorts by time: ``YYYYmmdd-HHMMSS-<profile>``."""
    return f"{dt.datetime.now():%Y%m%d-%H%M%S}-{profile}"


def latest_run(results: Path, profile: str) -> Path | None:
    """The newest replay run's folder of ``profile`` under ``results`` (None when there is none)."""
    runs = sorted(p for p in results.glob(f"*-{profile}") if (p / "manifest.json").exists())
    return runs[-1] if runs else None


LAST_ITERATION = 12  # 1-9 the article's, 10-12 past it


def parse_iterations(text: str) -> list[int]:
    """Parse ``1-9``, ``2,5,7``, ``1-3,8`` or ``all`` (1-12) into iteration numbers, in order.

    Raises:
        ReplayError: a part is not a number or a range of numbers 1..12, a range
            runs backwards, or an iteration is named twice.
    """
    out: list[int] = []
    if text.strip().lower() == "all":
        text = f"1-{LAST_ITERATION}"
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            numbers = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ReplayError(f"--iterations {text!r}: {part!r} is not N or N-M") from None
        if not numbers:
            raise ReplayError(f"--iterations {text!r}: {part!r} runs backwards; write {hi}-{lo}")
        if numbers.start < 1 or numbers.stop > LAST_ITERATION + 1:
            raise ReplayError(f"--iterations {text!r}: {part!r} is outside 1-{LAST_ITERATION}")
        twice = [n for n in numbers if n in out]
        if twice:
            raise ReplayError(f"--iterations {text!r}: iteration {twice[0]} is named twice")
        out += list(numbers)
    if not out:
        raise ReplayError(f"--iterations {text!r}: no iteration named")
    return out


def _say(options: ReplayOptions, line: str) -> None:
    log.info("%s", line)
    if options.report:
        options.report(line)


def _prepare_run_dir(options: ReplayOptions) -> tuple[Path, Manifest]:
    if options.resume:
        run_dir = options.out or latest_run(results_root(), options.profile)
        if run_dir is None or not (Path(run_dir) / "manifest.json").exists():
            raise ReplayError(f"--resume: no run to resume in {run_dir or results_root()} "
                              f"(no manifest.json of a {options.profile} run)")
        manifest = Manifest.load(run_dir)
        if manifest.data["profile"] != options.profile:
            raise ReplayError(f"--resume: {run_dir} is a {manifest.data['profile']} run, "
                              f"not {options.profile}")
        manifest.data["resumed"].append(now())
        manifest.data["status"] = "running"
        manifest.save()
        return Path(run_dir), manifest
    run_id = new_replay_run_id(options.profile)
    run_dir = Path(options.out) if options.out else replay_run_dir(run_id)
    if run_dir.exists() and not run_dir.is_dir():
        raise ReplayError(f"--out {run_dir}: is a file, not a folder")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ReplayError(f"{run_dir} already holds a run; use --resume to continue it, "
                          "or another --out")
    try:
        writable_dir(run_dir, "--out")
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    manifest = Manifest.create(run_dir, run_id=_run_id_for(run_dir, generated=not options.out),
                               profile=options.profile,
                               testbed=options.testbed, iterations=options.iterations,
                               kernel=options.kernel, on=options.on, sysctls=_sysctls(options),
                               testbed_machine=machine_environment(_machine(options)) if options.on else None)
    return run_dir, manifest


def _run_id_for(run_dir: Path, *, generated: bool) -> str:
    """The run's id: its folder's name, made unique for a folder the user named.

    The id keys the replay run's state folder (``replay-<run-id>/``): two replays whose
    ``--out`` folders share a name (``a/run`` and ``b/run``) must not share it, or each
    would tear down the other's testbeds and kernels.
    """
    if generated:
        return run_dir.name
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]
    return f"{run_dir.name}-{digest}"


def _set_aside(folder: Path) -> Path:
    """Move an earlier attempt's folder to ``<folder>.attempt-<K>`` (never over anything)."""
    k = 1
    while (target := folder.with_name(f"{folder.name}.attempt-{k}")).exists():
        k += 1
    folder.rename(target)
    return target


def _completed(manifest: Manifest, run_dir: Path, number: int) -> bool:
    entry = manifest.entry(number)
    return bool(entry and entry.get("status") == "ok"
                and (iteration_dir(run_dir, number) / "iteration.ipynb").exists())


def _testbed(options: ReplayOptions, run_id: str):
    """The replay run's testbed, as :func:`build_testbed` makes it for the notebooks."""
    return build_testbed(options.testbed, run_id, **({"on": options.on} if options.on else {}))


_MACHINES: dict[str, Any] = {}  # --on's machine, resolved once a run (vagrant ssh-config is slow)


def _machine(options: ReplayOptions):
    """The ``--on`` machine's Host (one per replay process)."""
    if options.on not in _MACHINES:
        from labkit.remote.targets import machine_for

        _MACHINES[options.on] = machine_for(options.on)
    return _MACHINES[options.on]


def _sysctls(options: ReplayOptions) -> dict[str, str | None]:
    """The conntrack sysctls of the machine the lab runs on (``--on``'s, else this one's)."""
    if not options.on:
        return read_sysctls()
    return read_sysctls(_machine(options))


def _testbed_teardown(options: ReplayOptions, run_id: str, number: int) -> None:
    """Tear down the testbed the replay run's notebooks use (the one :func:`build_testbed` makes them)."""
    removed = _testbed(options, run_id).teardown()
    if removed:
        log.warning("teardown after iteration %s removed %d leftovers: %s", number, len(removed),
                    "; ".join(removed[:5]))


def run_iteration_notebook(options: ReplayOptions, run_dir: Path, manifest: Manifest,
                           number: int) -> dict[str, Any]:
    """Run one iteration's notebook, tear its testbed down, render it; return its entry."""
    folder = iteration_dir(run_dir, number)
    if folder.exists():
        moved = _set_aside(folder)
        _say(options, f"iteration {number}: earlier attempt kept in {moved.name}")
    folder.mkdir(parents=True)
    run_id = manifest.data["run_id"]
    params = {"iteration": number, "profile": options.profile, "testbed": options.testbed,
              **({"on": options.on} if options.on else {}), "out_dir": str(folder.resolve()), "run_id": run_id,
              "live": False,  # no chart redrawn each second beside a measured load; drawn once at its end
              **options.parameters}
    entry: dict[str, Any] = {"iteration": number, "status": "running", "started": now(),
                             "folder": folder.name, "parameters": params,
                             "sysctls_before": _sysctls(options)}
    manifest.set_entry(number, entry)
    output = folder / "iteration.ipynb"
    outcome: Outcome | None = None
    try:
        with guard.notebook_kernel(run_id, f"iteration-{number}",  # kernel ended before teardown
                                   on_wait=lambda line: _say(options, f"iteration {number}: {line}")) as engine:
            outcome = execute(options.notebook, output, params, kernel=options.kernel,
                              cell_timeout=options.cell_timeout, cwd=folder,
                              progress=options.progress_bar, label=f"iteration {number}",
                              engine_kwargs=engine)
    finally:
        teardown_error = _teardown(options, run_id, number)
        entry["sysctls_after"] = _sysctls(options)
        if outcome is None:  # interrupted: record what is known, then let it propagate
            entry.update(status="interrupted", finished=now())
            manifest.set_entry(number, entry)
    entry.update(status="ok" if outcome.ok else "failed", failure=outcome.kind if not outcome.ok else None,
                 error=outcome.message or None, duration_s=round(outcome.duration_s, 1),
                 finished=now())
    if teardown_error:
        entry.update(status="failed", teardown_error=teardown_error,
                     error=entry["error"] or f"teardown failed: {teardown_error}",
                     failure=entry["failure"] or "teardown")
    entry["sysctls_restored"] = _restored(entry["sysctls_before"], entry["sysctls_after"])
    entry["row"] = _read_row(folder)
    if entry["status"] == "ok" and entry["row"] is None:
        entry.update(status="failed", failure="no-result", error=f"the notebook wrote no {ROW_FILE}")
    entry["html"] = _render(output, folder / "iteration.html", entry, options.show_code)
    entry["files"] = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    manifest.set_entry(number, entry)
    return entry


def _teardown(options: ReplayOptions, run_id: str, number: int) -> str | None:
    try:
        if options.teardown is not None:
            options.teardown(run_id, number)
        else:
            _testbed_teardown(options, run_id, number)
    except Exception as exc:  # recorded in the manifest; the batch goes on with the next one
        log.error("iteration %s: teardown failed: %s", number, exc)
        return f"{type(exc).__name__}: {exc}"
    return None


def _restored(before: dict, after: dict) -> bool:
    return all(after.get(k) == v for k, v in before.items())


def _read_row(folder: Path) -> dict[str, Any] | None:
    path = folder / ROW_FILE
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ReplayError as exc:
        log.error("%s", exc)
        return None


def _render(notebook: Path, html: Path, entry: dict, show_code: bool) -> str | None:
    if not notebook.exists():
        return None
    start_here = html.parent.parent / START_HERE_HTML if html.parent.name.startswith("iteration-") \
        else html.parent / START_HERE_HTML
    links = {START_HERE_NOTEBOOK.name: os.path.relpath(start_here, html.parent)}
    try:
        return render_html(notebook, html, show_code=show_code, links=links).name
    except Exception as exc:  # a report that cannot render is recorded, not fatal
        entry["render_error"] = f"{type(exc).__name__}: {exc}"
        log.error("rendering %s failed: %s", notebook, exc)
        return None


def write_summary(run_dir: Path, manifest: Manifest) -> Path | None:
    """Write ``summary.csv`` from the rows of the completed iterations (None when none)."""
    rows = []
    for key, entry in sorted(manifest.data["iterations"].items(), key=lambda kv: int(kv[0])):
        if entry.get("status") == "ok" and entry.get("row"):
            rows.append(entry["row"])
    if not rows:
        return None
    return write_csv(summary_frame(rows), run_dir / SUMMARY_FILE)


def run_summary_notebook(options: ReplayOptions, run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Run the summary notebook over the run folder; return its manifest entry."""
    output = run_dir / "summary.ipynb"
    if output.exists():
        _set_aside(output)
        html = run_dir / "summary.html"
        if html.exists():
            _set_aside(html)
    params = {"run_dir": str(run_dir.resolve()), "profile": manifest.data.get("profile_used", options.profile)}
    entry: dict[str, Any] = {"status": "running", "started": now(), "parameters": params}
    manifest.data["summary"] = entry
    manifest.save()
    with guard.notebook_kernel(manifest.data["run_id"], "summary") as engine:
        outcome = execute(options.summary_notebook, output, params, kernel=options.kernel,
                          cell_timeout=options.cell_timeout, cwd=run_dir,
                          progress=options.progress_bar, label="summary", engine_kwargs=engine)
    entry.update(status="ok" if outcome.ok else "failed", failure=None if outcome.ok else outcome.kind,
                 error=outcome.message or None, duration_s=round(outcome.duration_s, 1),
                 finished=now())
    entry["html"] = _render(output, run_dir / "summary.html", entry, options.show_code)
    manifest.data["summary"] = entry
    manifest.save()
    return entry


class _Flows:
    """The batch's background flows: one set for the whole replay, a fresh one after a failure.

    Started once, before the first notebook, and warm before its load, on the machine of
    the replay's testbed (see :func:`labkit.run.background_flows`: none on a cluster), in
    the replay's state folder there, where the notebooks' sessions find them and pass them
    to :func:`labkit.run.run_iteration` instead of starting (and waiting for) their own.
    """

    def __init__(self, options: ReplayOptions, manifest: Manifest):
        from labkit.run import background_flows

        self.options, self.manifest = options, manifest
        self.count, self.testbed = 0, None
        self.current: background.BackgroundFlows | None = None
        scenario = load_scenario()
        its = [scenario.iteration(n, options.profile) for n in options.iterations]
        busiest = max(its, key=lambda it: it.background_flows, default=None)
        if busiest is not None and busiest.background_flows:
            self.testbed = _testbed(options, manifest.data["run_id"])
            self.count = background_flows(self.testbed, busiest)

    def ready(self, warm: bool = False) -> None:
        """Have flows running (start them, or new ones after a failure); with ``warm``, wait
        until the garbage collector has taken up their cycle, and say why it waits."""
        if not self.count:
            return
        if self.current is not None:
            error = self.current.error
            if error is not None:
                self.current.stop()
                _say(self.options, f"background flows: starting a fresh set after the failure ({error})")
                self.current = None
        if self.current is None:
            where = self.testbed.node_machine()
            self.current = background.BackgroundFlows(self.count, host=where.host, directory=where.state_dir,
                                                      python=where.python).start()
            log_entry = {"started": now(), "namespaces": self.current.namespaces, "flows": self.count,
                         "machine": where.host.name, "pid": self.current.pid}
            self.manifest.data.setdefault("background_flows", []).append(log_entry)
            self.manifest.save()
        if warm:
            self.current.wait_warm(lambda line: _say(self.options, line))

    def failure(self) -> str | None:
        """Why the current flows stopped (recorded in the manifest once), None while they run."""
        error = self.current.error if self.current is not None else None
        if error is None:
            return None
        entry = self.manifest.data["background_flows"][-1]
        if "failed" not in entry:
            entry.update(failed=now(), error=error)
            self.manifest.save()
        return error

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


def _check_machine(options: ReplayOptions, run_dir: Path, manifest: Manifest, flows: Any = None) -> str:
    """The profile the notebooks get: the lab profile checked (and derived) for the testbed's machine.

    On ``--resume`` the run's recorded choice is kept.  Otherwise, for the ``lab``
    profile on a testbed whose node's machine labkit drives (the netns testbed, on this
    machine or one reached over SSH: that machine is the one measured), one short load
    beside the replay's ``flows`` compares it with the profile's basis; when it differs,
    the derived profile is written to the run folder (``profile-lab.yaml``), recorded in
    the manifest, and used.
    """
    from labkit import adapt
    from labkit.calibrate import write_profile

    if "profile_used" in manifest.data:
        return manifest.data["profile_used"]
    used = options.profile
    run_id = manifest.data["run_id"]
    testbed = _testbed(options, run_id) if options.profile == "lab" else None
    measurable = testbed is not None and testbed.node_machine() is not None
    if measurable and options.recalibrate:
        scenario = load_scenario()
        try:
            result = adapt.check(testbed, scenario, scenario._profile("lab"), on_step=lambda l: _say(options, l),
                                 flows=flows)
        finally:
            error = _teardown(options, run_id, 0)
            if error:
                raise ReplayError(f"machine check: its testbed could not be brought down: {error}")
        manifest.data["calibration"] = result.record()
        if result.profile is not None:
            path = write_profile(result.profile, run_dir / adapt.PROFILE_FILE)
            used = str(path.resolve())
            _say(options, f"machine check: the testbed's machine ({testbed.node_machine().host.name}) differs "
                 "from the lab profile's ("
                 + "; ".join(result.reasons) + f"): using the profile derived for it, {path.name}")
        else:
            _say(options, "machine check: within the calibration's tolerance: the committed lab profile is used")
    elif measurable:
        manifest.data["calibration"] = {"skipped": "--no-recalibrate: the committed lab profile is used as it is"}
    manifest.data["profile_used"] = used
    manifest.save()
    return used


def replay(options: ReplayOptions) -> Path:
    """Run the batch; return the run folder.

    Background flows, when the profile has them, start once; the machine check and the
    plain server of iteration 1 run while the garbage collector takes up their cycle,
    and the first iteration with conntrack in play waits for it if need be.

    Raises:
        ReplayError: the run folder cannot be made or resumed, or the kernel
            cannot be registered.  A notebook that fails does not raise: it is
            recorded in the manifest and the index.
    """
    start = time.monotonic()
    if options.kernel == KERNEL_NAME:
        ensure_kernel(options.kernel)
    run_dir, manifest = _prepare_run_dir(options)
    _say(options, f"run folder {run_dir}")
    # the reports' "New here? Start with ..." link: the start-here notebook, as it reads unrun
    render_html(START_HERE_NOTEBOOK, run_dir / START_HERE_HTML, show_code=True)
    total = len(options.iterations)
    guard.claim(manifest.data["run_id"])  # `labkit clean` leaves a live replay alone
    flows = _Flows(options, manifest)
    try:
        flows.ready()  # the check and a plain server need no warm collector: they run meanwhile
        profile_used = _check_machine(options, run_dir, manifest, flows.current)
        params = {**options.parameters, "profile": profile_used}
        scenario = load_scenario()
        for i, number in enumerate(options.iterations, 1):
            if options.resume and _completed(manifest, run_dir, number):
                _say(options, f"[{i}/{total}] iteration {number}: done earlier, skipped")
                continue
            flows.ready(warm=scenario.iteration(number, profile_used).setup != "plain")
            _say(options, f"[{i}/{total}] iteration {number}: running")
            entry = run_iteration_notebook(dataclasses.replace(options, parameters=params),
                                           run_dir, manifest, number)
            reason = flows.failure()
            if reason is not None and entry.get("status") == "ok":  # the notebook did not see it: it still failed
                entry.update(status="failed", failure="background-flows",
                             error=f"the background flows stopped during the iteration: {reason}")
                manifest.set_entry(number, entry)
            _say(options, f"[{i}/{total}] iteration {number}: {_describe(entry)}")
            write_summary(run_dir, manifest)
            index_page.write(run_dir, manifest)
        if options.summary_notebook is not None:
            _say(options, "summary: running")
            entry = run_summary_notebook(options, run_dir, manifest)
            _say(options, f"summary: {_describe(entry)}")
    except BaseException:
        _mark_interrupted(manifest)
        manifest.data.update(status="interrupted", finished=now())
        manifest.save()
        index_page.write(run_dir, manifest)
        raise
    finally:
        flows.stop()
        guard.release(manifest.data["run_id"])
    entries = [manifest.entry(n) or {} for n in options.iterations]
    failed = [n for n, e in zip(options.iterations, entries) if e.get("status") != "ok"]
    summary_ok = options.summary_notebook is None or (manifest.data.get("summary") or {}).get("status") == "ok"
    elapsed = round(time.monotonic() - start, 1)
    if options.resume:  # the sessions before this one count too
        elapsed += manifest.data.get("duration_s") or 0
    manifest.data.update(
        status="complete" if not failed and summary_ok else "failed",
        failed_iterations=failed, finished=now(), duration_s=elapsed,
        sysctls={**manifest.data["sysctls"], "after": _sysctls(options)},
    )
    manifest.save()
    index_page.write(run_dir, manifest)
    _say(options, f"{manifest.data['status']}: {run_dir / 'index.html'}")
    return run_dir


def _mark_interrupted(manifest: Manifest) -> None:
    """Record every notebook still marked running as interrupted (a signal came mid-way)."""
    for entry in [*manifest.data["iterations"].values(), manifest.data.get("summary") or {}]:
        if entry.get("status") == "running":
            entry.update(status="interrupted", finished=now())


def _describe(entry: dict[str, Any]) -> str:
    took = f"{entry.get('duration_s', 0):.0f} s"
    if entry.get("status") != "ok":
        return f"FAILED ({entry.get('failure')}: {entry.get('error')}) after {took}"
    row = entry.get("row") or {}
    tps = row.get("transfers_per_s")
    return f"ok in {took}" + (f", {tps:.0f} transfers/s" if isinstance(tps, (int, float)) else "")

