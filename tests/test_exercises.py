"""Exercises render their answers folded, and refuse an empty answer."""

from __future__ import annotations

import pytest

from cai_labs.exercises import Exercises


def test_answers_are_folded_and_escaped():
    ex = Exercises().add("How many bytes does rank 0 send?", "510,012 < 2^20")
    page = ex._repr_html_()
    assert "<details>" in page and "510,012 &lt; 2^20" in page
    assert page.index("How many bytes") < page.index("<details>")  # the question stays visible
    assert "answer: 510,012" in repr(ex)


def test_an_exercise_without_an_answer_is_refused():
    with pytest.raises(ValueError, match="needs a question and an answer"):
        Exercises().add("What is the bubble?", " ")
