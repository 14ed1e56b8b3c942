"""The Jupyter kernel the lab's notebooks run on: this Python, with labkit importable.

papermill starts notebooks on a named kernel.  ``labkit`` is registered into
this environment's prefix (``python -m ipykernel install --sys-prefix --name
labkit``), so JupyterLab and papermill started from the same environment find
it, and its ``argv`` runs the very interpreter labkit is installed in.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from labkit.exceptions import ReplayError

log = logging.getLogger(__name__)

KERNEL_NAME = "labkit"


def kernel_python(name: str = KERNEL_NAME) -> str | None:
    """Return the interpreter a registered kernel runs, or None when it is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return None
    return spec.argv[0] if spec.argv else None


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Register kernel ``name`` for this interpreter unless it already runs it.

    Returns:
        The kernel name.

    Raises:
        ReplayError: ipykernel could not register it.
    """
    if kernel_python(name) == sys.executable:
        return name
    cmd = [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name,
           "--display-name", f"Python ({name})"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReplayError(f"could not register the Jupyter kernel {name!r}: {' '.join(cmd)}: "
                          f"{proc.stderr.strip()}")
    log.info("registered Jupyter kernel %s for %s", name, sys.executable)
    return name
