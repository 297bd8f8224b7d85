"""Timed greedy generation; nothing kvfx-specific.

kvfx's backend is applied by the caller, e.g.
``model.compile(backend="kvfx", options={"policy": ...})``, before calling :func:`greedy_generate`.
"""

from __future__ import annotations

import time

import torch

__all__ = ["greedy_generate"]


def greedy_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Greedy-decode up to ``max_new_tokens`` tokens and time it.

    Args:
        model: a Hugging Face causal LM (``model.generate`` is called with ``do_sample=False``).
        input_ids: ``(B, n)`` prompt ids on the model's device (left-padded if ``B > 1``).
        max_new_tokens: upper bound on generated tokens; decoding stops early at eos.
        attention_mask: ``(B, n)``; default all ones (right for unpadded prompts: pass the
            tokenizer's mask for padded batches).

    Returns:
        ``(new_token_ids, seconds)``: ``(B, m)`` ids after the prompt (``m <= max_new_tokens``;
        rows that stopped early are filled with the pad id) and the wall time of the prefill plus
        decode, synchronized on CUDA.

    Example::

        ids = tok("The capital of France is", return_tensors="pt").input_ids
        new, secs = greedy_generate(model, ids, max_new_tokens=3)
        tok.decode(new[0])   # ' Paris.'
    """
    if input_ids.dim() != 2:
        raise ValueError(f"greedy_generate input_ids: got shape {tuple(input_ids.shape)}, expected (B, n)")
    if max_new_tokens < 1:
        raise ValueError(f"greedy_generate max_new_tokens: got {max_new_tokens}, expected >= 1")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    cuda = input_ids.is_cuda
    if cuda:
        torch.cuda.synchronize(input_ids.device)
    t0 = time.perf_counter()
    # [Note] generate() runs under no_grad already; inference_mode is avoided on purpose, since
    # tensors it creates (e.g. cache buffers a backend allocates) cannot be updated in place later.
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    if cuda:
        torch.cuda.synchronize(input_ids.device)
    seconds = time.perf_counter() - t0
    return out[:, input_ids.shape[1] :], seconds
