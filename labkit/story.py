"""The prose of the notebooks, read from ``labkit/data/story.yaml``.

Kept apart from the iteration data (``iterations.yaml``): the numbers are the
testbed's contract, the words are the notebooks'.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from labkit.exceptions import ScenarioError

STORY_FILE = Path(__file__).parent / "data" / "story.yaml"


@lru_cache(maxsize=4)
def load_story(path: str | None = None) -> dict[str, Any]:
    """Return the story document, checked: every iteration 1..12 has ``story`` and ``look_for``.

    Raises:
        ScenarioError: the file is missing, not YAML, or lacks a field (named).
    """
    file = Path(path) if path else STORY_FILE
    try:
        doc = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"cannot read the story: {exc}", path=str(file)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("iterations"), dict):
        raise ScenarioError("expected a mapping with an `iterations` mapping", path=str(file))
    for number in range(1, 13):
        entry = doc["iterations"].get(number)
        for field in ("story", "look_for"):
            if not isinstance(entry, dict) or not str(entry.get(field, "")).strip():
                raise ScenarioError("missing text", path=str(file), field=f"iterations.{number}.{field}")
    return doc


def iteration_text(number: int, field: str) -> str:
    """The ``story`` or ``look_for`` text of iteration ``number``."""
    return str(load_story()["iterations"][number][field]).strip()


def markdown(text: str):
    """``text`` as a Markdown cell output (IPython's ``Markdown``, imported on first use)."""
    from IPython.display import Markdown

    return Markdown(text)
