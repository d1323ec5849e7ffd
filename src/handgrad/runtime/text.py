"""Text a person reads: tables in Markdown (TensorBoard's Text tab, the README and a terminal show them)."""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown table (TensorBoard's Text tab and the README render it): a header row, then one row per item."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
