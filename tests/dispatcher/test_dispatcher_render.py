"""Titles name the topic and the object; producer text stays text."""

from __future__ import annotations

from services.dispatcher import render


def test_title_names_the_object_after_the_label() -> None:
    assert render.title("@mention in a comment", "Quote Q-42") == "@mention in a comment: Quote Q-42"
    assert render.title("Deal assigned to you", "") == "Deal assigned to you"
    # Line breaks in producer text cannot split a subject or a toast.
    assert render.title("Reply", "Hello\r\nBcc: x@example.test") == "Reply: Hello Bcc: x@example.test"


def test_long_object_names_are_shortened_in_the_title_only() -> None:
    name = "x" * 300
    title = render.title("Label", name)
    assert title.startswith("Label: xxx") and title.endswith("\u2026")
    assert len(title) == len("Label: ") + 80
    assert render.body(name, "Dan", "en") == f"{name}, by Dan"
