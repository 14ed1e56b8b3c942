"""Batch replay of the nine iterations: notebooks run by papermill, HTML reports, a manifest.

:func:`labkit.replay.driver.replay` runs ``notebooks/iteration.ipynb`` once per
iteration and ``notebooks/summary.ipynb`` once, each into ``results/<run-id>/``,
renders every executed notebook to self-contained HTML and writes
``manifest.json``, ``summary.csv`` and ``index.html``.  The driver, not the
notebook's kernel, owns teardown: after each notebook it brings that
notebook's testbed down and checks the global sysctls are back.
"""

from labkit.replay.driver import ReplayOptions, replay

__all__ = ["ReplayOptions", "replay"]
