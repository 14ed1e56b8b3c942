"""One iteration made ready to run: the seam between ``labkit run``, the notebook and the replay.

:func:`prepare` turns what a user names (the iteration, the profile, the testbed, the
iteration's folder, and the replay run it belongs to, if any) into a :class:`Prepared`:
the iteration as the profile sizes it, the article's own beside it, the profile, the
folder, and the testbed that runs it.  ``labkit run``, the notebook's
:class:`~labkit.session.IterationSession` and the replay driver all get their testbed
here (:func:`build_testbed`), so for the same names they get the same testbed: in a
replay run, the one whose :meth:`~labkit.testbed.base.Testbed.teardown` the driver
calls after each notebook.

Words: a *replay run* is one ``labkit replay`` (``run_id`` is its id); an *iteration
run* is :func:`labkit.run.run_iteration` for one iteration; a *testbed run* is one
netns testbed's life from ``up`` to ``down``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.exceptions import TestbedError
from labkit.results import single_iteration_dir

GLOBAL_WAIT_S = 300.0  # another lab run may hold the global sysctls for a while
TESTBED_OPTIONS: dict[str, Any] = {"global_wait": GLOBAL_WAIT_S}


def build_testbed(name: str = "netns", run_id: str | None = None, **options: Any):
    """The testbed called ``name``, for the replay run ``run_id`` when given (not yet up).

    Args:
        name: the testbed backend (``netns``, ``vagrant``, ``ssh``).
        run_id: the replay run's id: the testbed class then builds the testbed of that
            run (:meth:`~labkit.testbed.base.Testbed.for_replay`); None outside a replay.
        options: the backend's options; default :data:`TESTBED_OPTIONS`.

    Raises:
        TestbedError: no such testbed, or its backend is not available, or ``on`` is
            given to a testbed that does not run on a machine one names.
    """
    from labkit.testbed import testbed_class

    cls = testbed_class(name)
    options = {**TESTBED_OPTIONS, **options}
    if options.get("on") and "on" not in inspect.signature(cls.__init__).parameters:
        raise TestbedError(f"--on runs the netns testbed on another machine; the {name} testbed names its "
                           "machines itself (its inventory or Vagrantfile)")
    options = {k: v for k, v in options.items() if not (k in ("on", "inventory") and v is None)}
    return cls.for_replay(run_id, **options) if run_id else cls(**options)


@dataclass
class Prepared:
    """An iteration ready to run (see :func:`prepare`).

    Attributes:
        scenario: the :class:`~labkit.scenario.Scenario` it comes from.
        iteration: the :class:`~labkit.scenario.Iteration` as the profile sizes it.
        article: the same iteration with the article's values.
        profile: the :class:`~labkit.scenario.Profile`.
        out_dir: the iteration's folder.
        testbed_name: the testbed backend's name.
        run_id: the replay run's id, None outside a replay.
        testbed_options: the backend's options.
    """

    scenario: Any
    iteration: Any
    article: Any
    profile: Any
    out_dir: Path
    testbed_name: str = "netns"
    run_id: str | None = None
    testbed_options: dict[str, Any] = field(default_factory=dict)
    _testbed: Any = field(default=None, init=False, repr=False)

    @property
    def testbed(self):
        """The testbed (built on first use by :func:`build_testbed`; not yet up)."""
        if self._testbed is None:
            self._testbed = build_testbed(self.testbed_name, self.run_id, **self.testbed_options)
        return self._testbed

    @property
    def testbed_built(self) -> bool:
        """True once :attr:`testbed` was built (a testbed never built has nothing to bring down)."""
        return self._testbed is not None

    @property
    def calibration(self) -> dict[str, Any]:
        """The profile's ``calibration`` block, for the sizing model's columns.

        Taken from the profile itself: a profile derived for this machine is named
        ``lab`` too, so a lookup by name would find the committed one.
        """
        return dict((self.profile.extra or {}).get("calibration") or {})


def prepare(iteration: int, profile: str = "lab", testbed: str = "netns",
            out_dir: str | os.PathLike | None = None, run_id: str | None = None, *,
            duration: float | None = None, cooldown: float | None = None,
            scenario: str | None = None, testbed_options: dict[str, Any] | None = None) -> Prepared:
    """Make iteration ``iteration`` ready to run.

    Args:
        iteration: the iteration number (1..12).
        profile: ``article``, ``lab``, ``quick`` or a profile file.
        testbed: the testbed backend's name.
        out_dir: the iteration's folder; ``results/notebook-<profile>/iteration-<N>`` when
            None (``$LABKIT_RESULTS_DIR`` instead of ``results/`` when set).
        run_id: the replay run's id; the testbed then keeps its state where the replay
            driver's teardown finds it.
        duration, cooldown: override the profile's load duration and cool-down (s).
        scenario: another iterations data file.
        testbed_options: the backend's options (default :data:`TESTBED_OPTIONS`).

    Raises:
        ScenarioError: no such iteration or profile, or a bad profile file.
    """
    from labkit.scenario import load_scenario

    scen = load_scenario(scenario)
    it = scen.iteration(int(iteration), profile)
    changes = {k: v for k, v in (("duration_s", duration), ("cooldown_s", cooldown)) if v is not None}
    it = dataclasses.replace(it, **changes) if changes else it
    folder = Path(out_dir) if out_dir else single_iteration_dir("notebook", it.profile, it.number)
    return Prepared(scenario=scen, iteration=it, article=scen.iteration(int(iteration), "article"),
                    profile=scen._profile(profile), out_dir=folder, testbed_name=testbed, run_id=run_id,
                    testbed_options=dict(testbed_options or {}))
