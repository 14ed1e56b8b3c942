"""``labkit notebook``: JupyterLab for a workshop, started from labkit's venv with its kernel.

One command gives a participant the lab: JupyterLab on 127.0.0.1 (never another
address) with a fresh token, the ``notebooks/`` folder as its root, the kernel
``labkit`` (registered by ``scripts/setup.sh``) as the default, ``--allow-root``
only when run as root (JupyterLab refuses root otherwise), and the URL of the
start-here notebook printed once the server answers.  Ctrl-C or SIGTERM stops
the server, which shuts its kernels down, and nothing is left running.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from labkit.exceptions import LabkitError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
LAB_SETTINGS = Path(__file__).resolve().parent / "data" / "jupyterlab"  # overrides.json: no news pop-up
KERNEL = "labkit"
START_HERE = "00-start-here.ipynb"
DEFAULT_PORT = 8888
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Server:
    """How to reach a JupyterLab that :func:`start` launched.

    Attributes:
        url: the start-here notebook's URL, token included.
        base: ``http://127.0.0.1:PORT``.
        token: the access token.
        process: the ``jupyter lab`` process (its own process group).
    """

    url: str
    base: str
    token: str
    process: subprocess.Popen


def kernel_spec(prefix: str | os.PathLike = sys.prefix) -> Path:
    """The ``labkit`` kernel's ``kernel.json`` in this environment.

    Raises:
        LabkitError: it is not registered (with the command that registers it).
    """
    path = Path(prefix) / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    if not path.is_file():
        raise LabkitError(f"the Jupyter kernel {KERNEL!r} is not registered in {prefix} "
                          "(run `bash scripts/setup.sh lab`, which registers it)")
    return path


def free_port(start: int = DEFAULT_PORT, tries: int = 50) -> int:
    """The first port from ``start`` that nothing listens on at 127.0.0.1.

    Raises:
        LabkitError: none of ``tries`` ports was free.
    """
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LabkitError(f"no free TCP port in {start}..{start + tries - 1} on 127.0.0.1")


def command(port: int, token: str, *, root: bool | None = None,
            notebooks: str | os.PathLike = NOTEBOOKS) -> list[str]:
    """The ``jupyter lab`` command line: loopback only, token, labkit's kernel, no browser.

    Args:
        port: TCP port on 127.0.0.1.
        token: the access token.
        root: add ``--allow-root``; default: when this process is root.
        notebooks: JupyterLab's root folder.
    """
    root = os.geteuid() == 0 if root is None else root
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}",
            f"--MappingKernelManager.default_kernel_name={KERNEL}",
            # a workshop room has no use for update checks and news pop-ups (nor for the
            # pop-up asking whether to fetch news: labkit's overrides.json answers "never")
            "--LabApp.news_url=None", f"--LabApp.app_settings_dir={LAB_SETTINGS}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if root:
        argv.append("--allow-root")
    return argv


def start(port: int | None = None, token: str | None = None, *, notebooks: str | os.PathLike = NOTEBOOKS,
          wait: float = 60.0, log_file: str | os.PathLike | None = None) -> Server:
    """Start JupyterLab and return once it answers.

    Args:
        port: TCP port; default the first free one from 8888.
        token: default a fresh random one.
        notebooks: the root folder.
        wait: seconds to wait for the server to answer.
        log_file: where its log goes (default: this process's stderr).

    Raises:
        LabkitError: the kernel is not registered, or the server exited or did not answer.
    """
    kernel_spec()
    port = port or free_port()
    token = token or secrets.token_hex(24)
    log = open(log_file, "ab") if log_file else None
    try:
        proc = subprocess.Popen(command(port, token, notebooks=notebooks), cwd=str(notebooks),
                                stdin=subprocess.DEVNULL, stdout=log or sys.stderr,
                                stderr=subprocess.STDOUT if log else sys.stderr, start_new_session=True)
    finally:
        if log:
            log.close()
    base = f"http://127.0.0.1:{port}"
    server = Server(f"{base}/lab/tree/{START_HERE}?token={token}", base, token, proc)
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise LabkitError(f"jupyter lab exited with code {proc.returncode} before it answered "
                              f"(its log: {log_file or 'above'})")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as reply:
                json.load(reply)
            return server
        except (urllib.error.URLError, OSError, ValueError):
            if time.monotonic() >= deadline:
                stop(server)
                raise LabkitError(f"jupyter lab did not answer on {base} within {wait:g} s") from None
            time.sleep(0.3)


def stop(server: Server, grace: float = STOP_GRACE_S) -> int:
    """Stop the server (SIGTERM: it shuts its kernels down), then its whole group.

    Returns:
        The server's exit code.
    """
    proc = server.process
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything of its group still alive (a kernel that ignored its shutdown)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.wait()


def _notebook(args) -> int:
    server = start(args.port, args.token, notebooks=args.notebooks)
    print(f"JupyterLab for labkit is running (kernel {KERNEL!r}{', as root' if os.geteuid() == 0 else ''}).")
    print(f"Open: {server.url}")
    print("Stop it with Ctrl-C.", flush=True)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        server.process.wait()
        print(f"jupyter lab exited with code {server.process.returncode}")
        return server.process.returncode or 0
    except KeyboardInterrupt:
        print("\nstopping JupyterLab and its kernels ...", flush=True)
        code = stop(server)
        print(f"stopped (exit code {code})")
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        stop(server)


def register(subparsers) -> None:
    """Add the ``notebook`` sub-command."""
    p = subparsers.add_parser(
        "notebook", help="start JupyterLab with labkit's kernel and print the URL to open",
        description="Start JupyterLab on 127.0.0.1 with a token and labkit's notebooks, and print "
                    f"the URL of {START_HERE}. Ctrl-C stops it and its kernels.")
    p.add_argument("--port", type=int, help=f"TCP port (default: the first free one from {DEFAULT_PORT})")
    p.add_argument("--token", help="access token (default: a fresh random one)")
    p.add_argument("--notebooks", default=str(NOTEBOOKS),
                   help="the folder JupyterLab opens (default: labkit's notebooks/; a copy of your own works too)")
    p.set_defaults(func=_notebook)
