"""Word lists for RULER's synthetic tasks, from the ``wonderwords`` package (MIT), as RULER uses them.

RULER draws its needle keys ("adjective-noun", e.g. ``quizzical-aardvark``) and the words of its
common-words task from wonderwords' ``nounlist.txt``, ``adjectivelist.txt`` and ``verblist.txt``.
kvfx reads the same files from the installed package (``pip install wonderwords``; nothing is
copied into kvfx). The files are read, the package is not imported.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

__all__ = ["WONDERWORDS_PIP", "WordListError", "word_list"]

WONDERWORDS_PIP = "pip install 'wonderwords>=3.0'"
_FILES = {"nouns": "nounlist.txt", "adjectives": "adjectivelist.txt", "verbs": "verblist.txt"}


class WordListError(RuntimeError):
    """wonderwords is not installed (the message has the pip command)."""


def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords' ``nouns``, ``adjectives`` or ``verbs``, in the file's order (6782 / 912 / 1042
    words in wonderwords 3.0).

    Raises:
        ValueError: unknown ``kind``.
        WordListError: wonderwords is not installed.
    """
    if kind not in _FILES:
        raise ValueError(f"word_list kind: got {kind!r}, expected one of {', '.join(_FILES)}")
    return _read(_assets() / _FILES[kind])


def _assets() -> Path:
    spec = importlib.util.find_spec("wonderwords")
    if spec is None or spec.origin is None:
        raise WordListError("RULER's synthetic tasks need the word lists of the Python package "
                            f"'wonderwords', which is not installed; fix: {WONDERWORDS_PIP}")
    d = Path(spec.origin).parent / "assets"
    if not (d / _FILES["nouns"]).is_file():
        raise WordListError(f"wonderwords is installed but {d} has no {_FILES['nouns']}; "
                            f"fix: pip install --force-reinstall 'wonderwords>=3.0'")
    return d


@functools.cache
def _read(path: Path) -> tuple[str, ...]:
    return tuple(w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())
