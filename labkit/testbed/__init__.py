"""Testbeds, chosen by name: ``get_testbed("netns")`` (the embedded default), ``vagrant``, ``ssh``.

:data:`TESTBEDS` maps a name to ``"module:Class"``; the class is imported on
first use, so a backend whose dependencies are missing only fails when chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

from labkit.exceptions import TestbedError
from labkit.testbed.base import ServedFile, Testbed

TESTBEDS: dict[str, str] = {
    "netns": "labkit.testbed.netns:NetnsTestbed",
    "vagrant": "labkit.testbed.vagrant:VagrantTestbed",
    "ssh": "labkit.testbed.inventory:SSHTestbed",
}


def get_testbed(name: str = "netns", **options: Any) -> Testbed:
    """Return the testbed called ``name``, built with ``options``.

    The netns testbed attaches to the run already up in the state directory, if any.

    Raises:
        TestbedError: no such testbed, or its backend is not available.
    """
    return testbed_class(name)(**options)


def testbed_class(name: str = "netns") -> type[Testbed]:
    """The class of the testbed called ``name`` (imported on first use).

    Raises:
        TestbedError: no such testbed, or its backend is not available.
    """
    target = TESTBEDS.get(name)
    if target is None:
        raise TestbedError(f"unknown testbed {name!r}; testbeds are {', '.join(TESTBEDS)}")
    if not isinstance(target, str):
        return target
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TestbedError(f"testbed {name!r} is not available in this version of labkit "
                               f"({module_name} is missing)") from None
        raise
    return getattr(module, cls_name)


__all__ = ["TESTBEDS", "ServedFile", "Testbed", "get_testbed", "testbed_class"]
