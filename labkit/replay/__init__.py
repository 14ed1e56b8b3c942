"""Batch replay of the nine iterations: notebooks run by papermill, HTML reports, a manifest.

:func:`labkit.replay.driver.replay` runs ``notebooks/iteration.ipynb`` once per
iteration and ``notebooks/summary.ipynb`` once, each into ``results/<run-id>/``,
renders every executed notebook to self-contained HTML and writes
``manifest.json``, ``summary.csv`` and ``index.html``.  The driver, not the
notebook's kernel, owns teardown: after each notebook it brings that
notebook's testbed down and checks the global sysctls are back.
"""

__all__ = ["ReplayOptions", "replay"]


def __getattr__(name: str):
    # Imported on first use: the driver pulls in pandas, papermill and nbconvert,
    # which every `labkit` command would otherwise pay for at start-up (the
    # loadgen's CPU budget among them).
    if name in __all__:
        from labkit.replay import driver
        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
