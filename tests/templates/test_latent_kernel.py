"""The latent decode kernel (ReCalKV low-rank stores), interpreted on CPU, against its reference
kvfx.methods.lowrank_attention.latent_attention_reference, with the STYLE item-4 oracle: keys
rebuilt from latents and re-rotated at each slot's position, values up-projected once, split-K."""
import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, check_attention  # noqa: E402

from kvfx.methods.lowrank_attention import latent_attention_reference  # noqa: E402
from kvfx.templates import configs, launch_lowrank  # noqa: E402
from kvfx.templates.spec import KernelSpec  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


@st.composite
def latent_cases(draw):
    cap = draw(st.one_of(st.sampled_from([1, 16, 17, 70]), st.integers(1, 160)))
    B = draw(st.integers(1, 2))
    length = st.one_of(st.sampled_from([0, 1, cap]), st.integers(0, cap), st.integers(-2, cap + 5))
    return dict(
        B=B, H=draw(st.integers(1, 3)), g=draw(st.sampled_from([1, 2, 3, 4])), cap=cap,
        heads=draw(st.integers(1, 3)),  # KV heads per program (capped at H): 1, some, all
        lengths=draw(st.lists(length, min_size=B, max_size=B)),
        d=draw(st.sampled_from([32, 64])), rk=draw(st.sampled_from([8, 16, 24, 48, 96])),
        rv=draw(st.sampled_from([8, 16, 40, 64])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        min_split=draw(st.sampled_from([16, 32, 256])), block=draw(st.sampled_from([16, 32, 64])),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, H, g, d, cap = c["B"], c["H"], c["g"], c["d"], c["cap"]
    rk, rv = min(c["rk"], H * d), min(c["rv"], H * d)
    q = torch.randn(B, H * g, 1, d, generator=gen).to(dt)
    qk = torch.linalg.qr(torch.randn(H * d, rk, generator=gen, dtype=torch.float64))[0].float()
    qv = torch.linalg.qr(torch.randn(H * d, rv, generator=gen, dtype=torch.float64))[0].float()
    # latents of a store (B, 1, cap, r) sliced to (B, cap, r); unused slots hold NaN
    zk = (2 * torch.randn(B, 1, cap, rk, generator=gen)).to(dt)[:, 0]
    zv = torch.randn(B, 1, cap, rv, generator=gen).to(dt)[:, 0]
    lengths = torch.tensor(c["lengths"], dtype=torch.int64)
    valid = torch.arange(cap)[None, :] < lengths.clamp(0, cap)[:, None]
    zk = zk.masked_fill(~valid[..., None], float("nan"))
    zv = zv.masked_fill(~valid[..., None], float("nan"))
    T = cap + 50
    pos = torch.randint(0, T, (B, cap), generator=gen).masked_fill(~valid, -1)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    cos = (1.1 * emb.cos()).to(dt).expand(B, T, d).contiguous()  # attention_scaling 1.1
    sin = (1.1 * emb.sin()).to(dt).expand(B, T, d).contiguous()
    return q, zk, zv, lengths, pos, cos, sin, qk, qv


def _run(c):
    q, zk, zv, lengths, pos, cos, sin, qk, qv = _inputs(c)
    scale = c["d"] ** -0.5
    fell_back = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])
        mp.setattr(configs, "LATENT_DECODE_CONFIGS", (configs.AttnConfig(0, c["block"], 2, 1),))
        mp.setattr(configs, "latent_heads_per_program", lambda kv, g, rv: min(c.get("heads", kv), kv))
        mp.setattr(launch_lowrank, "latent_attention_reference",
                   lambda *a, **kw: fell_back.append(1) or latent_attention_reference(*a, **kw))
        got = launch_lowrank.latent_decode_attention(q, zk, zv, lengths, pos, cos, sin, qk, qv, scale=scale)
    assert not fell_back, "the kernel did not run"
    ref_lo = latent_attention_reference(q, zk, zv, lengths, pos, cos, sin, qk, qv, scale=scale)
    golden = latent_attention_reference(q.double(), zk.double(), zv.double(), lengths, pos, cos.double(),
                                        sin.double(), qk.double(), qv.double(), scale=scale)
    valid = torch.arange(c["cap"])[None, :] < lengths.clamp(0, c["cap"])[:, None]
    v = torch.where(valid[..., None], zv.double(), 0) @ qv.double().mT  # the rebuilt values
    check_attention(got, (ref_lo[0], ref_lo[1].float()), golden, v, f"latent decode {c}")


@SETTINGS
@given(latent_cases())
def test_latent_decode_kernel_matches_reference(c):
    _run(c)


@pytest.mark.parametrize("lengths", [[0, 0], [1, 70], [70, 69]])
def test_latent_decode_kernel_edges(lengths):
    # empty rows (o = 0, lse = -inf), one slot, several splits of 16-slot blocks, bf16
    _run(dict(B=2, H=2, g=4, cap=70, lengths=lengths, d=64, rk=96, rv=40, dtype="bf16", min_split=16,
              block=16, seed=sum(lengths)))


def test_heads_per_program_bounds_the_accumulator():
    """All KV heads of a program share each latent read; the accumulator stays in its budget."""
    assert configs.latent_heads_per_program(3, 3, 128) == 3  # SmolLM2 keep 0.5: one read per slot
    assert configs.latent_heads_per_program(8, 4, 512) == 4  # Llama-3-8B keep 0.5: 2 reads per slot
    assert configs.latent_heads_per_program(8, 4, 4096) == 1
    for kv, g, rv in ((3, 3, 128), (8, 4, 512), (32, 1, 64)):
        h = configs.latent_heads_per_program(kv, g, rv)
        assert configs._pow2_at_least(h * g) * rv <= configs.LATENT_ROW_ELEMENTS or h == 1


def test_latent_spec_fields_are_checked():
    s = KernelSpec("latent_decode_attention", "fp16", head_dim=64, gqa_group=3, key_rank=96, value_rank=40)
    assert s.uri.endswith("_rk_96_rv_40")
    with pytest.raises(ValueError, match="key_rank: got 0, expected an int in"):
        KernelSpec("latent_decode_attention", "fp16", head_dim=64)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        KernelSpec("latent_decode_attention", "fp16", head_dim=16, key_rank=8, value_rank=8)
    with pytest.raises(ValueError, match="only latent_decode_attention reads it"):
        KernelSpec("decode_attention", "fp16", head_dim=64, key_rank=8)


def test_shapes_the_kernel_does_not_take_run_the_reference():
    """head_dim 16 (tl.dot needs 16-wide halves): the launcher runs the reference, same results."""
    c = dict(B=1, H=2, g=2, cap=20, lengths=[13], d=32, rk=16, rv=16, dtype="fp32", min_split=16, block=16,
             seed=1)
    q, zk, zv, lengths, pos, cos, sin, qk, qv = _inputs(c)
    q16, cos16, sin16 = q[..., :16].contiguous(), cos[..., :16].contiguous(), sin[..., :16].contiguous()
    qk16 = torch.linalg.qr(torch.randn(32, 16, dtype=torch.float64))[0].float()
    got = launch_lowrank.latent_decode_attention(q16, zk, zv, lengths, pos, cos16, sin16, qk16, qk16, scale=0.25)
    want = latent_attention_reference(q16, zk, zv, lengths, pos, cos16, sin16, qk16, qk16, scale=0.25)
    assert torch.equal(got[0], want[0])
