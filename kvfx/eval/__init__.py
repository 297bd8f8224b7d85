"""Evaluation on real models, offline: filler text, passkey retrieval, timed greedy generation.

    from kvfx.models import load_model
    from kvfx.eval import make_passkey_sample, evaluate_passkey

    model, tok = load_model("smollm2-135m")
    sample = make_passkey_sample(tok, 4096, depth=0.5, seed=0)
    evaluate_passkey(model, tok, sample).correct
"""

from kvfx.eval.generate import greedy_generate
from kvfx.eval.passkey import (
    PasskeyResult,
    PasskeySample,
    evaluate_passkey,
    make_passkey_sample,
    passkey_sweep,
    score_passkey,
)
from kvfx.eval.text import TextSourceError, filler_text

__all__ = [
    "PasskeyResult",
    "PasskeySample",
    "TextSourceError",
    "evaluate_passkey",
    "filler_text",
    "greedy_generate",
    "make_passkey_sample",
    "passkey_sweep",
    "score_passkey",
]
