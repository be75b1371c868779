""" "Predict, then check": questions whose answers the page's own run computed, shown folded.

A page ends with a few questions about what its run measured. The answers are values from that
run, rendered inside ``<details>`` so a reader predicts first and opens the answer after. The
last expression of a cell that is an :class:`Exercises` shows as HTML in the built page and in
Jupyter (``_repr_html_``), and as plain text elsewhere.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

__all__ = ["Exercises"]


@dataclass
class Exercises:
    """Questions with their computed answers, each answer hidden until opened."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, question: str, answer: str) -> Exercises:
        """Add one question and its answer (computed by the run: pass an f-string)."""
        if not question.strip() or not answer.strip():
            raise ValueError("an exercise needs a question and an answer, both non-empty")
        self.items.append((question, answer))
        return self

    def _repr_html_(self) -> str:
        parts = ['<div class="cai-exercises">']
        for i, (q, a) in enumerate(self.items, 1):
            parts.append(
                f"<p><b>{i}.</b> {html.escape(q)}</p>"
                f"<details><summary>Answer (from this build's run)</summary>"
                f"<p>{html.escape(a)}</p></details>"
            )
        parts.append("</div>")
        return "".join(parts)

    def __repr__(self) -> str:
        return "\n".join(f"{i}. {q}\n   answer: {a}" for i, (q, a) in enumerate(self.items, 1))
