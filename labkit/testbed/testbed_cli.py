"""``labkit up/down/clean/status/exec``: the testbed's command line (parsing and printing only)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from labkit.exceptions import TestbedError
from labkit.host import LocalHost, NetnsHost
from labkit.testbed import TESTBEDS


def _testbed(args):
    from labkit.prepare import build_testbed  # (not at import: `python -m labkit loadgen` stays light)

    options = {}
    if getattr(args, "no_helper_rule", False):
        options["helper_rule"] = False
    if getattr(args, "wait", None):
        options["global_wait"] = args.wait
    if getattr(args, "on", None):
        options["on"] = args.on
        if args.inventory:
            options["inventory"] = args.inventory
    elif getattr(args, "inventory", None):
        if args.testbed != "ssh":
            raise TestbedError("--inventory is for --testbed ssh (with --on it names the machine's inventory)")
        options["inventory"] = args.inventory
    return build_testbed(args.testbed, **options)


def _cmd_up(args) -> int:
    from labkit.scenario import load_scenario
    iteration = load_scenario(args.scenario).iteration(args.iteration, args.profile)
    testbed = _testbed(args)
    start = time.monotonic()
    testbed.up(iteration)
    took = time.monotonic() - start
    if args.json:
        print(json.dumps(testbed.status(), indent=1))
    else:
        node_ip, node_port = testbed.service
        print(f"{testbed.name} testbed up for iteration {iteration.number} ({iteration.title}), "
              f"profile {iteration.profile}, in {took:.2f} s")
        print(f"service {node_ip}:{node_port}, file {testbed.file.name} ({testbed.file.size} bytes); "
              f"roles: {', '.join(testbed.roles())}")
    return 0


def _cmd_down(args) -> int:
    testbed = _testbed(args)
    was_up = testbed.status().get("state") != "down"
    if args.force:
        from labkit.testbed.netns import NetnsTestbed

        if not isinstance(testbed, NetnsTestbed):  # only it knows of a load under way (loadguard)
            raise TestbedError("--force is for the netns testbed (it stops a load under way)")
        testbed.down(force=True)
    else:
        testbed.down()
    print(f"{testbed.name} testbed down" if was_up else f"{testbed.name} testbed was not up")
    return 0


def _cmd_clean(args) -> int:
    from labkit.cleanup import clean
    if args.on:
        from labkit.remote.targets import machine_for

        with machine_for(args.on, inventory=args.inventory) as machine:
            report = clean(host=machine)
    else:
        report = clean()
    for line in report.removed:
        print(f"removed {line}")
    for line in report.kept:
        print(f"kept: {line}")
    for line in report.problems:
        print(f"NOT removed: {line}", file=sys.stderr)
    if report.problems:
        print(f"clean: {len(report.removed)} item(s) removed, {len(report.problems)} problem(s) left",
              file=sys.stderr)
        return 1
    print(f"clean: {len(report.removed)} item(s)" if report.removed else "clean: nothing of labkit's was left")
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more seconds")
    return value


def _cmd_status(args) -> int:
    status = _testbed(args).status()
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    if status.get("state") == "down":
        print(f"{status['testbed']} testbed is down")
        return 0
    svc = status["service"]
    print(f"{status['testbed']} testbed {status.get('run_id', '')}: {status['state']}, iteration "
          f"{status.get('iteration')} ({status.get('profile')}), service {svc['node_ip']}:{svc['node_port']}")
    for h in status["hosts"]:
        print(f"  {h['name']:<8} {h.get('ip', ''):<12} {h.get('netns', '')}")
    for p in status.get("problems", []):
        print(f"  problem: {p}")
    return 0 if status["state"] == "up" else 1


def _cmd_exec(args) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise TestbedError("exec: give a command after the role, e.g. labkit exec client -- ip addr")
    host = _testbed(args).host(args.role)
    netns = host.netns if isinstance(host, NetnsHost) else None
    if isinstance(host, LocalHost):
        return subprocess.call(command)
    if netns is None:  # a remote host (or a namespace of one): run it and print what it said
        result = host.run(command, check=False, timeout=None)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.exit_code
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", netns, *command])
    return 127  # pragma: no cover (exec does not return)


def register(sub) -> None:
    """Add ``up``, ``down``, ``clean``, ``status`` and ``exec`` to the CLI."""
    def testbed_arg(p):
        p.add_argument("--testbed", default="netns", choices=sorted(TESTBEDS),
                       help="which testbed (default: netns, the embedded one)")
        on_arg(p)

    def on_arg(p):
        p.add_argument("--on", metavar="MACHINE", help="run the netns testbed on another Linux machine over "
                       "SSH: vagrant:NAME (e.g. vagrant:lab), a host of the inventory, or [user@]host[:port]")
        p.add_argument("--inventory", help="the inventory file (the ssh testbed's, or the hosts --on names; "
                       "default: $LABKIT_INVENTORY or ./inventory.yaml)")

    p = sub.add_parser("up", help="build the testbed for an iteration, or reconfigure the running one")
    testbed_arg(p)
    p.add_argument("--iteration", "-i", type=int, default=2, help="iteration number 1..9 (default 2)")
    p.add_argument("--profile", "-p", default="lab",
                   help="article, lab, quick, or a profile file (*.yaml) (default lab)")
    p.add_argument("--scenario", help="another iterations file (default: labkit's own)")
    p.add_argument("--no-helper-rule", action="store_true",
                   help="leave out the explicit TFTP conntrack helper rule (fetches then fail)")
    p.add_argument("--wait", type=_seconds, default=0.0,
                   help="seconds to wait while another lab run holds the global sysctls")
    p.add_argument("--json", action="store_true", help="print the status document")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="remove the testbed and restore the global sysctls")
    testbed_arg(p)
    p.add_argument("--force", action="store_true",
                   help="stop a load under way first (its iteration is recorded as failed)")
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("clean", help="remove every labkit resource of crashed runs too, restore sysctls")
    on_arg(p)
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser("status", help="what is up: service, file, hosts")
    testbed_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("exec", help="run a command as a role: client, node, pod-N, init")
    testbed_arg(p)
    p.add_argument("role", help="client, node, pod-1.., or init")
    p.add_argument("cmd", nargs="*", help="the command (after --)")
    p.set_defaults(func=_cmd_exec)
