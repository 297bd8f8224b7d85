"""Agreement with the full cache: does a compressed cache make the model say what it would say anyway?

A sample is ``length`` tokens of real text (:func:`agreement_prompt_ids`: the Paul Graham essays,
seed 0 from the beginning, other seeds from a paragraph start picked by the seed). The model
continues it greedily for ``N`` tokens (default :data:`DEFAULT_NEW_TOKENS`) with the ``full``
cache; that *reference* (its tokens and next-token log-probabilities) is made once per
(length, seed) and reused for every policy. Each policy is then scored against it.

Notation: ``r[0..N)`` the reference continuation, ``c`` the compressed greedy continuation,
``p_i`` / ``q_i`` the full / compressed next-token distributions at continuation position ``i``
(``i = 0`` is predicted by the prompt's last position).

- **prefix agreement** ``= d / N`` where the *first divergence* ``d`` is the smallest ``i`` with
  ``c[i] != r[i]`` (a missing ``c[i]`` differs), ``d = N`` when none does. The headline
  "agreement" of the task: the share of the continuation reproduced before the first change.
  A sample is *correct* when it is 1.0 (the whole continuation is identical).
- **position agreement** ``= #{i < N : c[i] == r[i]} / N``: position-wise matches, also after
  a divergence (a one-token insertion shifts everything after it, so this is not an edit
  distance; it is >= prefix agreement).
- **top-1 agreement** (teacher-forced): the compressed model is fed ``r`` instead of its own
  tokens; ``#{i < N : argmax q_i == r[i]} / N`` (``r[i]`` is the full model's argmax).
- **KL** ``= mean_i KL(p_i || q_i)`` in nats over the same teacher-forced positions.

Both runs are prefill + ``N - 1`` single-token decode steps through a fresh cache, with no stop
at EOS, so every continuation has exactly ``N`` tokens. The free run and the teacher-forced run
feed the same tokens until the first top-1 miss, so the first divergence equals the first
teacher-forced miss; when there is none, the free run *is* the teacher-forced run and is not
repeated.

Measured on SmolLM2-135M-Instruct (fp32, CPU), ``kvfx eval --task agreement --lengths 1k --seeds 2``
(32 new tokens; prefix agreement / top-1 agreement / KL, held / dense): ``full`` 1.00 / 1.00 /
0.0000, 1.063; ``snapkv@0.25`` 0.31 / 0.89 / 0.046, 0.323; ``streaming`` 0.31 / 0.86 / 0.093,
0.251; ``tova@0.25`` 0.22 / 0.83 / 0.189, 0.247. Greedy continuations diverge within a few tokens
while most teacher-forced argmaxes still agree, so the prefix agreement is the strict measure and
top-1 / KL the finer-grained ones.

Example::

    model, tok = load_model("smollm2-135m")
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    ref = make_reference(model, tok, 2048, seed=0)
    torch._dynamo.reset(); kvfx.reset()
    model.compile(backend="kvfx", options={"policy": "snapkv", "inner": "eager"})
    evaluate_agreement(model, ref)["prefix_agreement"]
"""

from __future__ import annotations

import inspect
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvfx.eval.perplexity import _new_cache, _returned_cache, long_text_ids
from kvfx.eval.text import filler_text

__all__ = [
    "DEFAULT_NEW_TOKENS",
    "agreement_prompt_ids",
    "evaluate_agreement",
    "greedy_continuation",
    "load_reference",
    "make_reference",
    "reference_path",
    "save_reference",
    "score_agreement",
    "score_teacher_forced",
]

DEFAULT_NEW_TOKENS = 32
_PARAGRAPH = re.compile(r"\n\s*\n")


# ------------------------------------------------------------------------------------------- scoring


def score_agreement(reference, candidate) -> dict:
    """Prefix and position-wise agreement of a greedy ``candidate`` with the ``reference``.

    Args:
        reference: the full-cache continuation, ``N >= 1`` token ids (list or 1-D tensor).
        candidate: the compressed continuation; positions past ``N`` are ignored, missing ones
            count as different.

    Returns:
        ``{"prefix_agreement", "position_agreement", "first_divergence", "compared"}``: see the
        module docstring; ``first_divergence`` is ``N`` when nothing differs, ``compared == N``.

    Raises:
        ValueError: ``reference`` is empty.

    Example::

        score_agreement([5, 6, 7, 8], [5, 6, 9, 8])
        # {'prefix_agreement': 0.5, 'position_agreement': 0.75, 'first_divergence': 2, 'compared': 4}
    """
    ref, cand = _ids(reference), _ids(candidate)
    n = len(ref)
    if n == 0:
        raise ValueError("score_agreement reference: got 0 tokens, expected >= 1 "
                         "(generate at least one token with the full cache)")
    same = [i < len(cand) and cand[i] == ref[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), n)
    return {"prefix_agreement": first / n, "position_agreement": sum(same) / n,
            "first_divergence": first, "compared": n}


def score_teacher_forced(ref_tokens, ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(full || compressed) over teacher-forced positions.

    Args:
        ref_tokens: ``N`` ids, the full model's greedy (argmax) tokens.
        ref_logprobs: ``(N, V)`` full-cache next-token log-probabilities.
        logprobs: ``(N, V)`` compressed next-token log-probabilities (or logits: they are
            normalized here), the compressed model fed ``ref_tokens``.

    Returns:
        ``{"top1_agreement", "kl", "kl_max", "first_miss"}``: the share of positions whose argmax
        is ``ref_tokens[i]``, the mean and max of ``KL(p_i || q_i)`` in nats (float64), and the
        first position whose argmax differs (``N`` when none).

    Raises:
        ValueError: shapes disagree or ``N == 0`` (the message names the shapes).

    Example::

        score_teacher_forced(ref["tokens"], ref["logprobs"], run["logprobs"])["kl"]
    """
    ref = torch.as_tensor(_ids(ref_tokens), dtype=torch.long)
    if ref_logprobs.dim() != 2 or ref_logprobs.shape != logprobs.shape or ref_logprobs.shape[0] != len(ref):
        raise ValueError(
            f"score_teacher_forced: got ref_tokens ({len(ref)},), ref_logprobs {tuple(ref_logprobs.shape)}, "
            f"logprobs {tuple(logprobs.shape)}; expected (N,), (N, V), (N, V) with the same N, V"
        )
    if len(ref) == 0:
        raise ValueError("score_teacher_forced: got N = 0 positions, expected >= 1")
    p = F.log_softmax(ref_logprobs.double(), dim=-1)
    q = F.log_softmax(logprobs.double(), dim=-1)
    # [Note] sum_v p (log p - log q) with 0 log 0 = 0 (a token the full model rules out adds
    # nothing; one the compressed model rules out adds inf); exact zero when q == p bit for bit.
    pp = p.exp()
    kl = torch.where(pp > 0, pp * (p - q), 0.0).sum(-1).clamp_min(0.0)
    hit = logprobs.argmax(-1).cpu() == ref
    first = int((~hit).nonzero()[0, 0]) if not bool(hit.all()) else len(ref)
    return {"top1_agreement": float(hit.double().mean()), "kl": float(kl.mean()),
            "kl_max": float(kl.max()), "first_miss": first}


# ------------------------------------------------------------------------------------------- samples


def agreement_prompt_ids(tokenizer, n_tokens: int, seed: int = 0, source: str = "essays") -> torch.Tensor:
    """``(1, n_tokens)`` ids of real text to continue: seed 0 from the start of ``source``, any
    other seed from a paragraph start chosen by ``random.Random(seed)`` among those followed by
    enough text. Same arguments, same ids.

    Raises:
        ValueError: ``n_tokens < 1`` or ``seed < 0``, or the source is too short.

    Example::

        ids = agreement_prompt_ids(tok, 2048, seed=1)
    """
    if seed < 0:
        raise ValueError(f"agreement_prompt_ids seed: got {seed}, expected >= 0")
    start = 0
    if seed:
        text = filler_text(source)
        room = 8 * n_tokens + 1024  # characters; > 2x the ~4 characters per token of English
        starts = [m.end() for m in _PARAGRAPH.finditer(text) if len(text) - m.end() >= room]
        if starts:
            start = random.Random(seed).choice(starts)
    return long_text_ids(tokenizer, n_tokens, source, start=start)


def greedy_continuation(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, forced=None) -> dict:
    """Continue ``prompt_ids`` for exactly ``max_new_tokens`` tokens: prefill, then single-token
    decode steps through a fresh cache (compressed as in generation when the model is compiled
    with kvfx). No stop at EOS.

    Args:
        model: a Hugging Face causal LM, compiled with kvfx or not.
        prompt_ids: ``(1, n)`` ids.
        max_new_tokens: ``N >= 1``.
        forced: ``None`` for greedy decoding, or ``N`` ids to feed instead of the argmax
            (teacher forcing; the last one is never fed).

    Returns:
        ``{"tokens": (N,) argmax ids, "logprobs": (N, V) float32 on CPU, "seconds", "cache"}``:
        ``tokens[i]`` is the argmax at position ``i``, so for greedy decoding the continuation;
        ``cache`` is the model's cache after the last step.

    Example::

        run = greedy_continuation(model, ids, 32)
        tok.decode(run["tokens"])
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"greedy_continuation prompt_ids: got shape {tuple(prompt_ids.shape)}, "
                         "expected (1, n)")
    if max_new_tokens < 1:
        raise ValueError(f"greedy_continuation max_new_tokens: got {max_new_tokens}, expected >= 1")
    if forced is not None and len(_ids(forced)) != max_new_tokens:
        raise ValueError(f"greedy_continuation forced: got {len(_ids(forced))} tokens, expected "
                         f"max_new_tokens = {max_new_tokens}")
    inner = getattr(model, "_orig_mod", model)
    params = inspect.signature(inner.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    first_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    device = next(inner.parameters()).device
    ids = prompt_ids.to(device).long()
    feed = None if forced is None else torch.as_tensor(_ids(forced), dtype=torch.long, device=device)
    cache = _new_cache(inner)
    steps = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{kw: cache}, **first_kwargs)
        for i in range(max_new_tokens):
            cache = _returned_cache(out, cache)
            logits = out.logits[:, -1]
            steps.append(logits)
            if i == max_new_tokens - 1:
                break
            nxt = logits.argmax(-1, keepdim=True) if feed is None else feed[i].view(1, 1)
            out = model(input_ids=nxt, use_cache=True, **{kw: cache})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    logits = torch.cat(steps).float()
    return {"tokens": logits.argmax(-1).cpu(), "logprobs": F.log_softmax(logits, dim=-1).cpu(),
            "seconds": seconds, "cache": cache}


# ------------------------------------------------------------------------------------------- reference


def make_reference(model, tokenizer, length: int, seed: int, *,
                   max_new_tokens: int = DEFAULT_NEW_TOKENS, source: str = "essays") -> dict:
    """The full-cache reference of one sample; ``model`` must run the full cache (kvfx ``full``
    or not compiled).

    Returns:
        ``{"prompt_ids": (1, length), "tokens": (N,), "logprobs": (N, V) float32, "seconds",
        "length", "seed", "max_new_tokens", "source"}``.
    """
    prompt = agreement_prompt_ids(tokenizer, length, seed, source)
    run = greedy_continuation(model, prompt, max_new_tokens)
    return {"prompt_ids": prompt, "tokens": run["tokens"], "logprobs": run["logprobs"],
            "seconds": run["seconds"], "length": length, "seed": seed,
            "max_new_tokens": max_new_tokens, "source": source}


def reference_path(out, length: int, seed: int, max_new_tokens: int) -> Path:
    """Where a run directory keeps a reference: ``OUT/agreement_refs/len{L}_seed{S}_new{N}.pt``
    (``4 N V`` bytes of log-probabilities, ~6 MB for SmolLM2 at N = 32)."""
    return Path(out) / "agreement_refs" / f"len{length}_seed{seed}_new{max_new_tokens}.pt"


def save_reference(ref: dict, path, **extra) -> Path:
    """Write ``ref`` (plus ``extra`` fields, e.g. the model name) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({**ref, **extra}, tmp)
    tmp.replace(path)
    return path


def load_reference(path, **expect) -> dict:
    """Read a reference written by :func:`save_reference`; every ``expect`` field must match.

    Raises:
        ValueError: a field differs (the message names it and the fix).
    """
    ref = torch.load(path, weights_only=True)
    for key, want in expect.items():
        if ref.get(key) != want:
            raise ValueError(
                f"agreement reference {path}: {key} is {ref.get(key)!r}, this run asks for {want!r}; "
                "use another --out directory (or delete the file to recompute it)"
            )
    return ref


# ------------------------------------------------------------------------------------------- evaluate


def evaluate_agreement(model, ref: dict) -> dict:
    """Score ``model`` (compiled with the policy under test) against a full-cache reference.

    Runs the teacher-forced pass first; when its argmax matches the reference everywhere, the
    greedy continuation is that same computation and is not rerun (see the module docstring).

    Returns:
        the fields of :func:`score_agreement` and :func:`score_teacher_forced` plus
        ``"tokens"`` (the greedy continuation), ``"seconds"`` (its prefill + decode time),
        ``"forced_seconds"`` (the teacher-forced pass) and ``"cache"`` (the model's cache after
        the greedy continuation; measure memory with it).

    Example::

        r = evaluate_agreement(model, ref)
        r["prefix_agreement"], r["top1_agreement"], r["kl"]
    """
    n_new = int(ref["max_new_tokens"])
    forced = greedy_continuation(model, ref["prompt_ids"], n_new, forced=ref["tokens"])
    tf = score_teacher_forced(ref["tokens"], ref["logprobs"], forced["logprobs"])
    free = forced if tf["first_miss"] == n_new else greedy_continuation(model, ref["prompt_ids"], n_new)
    scores = score_agreement(ref["tokens"], free["tokens"])
    return {**scores, **tf, "tokens": free["tokens"], "seconds": free["seconds"],
            "forced_seconds": forced["seconds"], "cache": free["cache"]}


def _ids(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in x]
