"""The sandbox: a participant's own values for the testbed, a short load, the same charts.

:class:`Sandbox` turns plain values (the node's and the pod's conntrack sysctls,
the kubelet's allowlist, replicas, CPU per pod, load duration) into an
:class:`~labkit.scenario.Iteration` derived from one of the story's, checks
them, and only then reconfigures the running testbed: a value the kernel or
the kubelet would refuse is refused first, with what was wrong and where, and
the testbed stays as it was (still up, still usable).

Checks, before anything changes:

* every number is a whole number in its range (a negative max is refused naming
  the parameter);
* a new ``nf_conntrack_max`` is not below what the machine's own namespace or
  any namespace of the testbed already tracks (:func:`labkit.sysctls.check_max`);
* the pod's sysctls pass the kubelet's admission (``SysctlForbidden``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from labkit.exceptions import ScenarioError
from labkit.results import results_root
from labkit.session import IterationSession

UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"
UDP_STREAM = "net.netfilter.nf_conntrack_udp_timeout_stream"
CT_MAX = "net.netfilter.nf_conntrack_max"
EXPECT_MAX = "net.netfilter.nf_conntrack_expect_max"
UNSAFE = (UDP_TIMEOUT, UDP_STREAM)
LIMITS = {"conntrack_max": (1, 1 << 26), "expect_max": (1, 1 << 20), "node_udp_timeout": (1, 3600),
          "node_udp_timeout_stream": (1, 3600), "pod_udp_timeout": (1, 3600),
          "pod_udp_timeout_stream": (1, 3600), "replicas": (1, 8), "duration": (1, 300)}


def _whole(name: str, value: Any) -> int:
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ScenarioError(f"must be a whole number from {low} to {high}, got {value!r}",
                            path="sandbox", field=name)
    return value


class Sandbox:
    """A testbed the participant sets: start from iteration ``base`` of ``profile``.

    Args:
        profile: ``quick`` (short, CI-sized tables), ``lab`` or a profile file.
        base: the story's iteration whose set-up the sandbox starts from (8: tuned).
        testbed: the testbed backend.
        out_dir: where each sandbox run writes its folder (``run-<date>-<time>-<n>``); default
            ``results/sandbox`` (``$LABKIT_RESULTS_DIR/sandbox`` when set).
    """

    def __init__(self, profile: str = "quick", base: int = 8, *, testbed: str = "netns",
                 out_dir: str | os.PathLike | None = None):
        self.session = IterationSession(base, profile, testbed=testbed)
        self.base = self.session.iteration
        self.out_root = Path(out_dir) if out_dir else results_root() / "sandbox"
        self._runs = itertools.count(1)
        self.changing = False  # apply() got past its checks and is changing the testbed

    def defaults(self) -> dict[str, Any]:
        """The base iteration's values, as the parameters :meth:`iteration` takes."""
        it = self.base
        return {"conntrack_max": it.node_sysctls.get(CT_MAX), "expect_max": it.node_sysctls.get(EXPECT_MAX),
                "node_udp_timeout": it.node_sysctls.get(UDP_TIMEOUT),
                "node_udp_timeout_stream": it.node_sysctls.get(UDP_STREAM),
                "pod_udp_timeout": it.pod_sysctls.get(UDP_TIMEOUT),
                "pod_udp_timeout_stream": it.pod_sysctls.get(UDP_STREAM),
                "allow_unsafe_sysctls": bool(it.allowed_unsafe_sysctls), "replicas": it.replicas,
                "cpu_per_pod": it.cpu_limit, "duration": int(it.duration_s)}

    def iteration(self, *, conntrack_max: int, expect_max: int, node_udp_timeout: int | None = None,
                  node_udp_timeout_stream: int | None = None, pod_udp_timeout: int | None = None,
                  pod_udp_timeout_stream: int | None = None, allow_unsafe_sysctls: bool = True,
                  replicas: int = 1, cpu_per_pod: float | None = None, duration: int = 10):
        """The sandbox's :class:`~labkit.scenario.Iteration` for these values (checked, nothing changed).

        A timeout left None keeps the kernel's default there.

        Raises:
            ScenarioError: a value out of its range (names the parameter).
        """
        node = {CT_MAX: _whole("conntrack_max", conntrack_max), EXPECT_MAX: _whole("expect_max", expect_max)}
        pod: dict[str, int] = {}
        for where, name, value, sysctl in (
                (node, "node_udp_timeout", node_udp_timeout, UDP_TIMEOUT),
                (node, "node_udp_timeout_stream", node_udp_timeout_stream, UDP_STREAM),
                (pod, "pod_udp_timeout", pod_udp_timeout, UDP_TIMEOUT),
                (pod, "pod_udp_timeout_stream", pod_udp_timeout_stream, UDP_STREAM)):
            if value is not None:
                where[sysctl] = _whole(name, value)
        if cpu_per_pod is not None and (isinstance(cpu_per_pod, bool) or not isinstance(cpu_per_pod, (int, float))
                                        or not 0.05 <= cpu_per_pod <= (os.cpu_count() or 1)):
            raise ScenarioError(f"must be None (no limit) or cores from 0.05 to {os.cpu_count()}, "
                                f"got {cpu_per_pod!r}", path="sandbox", field="cpu_per_pod")
        return dataclasses.replace(
            self.base, number=self.base.number, title="sandbox", setup="nodeport", node_sysctls=node,
            pod_sysctls=pod, allowed_unsafe_sysctls=UNSAFE if allow_unsafe_sysctls else (),
            replicas=_whole("replicas", replicas), cpu_limit=None if cpu_per_pod is None else float(cpu_per_pod),
            duration_s=float(_whole("duration", duration)))

    def _check_max(self, value: int) -> None:
        """Refuse a max below what this machine or a namespace of the testbed tracks."""
        from labkit.host import LocalHost
        from labkit.sysctls import check_max

        check_max(LocalHost("init"), value, "in the machine's own namespace")
        testbed = self.session.testbed
        for role in testbed.roles():
            if role == "node" or role.startswith("pod-"):
                check_max(testbed.host(role), value, f"in the testbed's {role} namespace")

    def apply(self, **values: Any):
        """Check the values, then bring the testbed up (or reconfigure it) with them.

        Returns:
            A Markdown line saying what is up.

        Raises:
            ScenarioError: a value is out of range.
            TestbedError: the max is below what is tracked already.
            PodRejected: the kubelet refuses the pod's sysctls (``SysctlForbidden``).
        """
        from labkit.manifests import admit_sysctls

        it = self.iteration(**values)
        admit_sysctls("tftp-server", it.pod_sysctls, it.allowed_unsafe_sysctls)
        self._check_max(it.node_sysctls[CT_MAX])
        self.session.iteration = it
        self.changing = True
        return self.session.up()

    def attempt(self, **values: Any):
        """Try :meth:`apply` and show what happened: the refusal (red) and the testbed's state after it.

        For the notebook's "try a bad value" cells: the refusal is the result shown,
        and the cells after it still run.

        Returns:
            A :class:`~labkit.commands.Panel`.
        """
        from labkit.commands import Panel
        from labkit.exceptions import LabkitError

        self.changing = False
        try:
            shown = self.apply(**values)
        except LabkitError as exc:
            return self._refusal(exc)
        return Panel([("applied", shown.data, False)])

    def _refusal(self, exc: Exception):
        """A refusal (red) and the testbed's state after it, as a Panel."""
        from labkit.commands import Panel

        status = self.session.testbed.status()
        state = str(status.get("state"))
        if state == "up" and status.get("node_sysctls"):  # what is in force: the last values that applied
            state += ", with " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in status["node_sysctls"].items())
            state += " in force on the node"
        after = "the testbed failed while changing" if self.changing else "refused before anything changed"
        return Panel([(f"{after} ({type(exc).__name__})", str(exc), True), ("the testbed is now", state, False)])

    def run(self, live: bool = True, **values: Any) -> pd.DataFrame:
        """Apply the values, run a short load with the live chart, and return the key numbers.

        Raises:
            as :meth:`apply`, and what :func:`labkit.run.run_iteration` raises.
        """
        self.apply(**values)
        return self._load(live)

    def _load(self, live: bool) -> pd.DataFrame:
        """The short load on the testbed as it is, into a fresh folder; the key numbers."""
        self.session.out_dir = self.out_root / time.strftime(f"run-%Y%m%d-%H%M%S-{next(self._runs)}")
        return self.session.run(live=live)

    def status(self):
        """The testbed's picture from its ``labkit status --json`` document."""
        from labkit.workshop import picture, status_json

        return picture(status_json(self.session.testbed))

    def conntrack_chart(self):
        """The last run's conntrack chart (as in the story's notebooks)."""
        return self.session.conntrack_chart()

    def down(self) -> str:
        """Bring the testbed down and restore the global sysctls."""
        return self.session.down()

    def widgets(self, **values: Any):
        """Sliders and boxes for the values, and a button that runs a short load with them.

        Returns:
            An ipywidgets box, or a Markdown note when ipywidgets is not installed (the
            parameters cell does the same job).
        """
        try:
            import ipywidgets as w
        except ImportError:
            from IPython.display import Markdown

            return Markdown("*ipywidgets is not installed here: change the values in the parameters "
                            "cell and run the next cells.*")
        from IPython.display import display

        from labkit.exceptions import LabkitError

        start = {**self.defaults(), **values}
        wide = {"style": {"description_width": "260px"}, "layout": w.Layout(width="560px")}  # whole labels
        fields = {
            "conntrack_max": w.BoundedIntText(value=start["conntrack_max"], min=-(1 << 20), max=1 << 26,
                                              description="nf_conntrack_max", **wide),
            "expect_max": w.BoundedIntText(value=start["expect_max"], min=-(1 << 20), max=1 << 20,
                                           description="nf_conntrack_expect_max", **wide),
            "node_udp_timeout": w.IntSlider(value=start["node_udp_timeout"] or 30, min=1, max=180,
                                            description="node nf_conntrack_udp_timeout (s)", **wide),
            "pod_udp_timeout": w.IntSlider(value=start["pod_udp_timeout"] or 30, min=1, max=180,
                                           description="pod nf_conntrack_udp_timeout (s)", **wide),
            "allow_unsafe_sysctls": w.Checkbox(value=start["allow_unsafe_sysctls"],
                                               description="kubelet allows the pod's UDP timeouts", **wide),
            "replicas": w.IntSlider(value=start["replicas"], min=1, max=4, description="replicas", **wide),
            "cpu_per_pod": w.FloatSlider(value=start["cpu_per_pod"] or 0.35, min=0.05, max=float(os.cpu_count() or 1),
                                         step=0.05, description="CPU per pod", **wide),
            "duration": w.IntSlider(value=start["duration"], min=3, max=60, description="load duration (s)", **wide),
        }
        button = w.Button(description="run the load", button_style="primary")
        out = w.Output()

        def clicked(_):
            out.clear_output()
            chosen = {k: f.value for k, f in fields.items()}
            chosen["node_udp_timeout_stream"] = start["node_udp_timeout_stream"]
            chosen["pod_udp_timeout_stream"] = start["pod_udp_timeout_stream"]
            with out:  # drawn once at the end: a button's output area is not a running cell
                self.changing = False
                try:
                    self.apply(**chosen)
                except LabkitError as exc:  # a bad value: said in the widget's output, as in a cell
                    display(self._refusal(exc))
                    return
                display(self._load(live=False))

        button.on_click(clicked)
        return w.VBox([*fields.values(), button, out])
