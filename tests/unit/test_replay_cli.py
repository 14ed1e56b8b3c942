"""The replay's commands are registered and parse what the README shows."""

from __future__ import annotations

from pathlib import Path

from labkit.cli import build_parser
from labkit.replay.replay_cli import cmd_calibrate, cmd_replay, cmd_run, default_cell_timeout


def test_run_replay_and_calibrate_are_commands():
    parser = build_parser()
    args = parser.parse_args(["replay", "--profile", "quick", "--iterations", "2,5", "--out", "x", "--resume"])
    assert args.func is cmd_replay and args.iterations == "2,5" and args.out == Path("x") and args.resume
    args = parser.parse_args(["run", "--iteration", "4"])
    assert args.func is cmd_run and args.iteration == 4 and args.profile == "lab"
    assert parser.parse_args(["calibrate"]).func is cmd_calibrate


def test_a_cell_may_run_the_longest_load_and_cool_down_plus_five_minutes():
    assert default_cell_timeout("lab") == 50 + 5 + 300
