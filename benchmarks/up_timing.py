"""How long `labkit up` takes on this machine, per iteration: fresh builds and reconfigurations.

Runs the real CLI (`python -m labkit up/down`) in a throw-away $LABKIT_STATE_DIR, as root.
Prints, per iteration, the median wall time of the whole command and of the testbed's own
`up` (without the time spent waiting for another lab run to give the global sysctls back).

    sudo .venv/bin/python benchmarks/up_timing.py [--repeat 5] [--profile quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def labkit(env: dict, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "labkit", *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"labkit {' '.join(args)} failed: {res.stderr}")
    return time.monotonic() - start, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", default="quick")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lkbench-") as state:
        env = dict(os.environ, LABKIT_STATE_DIR=state)
        rows = []
        for n in range(1, 10):
            wall, own = [], []
            for _ in range(args.repeat):
                took, res = labkit(env, "up", "-i", str(n), "-p", args.profile, "--wait", "300", "--json")
                last = json.loads(res.stdout)["last_up"]
                wall.append(took - last["waited_for_globals_s"])
                own.append(last["seconds"] - last["waited_for_globals_s"])
                labkit(env, "down")
            rows.append((n, statistics.median(wall), max(wall), statistics.median(own)))
            print(f"iteration {n}: labkit up median {rows[-1][1]:.2f} s (max {rows[-1][2]:.2f} s), "
                  f"testbed up() median {rows[-1][3]:.2f} s", flush=True)
        # reconfiguring a running testbed through the story, 1 -> 9
        steps = []
        for _ in range(args.repeat):
            for n in range(1, 10):
                took, res = labkit(env, "up", "-i", str(n), "-p", args.profile, "--wait", "300", "--json")
                steps.append(took - json.loads(res.stdout)["last_up"]["waited_for_globals_s"])
            labkit(env, "down")
        print(f"fresh up, all iterations: median {statistics.median(r[1] for r in rows):.2f} s, "
              f"worst {max(r[2] for r in rows):.2f} s")
        print(f"reconfigure (up on a running testbed, 1 -> 9): median {statistics.median(steps):.2f} s, "
              f"worst {max(steps):.2f} s")


if __name__ == "__main__":
    main()
