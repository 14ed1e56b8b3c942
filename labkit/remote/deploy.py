"""labkit's own source on another machine, for what the netns testbed runs there in Python.

A netns testbed on another machine (``--on``) runs two things of labkit's there:
the load generator in the client namespace (``python -m labkit loadgen``) and the
background flows.  :func:`deploy_labkit` copies this labkit's source to
``/var/lib/labkit/src/<digest>/`` on that machine (``$LABKIT_DEPLOY_DIR`` of this one instead, when set) (once per version: the digest
is the source's), finds an interpreter there that can import it (labkit's box's
venv ``/opt/labkit/venv``, else ``python3``), and writes a wrapper ``python``
beside it that runs that interpreter with the source on ``PYTHONPATH``.  Nothing is
installed with a package manager: the machine brings Python (and, for the box,
the dependencies) itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shlex
import tarfile
from pathlib import Path

from labkit.exceptions import TestbedError

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEPLOY_ROOT = "/var/lib/labkit/src"  # $LABKIT_DEPLOY_DIR instead, when set
INTERPRETERS = ("/opt/labkit/venv/bin/python", "python3")
# what the testbed runs there (``python -m labkit loadgen`` builds the whole CLI's parser);
# importing them checks the interpreter's dependencies too
NEEDED = ("labkit.cli", "labkit.loadgen.loadgen_cli", "labkit.background", "labkit.monitor.agent")
SOURCE_PARTS = ("labkit", "k8s-manifests", "notebooks", "pyproject.toml", "README.md")


def source_tarball(root: Path = PROJECT_DIR) -> bytes:
    """labkit's package, ``k8s-manifests/``, the notebooks and ``pyproject.toml`` as a
    ``.tar.gz`` without caches, the same bytes for the same files (no times, no owners)."""
    items: list[Path] = []
    for name in SOURCE_PARTS:
        path = root / name
        if path.is_dir():
            items += [path, *sorted(path.rglob("*"))]
        elif path.is_file():
            items.append(path)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            if "__pycache__" in item.parts or item.suffix == ".pyc" or not (item.is_file() or item.is_dir()):
                continue
            info = tar.gettarinfo(str(item), arcname=str(item.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if item.is_file():
                with open(item, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return buf.getvalue()


def deploy_labkit(host, root: Path = PROJECT_DIR) -> str:
    """Make this labkit runnable on ``host``; return the path of its ``python`` wrapper there.

    Quick when this version is there already (one command).

    Raises:
        TestbedError: no interpreter on the machine can import labkit (the message names
            what is missing and where), or copying failed.
    """
    data = source_tarball(root)
    digest = hashlib.sha256(data).hexdigest()[:16]
    deploy_root = os.environ.get("LABKIT_DEPLOY_DIR") or DEPLOY_ROOT
    folder = f"{deploy_root}/{digest}"
    wrapper = f"{folder}/python"
    if host.run(["test", "-x", wrapper], timeout=60, check=False).ok:
        return wrapper
    upload = f"{deploy_root}/.upload-{digest}.tar.gz"
    host.makedirs(deploy_root)
    host.write_file(upload, data)
    tmp = f"{folder}.tmp"
    unpacked = host.run(f"rm -rf {tmp} && mkdir -p {tmp} && tar -xzf {upload} -C {tmp} && rm -f {upload}",
                        timeout=300, check=False)
    if not unpacked.ok:
        raise TestbedError(f"{host.name}: unpacking labkit into {tmp} failed: {unpacked.stderr.strip()}")
    probe = "import " + ", ".join(NEEDED) + "; labkit.cli.build_parser()"
    tried = []
    for interpreter in INTERPRETERS:
        check = host.run(["env", f"PYTHONPATH={tmp}", interpreter, "-c", probe], timeout=120, check=False)
        if check.ok:
            break
        last = (check.stderr.strip().splitlines() or [f"exit {check.exit_code}"])[-1]
        tried.append(f"{interpreter}: {last}")
    else:
        host.run(["rm", "-rf", tmp], timeout=60, check=False)
        raise TestbedError(f"{host.name}: no Python there can run labkit's load generator ("
                           + "; ".join(tried) + "). Use labkit's box (scripts/build-box.sh) or install "
                           "Python 3.10+ with PyYAML on that machine")
    script = f"#!/bin/sh\n# labkit {digest} (labkit.remote.deploy)\nPYTHONPATH={shlex.quote(folder)} " \
             f"exec {shlex.quote(interpreter)} \"$@\"\n"
    host.write_file(f"{tmp}/python", script.encode())
    done = host.run(f"chmod 755 {tmp}/python && rm -rf {folder} && mv {tmp} {folder}", timeout=60, check=False)
    if not done.ok:
        raise TestbedError(f"{host.name}: could not put labkit in {folder}: {done.stderr.strip()}")
    log.info("labkit %s copied to %s:%s (runs with %s)", digest, host.name, folder, interpreter)
    return wrapper
