"""Run one notebook with papermill and render it to one self-contained HTML file.

:func:`execute` never raises for what a notebook does: an exception in a cell,
a kernel that dies, a cell that runs past its deadline all come back as a
:class:`Outcome` with ``ok`` false and the reason, so a batch can record it and
go on.  The executed notebook is saved after every cell, so even a failed run
leaves the notebook as far as it got.

:func:`render_html` turns an executed notebook into HTML with the images
inlined and no script, style or font fetched from the network.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from labkit.exceptions import ReplayError
from labkit.util import atomic_write

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "data" / "nbconvert"
TEMPLATE_FILE = "labkit_report.html.j2"
# An attribute that makes a browser fetch something: src=, href= (links to
# other pages are fine, stylesheets and scripts are not), and CSS url(...).
_EXTERNAL = re.compile(
    r"""<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc\s*=\s*["']?(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref\s*=\s*["']?(?:https?:)?//"""
    r"""|@import\s+(?:url\()?["']?(?:https?:)?//"""
    r"""|\bimport\s*\(?\s*["'](?:https?:)?//""",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Outcome:
    """How one notebook run ended.

    Attributes:
        ok: every cell ran without error.
        kind: ``ok``, ``exception`` (a cell raised), ``dead-kernel``, ``timeout``,
            or ``error`` (papermill or the kernel could not start).
        message: a one-line reason, empty when ok.
        duration_s: wall-clock seconds.
    """

    ok: bool
    kind: str
    message: str
    duration_s: float


def classify(exc: BaseException) -> tuple[str, str]:
    """Return (kind, one-line message) for an exception papermill raised."""
    name = type(exc).__name__
    if name == "PapermillExecutionError":
        ename = getattr(exc, "ename", "Exception")
        evalue = getattr(exc, "evalue", "")
        cell = getattr(exc, "exec_count", None)
        return "exception", f"cell [{cell}] raised {ename}: {evalue}".strip()
    if name == "DeadKernelError":
        return "dead-kernel", f"the kernel died: {exc}".strip()
    if name in ("CellTimeoutError", "TimeoutError") or "timed out" in str(exc).lower():
        return "timeout", f"a cell ran past its deadline: {str(exc).splitlines()[0] if str(exc) else name}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return "error", f"{name}: {first}"


def execute(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any], *,
            kernel: str, cell_timeout: float | None = None, cwd: str | Path | None = None,
            progress: bool = False, label: str = "",
            engine_kwargs: Mapping[str, Any] | None = None) -> Outcome:
    """Run ``notebook`` with papermill into ``output``; report how it ended.

    Args:
        notebook: the source notebook (it has a cell tagged ``parameters``).
        output: where the executed notebook goes (saved after every cell).
        parameters: values injected after the ``parameters`` cell.
        kernel: the Jupyter kernel name to run it on.
        cell_timeout: seconds any one cell may run; past it the run fails as a timeout.
        cwd: the kernel's working directory.
        progress: show papermill's progress bar (a terminal only).
        label: the progress bar's label.
        engine_kwargs: more arguments for papermill's engine (e.g. ``kernel_manager_class``).

    Returns:
        The :class:`Outcome`; exceptions from the notebook do not escape.
    """
    import papermill

    start = time.monotonic()
    bar: bool | dict = {"desc": label or Path(notebook).stem, "leave": False} if progress else False
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=dict(parameters), kernel_name=kernel,
            execution_timeout=int(cell_timeout) if cell_timeout else None,
            progress_bar=bar, request_save_on_cell_execute=True, log_output=False,
            cwd=str(cwd) if cwd else None,
            # the kernel's start-up warning about its local TCP sockets is noise on the progress display
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
            **dict(engine_kwargs or {}),
        )
    except Exception as exc:  # any way a notebook can fail is a result, recorded by the caller
        kind, message = classify(exc)
        log.warning("%s: %s", notebook if not label else label, message)
        return Outcome(False, kind, message, time.monotonic() - start)
    return Outcome(True, "ok", "", time.monotonic() - start)


def external_references(html: str) -> list[str]:
    """Return the snippets of ``html`` that would make a browser fetch from the network."""
    return [m.group(0) for m in _EXTERNAL.finditer(html)]


def render_html(notebook: str | Path, html: str | Path, *, show_code: bool = False,
                links: Mapping[str, str] | None = None) -> Path:
    """Render an executed notebook to one self-contained HTML file (atomic write).

    Images are inlined as data: URIs; no script, stylesheet or font comes from the
    network.  Code cells are hidden unless ``show_code``: the report reads as the
    story and its charts.  ``links`` maps a link of the notebook (``00-start-here.ipynb``,
    beside it in ``notebooks/``) to where the report finds it (``../start-here.html``).

    Returns:
        The HTML path.

    Raises:
        ReplayError: the result would still load something from the network.
    """
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", extra_template_paths=[str(TEMPLATE_DIR)],
                            embed_images=True, exclude_input=not show_code,
                            exclude_input_prompt=not show_code, exclude_output_prompt=True)
    exporter.template_file = TEMPLATE_FILE
    exporter.log.setLevel(logging.ERROR)  # not "alternative text is missing" per chart
    body, _ = exporter.from_filename(str(notebook))
    for target, replacement in (links or {}).items():
        body = body.replace(f'href="{target}"', f'href="{replacement}"')
    found = external_references(body)
    if found:
        raise ReplayError(f"{html}: the report would load {found[0]!r} from the network")
    html = Path(html)
    atomic_write(html, body.encode())
    return html
