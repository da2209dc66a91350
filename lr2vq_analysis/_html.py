"""Small HTML tables for Jupyter (``_repr_html_`` of reports, trade-off models and size reports)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["html_block", "html_text"]


def html_text(value: Any) -> str:
    """Escaped text of a value (layer names may hold ``<``, ``&``, quotes)."""
    return html.escape(str(value), quote=True)


def html_block(summary: str, header: Sequence[str], rows: Sequence[Sequence[Any]], *, max_rows: int = 60) -> str:
    """A summary line (already HTML) above a table; beyond ``max_rows`` rows the middle is elided.

    Examples
    --------
    >>> html_block("<b>x</b>", ["a"], [[1], ["<2>"]])
    '<div><p><b>x</b></p><table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td></tr><tr><td>&lt;2&gt;</td></tr></tbody></table></div>'
    """
    shown: list[Sequence[Any] | None] = list(rows)
    if len(rows) > max_rows:
        half = max_rows // 2
        shown = [*rows[:half], None, *rows[-half:]]
    head = "".join(f"<th>{html_text(cell)}</th>" for cell in header)
    body = []
    for row in shown:
        if row is None:
            body.append(f'<tr><td colspan="{len(header)}">… {len(rows) - 2 * (max_rows // 2)} more …</td></tr>')
        else:
            body.append("<tr>" + "".join(f"<td>{html_text(cell)}</td>" for cell in row) + "</tr>")
    return f"<div><p>{summary}</p><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
