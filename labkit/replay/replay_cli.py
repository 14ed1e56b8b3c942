"""``labkit run``, ``labkit replay`` and ``labkit calibrate``: the replay's commands.

Only this module prints; the work is in :mod:`labkit.run`,
:mod:`labkit.replay.driver` and :mod:`labkit.calibrate`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PROFILE = "lab"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run``, ``replay`` and ``calibrate`` sub-commands."""
    p = sub.add_parser("run", help="run one iteration end to end and write its tidy data",
                       description="Bring the testbed up for iteration N, start the monitor, run the load "
                                   "from the client namespace, sample the cool-down, write samples.csv, "
                                   "events.csv, transfers.csv and the summary row; then bring it down.")
    p.add_argument("--iteration", "-i", type=int, required=True, help="iteration number, 1-12")
    _profile_and_testbed(p)
    p.add_argument("--out", type=Path, help="the iteration's folder (default results/run-<profile>/iteration-N; "
                   "$LABKIT_RESULTS_DIR instead of results/ when set)")
    p.add_argument("--duration", type=float, help="load duration in seconds (default: the profile's)")
    p.add_argument("--cooldown", type=float, help="sampled cool-down in seconds (default: the profile's)")
    p.add_argument("--keep-up", action="store_true", help="leave the testbed up afterwards")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="run the nine iteration notebooks and the summary; HTML reports",
                       description="papermill runs notebooks/iteration.ipynb per iteration and "
                                   "notebooks/summary.ipynb into results/<run-id>/, nbconvert renders "
                                   "self-contained HTML, index.html links them all.")
    _profile_and_testbed(p)
    p.add_argument("--iterations", default="1-9", help="which iterations, e.g. 1-9, 2,5,7, or 1-12 / all to add the three "
                        "past the article (default 1-9)")
    p.add_argument("--out", type=Path, help="the run folder (default results/<run-id>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (or the newest run of this profile): skip what completed")
    p.add_argument("--cell-timeout", type=_positive_seconds, default=None,
                   help="seconds one notebook cell may run before the iteration fails as a timeout "
                        "(default: the load duration plus 5 minutes)")
    p.add_argument("--show-code", action="store_true", help="keep the code cells in the HTML reports")
    p.add_argument("--compress", action="store_true", help="write the data tables as *.csv.gz")
    p.add_argument("--no-recalibrate", dest="recalibrate", action="store_false",
                   help="lab profile: use the committed values as they are, without first checking that this "
                        "machine matches the one they were derived on")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("calibrate", help="measure this machine and kernel; derive the lab profile",
                       description="Measure one pod's capacity and the kernel's conntrack entry lifetime "
                                   "per transfer on the netns testbed, and derive the lab profile's table "
                                   "sizes from the article's (printed beside them, and written as a profile file).")
    p.add_argument("--cpu-limit", type=float, default=0.35, help="CPU cores per pod (default 0.35)")
    p.add_argument("--out", type=Path, help="profile file to write (default results/calibration.yaml; "
                   "$LABKIT_RESULTS_DIR instead of results/ when set); use it with --profile")
    p.add_argument("--quick", action="store_true", help="shorter loads (rougher numbers)")
    p.set_defaults(func=cmd_calibrate)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _profile_and_testbed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="article | lab | quick | a profile file (default lab)")
    p.add_argument("--testbed", default="netns", help="testbed backend (default netns)")
    p.add_argument("--on", metavar="MACHINE", help="run the netns testbed on another Linux machine over SSH: "
                   "vagrant:NAME (e.g. vagrant:lab), a host of $LABKIT_INVENTORY, or [user@]host[:port]")


def _step(line: str) -> None:
    print(line, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    """``labkit run --iteration N``: one iteration run, prepared as a notebook's is (:func:`labkit.prepare.prepare`)."""
    from labkit.prepare import prepare
    from labkit.results import single_iteration_dir
    from labkit.run import run_iteration

    out = args.out or single_iteration_dir("run", Path(str(args.profile)).stem, args.iteration)
    prepared = prepare(args.iteration, args.profile, args.testbed, out, duration=args.duration,
                       cooldown=args.cooldown, testbed_options={"on": args.on} if args.on else None)
    try:
        row = run_iteration(prepared.testbed, prepared.iteration, prepared.out_dir, on_step=_step,
                            calibration=prepared.calibration)
    finally:
        if not args.keep_up:
            prepared.testbed.down()
    print(f"iteration {row['iteration']}: {row['transfers_per_s']:.0f} transfers/s "
          f"(article {row['article_transfers_per_s']}), {row['transfers_failed']} failed; node peak "
          f"{row['peak_node_count']} of {row['conntrack_max']}, drops node {row['node_drops']} / pods "
          f"{row['pod_drops']}, early drops node {row['node_early_drops']} / pods {row['pod_early_drops']}")
    print(f"data in {prepared.out_dir}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``labkit replay``."""
    from labkit.replay.driver import ReplayOptions, parse_iterations, replay

    tty = sys.stderr.isatty()
    options = ReplayOptions(profile=args.profile, iterations=parse_iterations(args.iterations),
                            out=args.out, resume=args.resume, testbed=args.testbed, on=args.on,
                            cell_timeout=args.cell_timeout, report=_step, progress_bar=tty,
                            show_code=args.show_code, recalibrate=args.recalibrate,
                            parameters={"compress": True} if args.compress else {})
    if options.cell_timeout is None:
        options.cell_timeout = default_cell_timeout(args.profile)
    run_dir = replay(options)
    from labkit.replay.manifest import Manifest

    manifest = Manifest.load(run_dir).data
    print(f"replay {manifest['status']}: {run_dir.resolve() / 'index.html'}")
    return 0 if manifest["status"] == "complete" else 1


def default_cell_timeout(profile: str) -> float:
    """A cell may run the profile's longest load and cool-down plus five minutes."""
    from labkit.scenario import load_scenario

    its = load_scenario().iterations(profile)
    return max(it.duration_s + it.cooldown_s for it in its) + 300.0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``labkit calibrate``."""
    from labkit.calibrate import calibrate, comparison, write_profile

    profile = calibrate(cpu_limit=args.cpu_limit, quick=args.quick, on_step=_step)
    from labkit.results import results_root

    path = write_profile(profile, args.out or results_root() / "calibration.yaml")
    print()
    print(profile["description"])
    print()
    print(comparison(profile).to_string(index=False))
    print(f"\nprofile written to {path}; use it with --profile {path}")
    return 0
