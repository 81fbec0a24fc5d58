"""Sanitising user text and splitting replies at natural boundaries (bot.text)."""

from __future__ import annotations

import pytest

from bot.text import sanitize, split_text


def test_sanitize_strips_controls_but_keeps_newlines_tabs_and_odd_unicode() -> None:
    assert sanitize("  a\x00b\x1bc\x7fd\x85e\x9f \r\nf\tg\rh  ") == "abcde \nf\tg\nh"
    rtl = "مرحبا \u202bשלום\u202c 👩\u200d💻 🇫🇷 \u200b"
    assert sanitize(rtl) == rtl.strip()
    assert sanitize("Cafe\u0301") == "Café"  # NFC
    assert sanitize("\x00\x01\n\t ") == ""


def test_short_text_is_one_chunk() -> None:
    assert split_text("hello", 10) == ("hello",)
    assert split_text("", 10) == ()


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("First para.\n\nSecond para here.", 20, ("First para.\n\n", "Second para here.")),
        ("line one\nline two\nline three", 20, ("line one\nline two\n", "line three")),
        ("One sentence. Two sentence! Three?", 20, ("One sentence. ", "Two sentence! Three?")),
        ("Is it? Yes. No! Maybe. Fine", 14, ("Is it? Yes. ", "No! Maybe. ", "Fine")),
        ("alpha beta gamma delta", 12, ("alpha beta ", "gamma delta")),
        ("abcdefghij", 4, ("abcd", "efgh", "ij")),
    ],
)
def test_split_prefers_the_most_natural_boundary(text: str, limit: int, expected: tuple[str, ...]) -> None:
    assert split_text(text, limit) == expected


def test_split_never_exceeds_the_limit_and_loses_nothing() -> None:
    text = ("Lorem ipsum dolor sit amet, consectetur. " * 40 + "\n\n") * 5 + "x" * 5000
    chunks = split_text(text, 2000)
    assert all(0 < len(c) <= 2000 for c in chunks)
    assert "".join(chunks) == text


def test_split_does_not_separate_combining_marks_or_joined_emoji() -> None:
    text = "e\u0301" * 10
    chunks = split_text(text, 5)
    assert all(c[0] != "\u0301" for c in chunks) and "".join(chunks) == text
    family = "👩\u200d👩\u200d👧" * 3
    assert all(not c.startswith("\u200d") and not c.endswith("\u200d") for c in split_text(family, 6))


def test_split_rejects_a_silly_limit() -> None:
    with pytest.raises(ValueError, match="positive"):
        split_text("x", 0)
