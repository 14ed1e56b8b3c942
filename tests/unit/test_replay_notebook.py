"""A report's links: a notebook's link to another notebook of notebooks/ opens in the HTML report."""

from __future__ import annotations

import nbformat

from labkit.replay.notebook import render_html


def test_a_link_to_a_notebook_is_pointed_at_its_rendered_copy(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("New here? Start with [00-start-here.ipynb](00-start-here.ipynb).")]
    source = tmp_path / "it.ipynb"
    nbformat.write(nb, source)
    plain = render_html(source, tmp_path / "plain.html").read_text()
    assert 'href="00-start-here.ipynb"' in plain  # beside the notebook it opens; in a report it does not
    linked = render_html(source, tmp_path / "it.html",
                         links={"00-start-here.ipynb": "../start-here.html"}).read_text()
    assert 'href="../start-here.html"' in linked and 'href="00-start-here.ipynb"' not in linked
