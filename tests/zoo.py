"""Tiny models for the test matrix: Hugging Face families (random weights) and hand-written
decoders with their own list caches."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 96


def hf_model(family: str, attn: str = "sdpa", layers: int = 2, seed: int = 0, kv_heads: int = 2,
             heads: int = 4):
    from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                              Qwen2Config)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=2048)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    model.generation_config.pad_token_id = 0
    return model


def clone_model(model):
    """A second model with the same weights (so eager and compiled runs are independent)."""
    import copy

    return copy.deepcopy(model)


class HandBlock(nn.Module):
    """One decoder block; attention inline (``sdpa`` or eager ``softmax(q kᵀ s) v``)."""

    def __init__(self, dim=64, heads=4, kv_heads=2, eager=False):
        super().__init__()
        self.h, self.hkv, self.d, self.eager = heads, kv_heads, dim // heads, eager
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)
        self.ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, past):
        B, T, _ = x.shape
        y = self.ln(x)
        q = self.q(y).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(y).view(B, T, self.hkv, self.d).transpose(1, 2)
        v = self.v(y).view(B, T, self.hkv, self.d).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        L, g = k.shape[2], self.h // self.hkv
        if self.eager:
            kk = k.repeat_interleave(g, dim=1)
            vv = v.repeat_interleave(g, dim=1)
            s = q @ kk.transpose(-2, -1) * (self.d ** -0.5)
            masked = torch.ones(T, L, dtype=torch.bool, device=x.device).triu(L - T + 1)
            s = s.masked_fill(masked, float("-inf"))
            a = torch.softmax(s, dim=-1) @ vv
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=g > 1)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(x), (k, v)


class HandDecoder(nn.Module):
    """A decoder with its own list cache: ``forward(ids, cache) -> (logits, cache)``."""

    def __init__(self, layers=2, eager=False, dim=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(2048, dim)
        self.blocks = nn.ModuleList([HandBlock(dim, eager=eager) for _ in range(layers)])
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids, cache=None):
        T = ids.shape[1]
        past = 0 if cache is None else cache[0][0].shape[2]
        x = self.emb(ids) + self.pos(torch.arange(past, past + T, device=ids.device))
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if cache is None else cache[i])
            new.append(kv)
        return self.head(x), new


def hand_decode(model, ids, steps):
    """Greedy decode loop over a hand-written decoder: (logits per step, tokens)."""
    logits, cache = model(ids)
    out_logits, toks = [logits[:, -1]], []
    for _ in range(steps - 1):
        tok = out_logits[-1].argmax(-1, keepdim=True)
        toks.append(tok)
        logits, cache = model(tok, cache)
        out_logits.append(logits[:, -1])
    return torch.stack(out_logits, 1), cache


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def hf_decode(model, ids, steps, attention_mask=None):
    """Greedy decode loop calling ``model(...)`` directly (for ``torch.compile`` wrappers, whose
    ``.generate`` would bypass the compiled module)."""
    from transformers import DynamicCache

    inner = getattr(model, "_orig_mod", model)
    kw = cache_kwarg(inner)
    cache = DynamicCache(config=inner.config)
    mask = attention_mask
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})
    logits = [out.logits[:, -1]]
    for _ in range(steps - 1):
        tok = logits[-1].argmax(-1, keepdim=True)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tok, attention_mask=mask, use_cache=True, **{kw: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache
