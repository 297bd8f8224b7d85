"""``kvfx bench kernels``: kvfx's attention entry points against ``F.scaled_dot_product_attention``
on the same shapes, over a grid of context lengths, batch sizes and head dims.

Cases (each timed next to SDPA on the same q, k, v; kvfx's time ÷ SDPA's is the ratio):

    prefill         kvfx.templates.launch.prefill_attention(q, k, v, causal)      vs causal SDPA
    prefill+scores  the same with scores="window_colsum" (SnapKV votes, fused)    vs causal SDPA
    decode          decode_attention(q, k, v, lengths) over a full store          vs SDPA, 1 query
    decode+calib    decode_attention(..., calib=(o_e, lse_e, use)) (CaliDrop)      vs SDPA, 1 query
    decode+softcap  decode_attention(..., softcap=50) (Gemma-2's logit cap)       vs SDPA, 1 query, no cap
    decode+quant    launch_quant.quant_decode_attention over a KIVI store of the
                    same context (K and V at ``quant_bits``, a ``group``-token
                    full-precision residual)                                      vs SDPA, 1 query, dense
    decode+latent   launch_lowrank.latent_decode_attention over a ReCalKV latent
                    store of the same context (keep-rank ``latent_keep``: latents
                    of r = keep·Hkv·d per token, keys rebuilt and re-rotated)     vs SDPA, 1 query, dense

On CUDA the kvfx entry points run their Triton kernels and both sides are timed with
``triton.testing.do_bench`` (median, L2 flushed between repetitions). ``bytes`` is every input
byte read once (q, the K/V store or the quantized codes, scales and residual, lengths, the
calibration partition): the least any kernel must move; split-K partials are not counted.
Achieved bandwidth = bytes / time, and its fraction of the device's peak (:data:`PEAK_BANDWIDTH`,
from vendor datasheets; otherwise the driver's memory clock × bus width via
``triton.testing.get_dram_gbps``, or ``peak_bw`` given by hand). Prefill also gets TFLOP/s
(4·B·Hq·n·n·d, halved for causal); it is compute bound, so its bandwidth says little. Prefill
runs only up to ``prefill_max_context`` (32k on CUDA by default: its cost grows with n²).

On CPU the kvfx entry points run their PyTorch references (``kvfx.methods``), not Triton kernels:
the results are labelled "CPU reference path", timed with ``time.perf_counter`` (median of
repetitions), use small sizes by default and say nothing about kernel speed.

Example::

    from kvfx.bench.kernels import default_grid, run_kernels, write_outputs
    result = run_kernels(default_grid("cpu"), device="cpu")
    write_outputs(result, "runs/bench/kernels")     # kernels.json, kernels.md
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvfx.bench.measure import environment, median, ratio

__all__ = ["CASES", "PEAK_BANDWIDTH", "Shape", "default_grid", "markdown_table", "peak_bandwidth",
           "run_kernels", "write_outputs"]

CASES = ("prefill", "prefill+scores", "decode", "decode+calib", "decode+softcap", "decode+quant",
         "decode+latent")
SOFTCAP = 50.0  # decode+softcap: Gemma-2's attn_logit_softcapping
_VS_DECODE = ("decode+calib", "decode+softcap", "decode+quant", "decode+latent")
LATENT_KEEP = 0.5
CPU_LABEL = "CPU reference path (kvfx ops run their PyTorch references, not Triton kernels)"
PREFILL_MAX_CONTEXT = 32768  # CUDA default: prefill is quadratic, 128k x batch 16 would take minutes

# (substring of torch.cuda.get_device_name, peak DRAM bytes/s, source); the first match wins, so
# more specific names come first ("A100 80GB PCIe" before "A100", "L40S" before "L4"). None: the
# name alone does not tell the memory (GH200 ships with HBM3 or HBM3e), use the driver's number.
PEAK_BANDWIDTH = (
    ("GH200", None, "GH200 comes with 96 GB HBM3 (4.0 TB/s) or 144 GB HBM3e (4.9 TB/s)"),
    ("H200", 4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e"),
    ("H100 NVL", 3.9e12, "NVIDIA H100 datasheet: H100 NVL 3.9 TB/s"),
    ("H100 PCIe", 2.0e12, "NVIDIA H100 datasheet: H100 PCIe 2.0 TB/s"),
    ("H100", 3.35e12, "NVIDIA H100 datasheet: H100 SXM 3.35 TB/s"),
    ("A100 80GB PCIe", 1.935e12, "NVIDIA A100 datasheet: 80GB PCIe 1,935 GB/s"),
    ("A100-SXM4-80GB", 2.039e12, "NVIDIA A100 datasheet: 80GB SXM 2,039 GB/s"),
    ("A100", 1.555e12, "NVIDIA A100 datasheet: 40GB 1,555 GB/s"),
    ("L40S", 864e9, "NVIDIA L40S datasheet: 864 GB/s"),
    ("L4", 300e9, "NVIDIA L4 datasheet: 300 GB/s"),
    ("A10G", 600e9, "NVIDIA A10G (AWS): 600 GB/s"),
    ("A10", 600e9, "NVIDIA A10 datasheet: 600 GB/s"),
    ("RTX 4090", 1.008e12, "NVIDIA GeForce RTX 4090 specifications: 1,008 GB/s"),
)


@dataclass(frozen=True)
class Shape:
    batch: int
    context: int  # prompt length (prefill) or store length (decode)
    head_dim: int
    q_heads: int
    kv_heads: int
    dtype: str  # "float32" | "float16" | "bfloat16"


def default_grid(device: str, *, contexts=None, batches=None, head_dims=None, heads=None,
                 dtype: str | None = None) -> list[Shape]:
    """The shapes to time. CUDA: context 1k–128k, batch 1–16, head_dim 64/128, fp16. CPU: small
    (context 256/1k, batch 1/2, head_dim 64, 8/2 heads, fp32) unless given."""
    cuda = torch.device(device).type == "cuda"
    contexts = contexts or ([1024, 4096, 16384, 65536, 131072] if cuda else [256, 1024])
    batches = batches or ([1, 4, 16] if cuda else [1, 2])
    head_dims = head_dims or ([64, 128] if cuda else [64])
    heads = heads or ((32, 8) if cuda else (8, 2))
    dtype = dtype or ("float16" if cuda else "float32")
    return [Shape(b, n, d, heads[0], heads[1], dtype)
            for d, b, n in itertools.product(head_dims, batches, contexts)]


def peak_bandwidth(device, override: float | None = None) -> tuple[float | None, str]:
    """(bytes/s, where the number comes from) of ``device``'s DRAM; (None, why) when unknown."""
    if override:
        return override, "given with --peak-bw"
    if torch.device(device).type != "cuda":
        return None, "no peak for CPU runs"
    name = torch.cuda.get_device_name(device)
    for key, bw, source in PEAK_BANDWIDTH:
        if key in name:
            if bw is not None:
                return bw, source
            break
    try:
        import triton.testing

        with torch.cuda.device(device):
            return triton.testing.get_dram_gbps() * 1e9, (
                f"{name}: driver memory clock x bus width (triton.testing.get_dram_gbps)")
    except Exception as e:  # noqa: BLE001 - report, never guess
        return None, f"{name}: not in PEAK_BANDWIDTH and the driver query failed ({e})"


# --------------------------------------------------------------------------------------------- cases


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _make_case(case: str, s: Shape, device, quant_bits: int, group: int, window: int):
    """(kvfx_fn, sdpa_fn, bytes read by kvfx, bytes read by sdpa, flops, compare outputs?), or
    a string saying why the case cannot run on this shape."""
    from kvfx.templates.launch import decode_attention, prefill_attention

    dt = getattr(torch, s.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    B, n, d, Hq, Hkv = s.batch, s.context, s.head_dim, s.q_heads, s.kv_heads

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    scale = d ** -0.5
    k, v = rnd(B, Hkv, n, d), rnd(B, Hkv, n, d)
    if case.startswith("prefill"):
        q = rnd(B, Hq, n, d)
        scores = "window_colsum" if case == "prefill+scores" else "none"
        kv_fn = lambda: prefill_attention(q, k, v, scale=scale, causal=True, scores=scores,
                                          window=window)
        sd_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                       enable_gqa=Hq != Hkv)
        b = _nbytes(q, k, v)
        return kv_fn, sd_fn, b, b, 2.0 * B * Hq * n * n * d, case == "prefill"
    q = rnd(B, Hq, 1, d)
    sd_fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=Hq != Hkv)
    sd_bytes = _nbytes(q, k, v)
    flops = 4.0 * B * Hq * n * d
    if case == "decode+latent":
        from kvfx.templates.launch_lowrank import latent_decode_attention

        r = max(16, int(LATENT_KEEP * Hkv * d) // 16 * 16)
        zk, zv = rnd(B, n, r), rnd(B, n, r)
        qk = torch.linalg.qr(torch.randn(Hkv * d, r, generator=g, device=device))[0]
        qv = torch.linalg.qr(torch.randn(Hkv * d, r, generator=g, device=device))[0]
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos().to(dt).expand(B, n, d).contiguous(), emb.sin().to(dt).expand(B, n, d).contiguous()
        pos = torch.arange(n, device=device, dtype=torch.int32).expand(B, n).contiguous()
        lens = torch.full((B,), n, dtype=torch.int32, device=device)
        kv_fn = lambda: latent_decode_attention(q, zk, zv, lens, pos, cos, sin, qk, qv, scale=scale)
        return kv_fn, sd_fn, _nbytes(q, zk, zv, pos, lens, cos, sin, qk, qv), sd_bytes, flops, False
    if case == "decode+quant":
        kv = _quant_store(k, v, quant_bits, group)
        if isinstance(kv, str):
            return kv
        from kvfx.templates.launch_quant import quant_decode_attention

        kv_fn = lambda: quant_decode_attention(q, kv, scale=scale)
        qb = _nbytes(q, kv.kcodes, kv.kscale, kv.kmin, kv.vcodes, kv.vscale, kv.vmin, kv.rk, kv.rv)
        return kv_fn, sd_fn, qb, sd_bytes, flops, False
    lengths = torch.full((B, Hkv), n, dtype=torch.int32, device=device)
    calib = None
    if case == "decode+calib":
        calib = (torch.randn(B, Hq, d, generator=g, device=device), torch.randn(B, Hq, generator=g, device=device),
                 torch.ones(B, Hq, dtype=torch.bool, device=device))
    softcap = SOFTCAP if case == "decode+softcap" else None
    kv_fn = lambda: decode_attention(q, k, v, lengths, scale=scale, calib=calib, softcap=softcap)
    return kv_fn, sd_fn, sd_bytes + _nbytes(lengths, *(calib or ())), sd_bytes, flops, case == "decode"


def _quant_store(k, v, bits: int, group: int):
    """A KIVI store of k, v: all but the last ``group`` tokens (rounded down to whole groups)
    quantized, the rest a full-precision residual; a string saying why when there is none."""
    try:
        from kvfx.methods.quant_attention import QuantKV
        from kvfx.templates.launch_quant import quant_compress_keys, quant_compress_values
    except ImportError as e:
        return f"kvfx.templates.launch_quant is not importable ({e})"
    n = k.shape[2]
    nq = max(0, (n - group) // group * group)
    if nq == 0:
        return f"context {n} < 2 x group {group}: nothing to quantize"
    qk = quant_compress_keys(k[:, :, :nq].contiguous(), bits, group)
    vgroup = min(group, v.shape[3])  # value groups run along the head dim
    qv = quant_compress_values(v[:, :, :nq].contiguous(), bits, vgroup)
    rk, rv = k[:, :, nq:].contiguous(), v[:, :, nq:].contiguous()
    return QuantKV(qk.codes, qk.scale, qk.min, qv.codes, qv.scale, qv.min, rk, rv, None, None, None, None,
                   bits, group, bits, vgroup, n=n, nk=nq, nv=nq)


# --------------------------------------------------------------------------------------------- timing


def _time_ms(fn, device, *, min_time: float = 0.2, max_reps: int = 50) -> tuple[float, float | None]:
    """(median, min) milliseconds per call: triton's do_bench on CUDA (median only), perf_counter
    repetitions on CPU (on a loaded machine the min is the steadier of the two)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")), None
    fn()  # warm-up (first-call allocations, lazy imports)
    times, spent = [], 0.0
    while len(times) < 3 or (spent < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return 1e3 * median(times), 1e3 * min(times)


def _max_diff(a, b) -> float:
    a = a[0] if isinstance(a, tuple) else a
    return float((a.float() - b.float()).abs().max())


def run_kernels(shapes, *, device="cpu", cases=CASES, quant_bits: int = 2, group: int = 32,
                window: int = 32, peak_bw: float | None = None, min_time: float = 0.2,
                prefill_max_context: int | None = None, command: str = "", progress: bool = True) -> dict:
    """Time every case on every shape; see the module docstring. Returns
    ``{"meta": {...}, "rows": [...]}`` with one row per (case, shape). Prefill cases (quadratic in
    the context) run only up to ``prefill_max_context`` tokens (default: 32k on CUDA, all on CPU)."""
    from tqdm.auto import tqdm

    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"kvfx bench kernels: unknown case(s) {unknown}, expected some of {', '.join(CASES)}")
    device = torch.device(device)
    peak, peak_source = peak_bandwidth(device, peak_bw)
    rows = []
    if prefill_max_context is None:
        prefill_max_context = PREFILL_MAX_CONTEXT if device.type == "cuda" else max((s.context for s in shapes), default=0)
    jobs = [(c, s) for s in shapes for c in cases
            if not c.startswith("prefill") or s.context <= prefill_max_context]
    bar = tqdm(jobs, desc="bench kernels", unit="case", disable=not progress)
    for case, s in bar:
        bar.set_postfix_str(f"{case} B={s.batch} n={s.context} d={s.head_dim}")
        made = _make_case(case, s, device, quant_bits, group, window)
        if isinstance(made, str):
            rows.append({"case": case, **asdict(s), "skipped": made})
            continue
        kv_fn, sd_fn, kv_bytes, sd_bytes, flops, compare = made
        kv_out, sd_out = kv_fn(), sd_fn()  # also the first call: Triton compiles, lazy imports
        diff = _max_diff(kv_out, sd_out) if compare else None
        del kv_out, sd_out
        kv_ms, kv_min = _time_ms(kv_fn, device, min_time=min_time)
        sd_ms, sd_min = _time_ms(sd_fn, device, min_time=min_time)
        row = {"case": case, **asdict(s), "kvfx_ms": kv_ms, "sdpa_ms": sd_ms, "ratio": ratio(kv_ms, sd_ms),
               "kvfx_ms_min": kv_min, "sdpa_ms_min": sd_min,
               "kvfx_bytes": kv_bytes, "sdpa_bytes": sd_bytes,
               "kvfx_gbps": kv_bytes / kv_ms / 1e6, "sdpa_gbps": sd_bytes / sd_ms / 1e6,
               "flops": flops, "kvfx_tflops": flops / kv_ms / 1e9, "sdpa_tflops": flops / sd_ms / 1e9,
               "max_abs_diff": diff}
        if peak:
            row["kvfx_frac_peak"] = row["kvfx_gbps"] * 1e9 / peak
            row["sdpa_frac_peak"] = row["sdpa_gbps"] * 1e9 / peak
        rows.append(row)
        del kv_fn, sd_fn, made
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_vs_decode(rows)
    env = environment(device)
    meta = {"command": command, "path": CPU_LABEL if device.type != "cuda" else "CUDA: Triton kernels",
            "timer": "triton.testing.do_bench (median)" if device.type == "cuda"
            else f"time.perf_counter, median of >= 3 repetitions over >= {min_time} s",
            "peak_bandwidth": peak, "peak_bandwidth_source": peak_source, "quant_bits": quant_bits,
            "group": group, "window": window, "prefill_max_context": prefill_max_context, **env}
    return {"meta": meta, "rows": rows}


def _add_vs_decode(rows: list[dict]) -> None:
    """decode+calib, decode+softcap, decode+quant and decode+latent rows: their kvfx time ÷ plain kvfx
    decode's on the same shape."""
    shape = ("batch", "context", "head_dim", "q_heads", "kv_heads", "dtype")
    plain = {tuple(r[f] for f in shape): r for r in rows if r["case"] == "decode" and "kvfx_ms" in r}
    for r in rows:
        ref = plain.get(tuple(r[f] for f in shape))
        if r["case"] in _VS_DECODE and "kvfx_ms" in r and ref is not None:
            r["vs_decode"] = ratio(r["kvfx_ms"], ref["kvfx_ms"])


# --------------------------------------------------------------------------------------------- output


def _f(v, fmt=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown_table(result: dict) -> str:
    m = result["meta"]
    cpu = not m["device"].startswith("cuda")
    peak = f"{m['peak_bandwidth'] / 1e12:.2f} TB/s ({m['peak_bandwidth_source']})" if m["peak_bandwidth"] \
        else m["peak_bandwidth_source"]
    head = ("| case | B | context | d | Hq/Hkv | dtype | kvfx ms | SDPA ms | kvfx/SDPA | kvfx GB/s | SDPA GB/s "
            "| kvfx %peak | SDPA %peak | kvfx TFLOP/s | ÷ kvfx decode | max abs diff |")
    lines = ["# kvfx bench kernels" + (f": {CPU_LABEL}" if cpu else ""), "",
             *([f"`{m['command']}`", ""] if m.get("command") else []),
             (f"{m['device']} ({m['device_name']}), torch {m['torch']}, triton {m['triton']}, kvfx {m['kvfx']}, "
              f"{m['torch_threads']} threads, load average {m.get('loadavg')}, {m['time']}. Timer: {m['timer']}. "
              f"Peak bandwidth: {peak}."), "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        shape = f"| {r['batch']} | {r['context']} | {r['head_dim']} | {r['q_heads']}/{r['kv_heads']} | {r['dtype']}"
        if "skipped" in r:
            lines.append(f"| {r['case']} {shape} | skipped: {r['skipped']} |" + " – |" * 9)
            continue
        pk = [_f(100 * r[f], ".1f") if f in r else "–" for f in ("kvfx_frac_peak", "sdpa_frac_peak")]
        lines.append(f"| {r['case']} {shape} | {_f(r['kvfx_ms'])} | {_f(r['sdpa_ms'])} | {_f(r['ratio'], '.2f')} "
                     f"| {_f(r['kvfx_gbps'], '.1f')} | {_f(r['sdpa_gbps'], '.1f')} | {pk[0]} | {pk[1]} "
                     f"| {_f(r['kvfx_tflops'], '.3f')} | {_f(r.get('vs_decode'), '.2f')} "
                     f"| {_f(r['max_abs_diff'], '.1e')} |")
    lines += ["", (
        "kvfx/SDPA: kvfx time ÷ SDPA time on the same inputs (< 1: kvfx faster). GB/s: bytes of every input "
        "read once ÷ time (decode+quant / decode+latent: kvfx reads the quantized / latent store, SDPA the "
        "dense one); %peak: of the peak bandwidth above. ÷ kvfx decode: decode+calib / decode+softcap / "
        "decode+quant / decode+latent time ÷ plain kvfx decode on the same shape. max abs diff: kvfx output vs "
        f"SDPA (prefill, decode only). softcap: {SOFTCAP:g} (SDPA runs uncapped). quant: {m['quant_bits']}-bit "
        f"K and V, group {m['group']}; latent: keep-rank {LATENT_KEEP}; scores window {m['window']}.")]
    if cpu:
        lines.append(f"**{CPU_LABEL}**: these times are PyTorch reference math on CPU, not kernel speed.")
    return "\n".join(lines)


def write_outputs(result: dict, out: str | Path) -> dict[str, Path]:
    """``OUT/kernels.json`` and ``OUT/kernels.md``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "kernels.json", "md": out / "kernels.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown_table(result) + "\n")
    return paths
