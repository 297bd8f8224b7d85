"""why_no_attention: when find_attention finds no site, say what attention-like computation the
graph has and why kvfx does not recognize it (or "" when there is none)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph

from kvfx.passes.diagnose import attention_like_ops, why_no_attention
from kvfx.passes.find_attention import find_attention

B, T, DIM, H = 1, 6, 32, 4
D = DIM // H


def capture(model, *args):
    """The dynamo FX graph(s) of model(*args), as a torch.compile backend receives them."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.graph)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


class Attn(nn.Module):
    """A hand-written attention layer; ``scores``/``combine`` are what the subclasses vary."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def heads(self, x):
        b, t, _ = x.shape
        return [z.view(b, t, H, D).transpose(1, 2) for z in self.qkv(x).chunk(3, -1)]

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = self.scores(q, k, mask)
        out = torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o(out.transpose(1, 2).reshape(x.shape))

    def scores(self, q, k, mask):
        return torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask


class SoftCapAttn(Attn):
    """Gemma-2 eager attention: logits soft-capped with tanh before the mask."""

    cap = 50.0

    def scores(self, q, k, mask):
        s = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
        s = s / self.cap
        s = torch.tanh(s)
        s = s * self.cap
        return s + mask


class EinsumAttn(Attn):
    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D) + mask
        out = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)
        return self.o(out.transpose(1, 2).reshape(x.shape))


def distance_bias(s):
    """A custom relative-position penalty, subtracted from the scores."""
    n = s.shape[-1]
    pos = torch.arange(n, dtype=s.dtype)
    return s - 0.1 * (pos[:, None] - pos[None, :]).abs()


class BiasFnAttn(Attn):
    def scores(self, q, k, mask):
        return distance_bias(torch.matmul(q, k.transpose(2, 3)) * D**-0.5) + mask


class ClampAttn(Attn):
    def scores(self, q, k, mask):
        return torch.clamp(torch.matmul(q, k.transpose(2, 3)) * D**-0.5, -30.0, 30.0) + mask


class BmmAttn(Attn):
    """Heads folded into the batch dim: (B*H, T, d), as older GPT-style code writes it."""

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, H, D).transpose(1, 2).reshape(b * H, t, D)
                   for z in self.qkv(x).chunk(3, -1))
        s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D) + mask[0]
        out = torch.bmm(torch.softmax(s, dim=-1), v).view(b, H, t, D)
        return self.o(out.transpose(1, 2).reshape(x.shape))


class PreTransposedKey(Attn):
    """kᵀ built by the projection itself (view to (B, H, d, T)): no transpose before the matmul."""

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, v = (z.view(b, t, H, D).transpose(1, 2) for z in (q, v))
        kt = k.view(b, t, H, D).permute(0, 2, 3, 1).contiguous()
        s = torch.matmul(q, kt) * D**-0.5 + mask
        out = torch.matmul(s.softmax(-1), v)
        return self.o(out.transpose(1, 2).reshape(x.shape))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x, mask):
        return self.down(F.gelu(self.up(x)))


class Router(nn.Module):
    """A MoE router: a softmax over projection logits that feeds no second product."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(DIM, 4))

    def forward(self, x, mask):
        w, idx = torch.topk(torch.softmax(x @ self.gate, dim=-1), 2, dim=-1)
        return w, idx


def graph_of(cls, layers=1):
    torch.manual_seed(0)
    model = cls().eval() if layers == 1 else nn.Sequential(*[cls() for _ in range(layers)]).eval()
    x = torch.randn(B, T, DIM)
    mask = torch.triu(torch.full((T, T), -1e9), 1)[None, None]
    if layers > 1:
        return capture(lambda x, m: model[1](model[0](x, m), m), x, mask)
    return capture(model, x, mask)


class OddCapAttn(Attn):
    """tanh between two different constants: not a soft-cap kvfx can carry."""

    def scores(self, q, k, mask):
        s = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
        return torch.tanh(s / 30.0) * 50.0 + mask


class MaskInsideCapAttn(Attn):
    """The mask added inside the tanh: capped too, so it no longer masks."""

    def scores(self, q, k, mask):
        s = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask
        return torch.tanh(s / 50.0) * 50.0


class MulCapAttn(Attn):
    """The cap's division written as a product with its inverse."""

    def scores(self, q, k, mask):
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
        return 30.0 * torch.tanh((1 / 30.0) * s) + mask


@pytest.mark.parametrize("cls, cap", [(SoftCapAttn, 50.0), (MulCapAttn, 30.0)])
def test_soft_capping_recognized(cls, cap):
    (m,) = find_attention(graph_of(cls))
    assert m.softcap == cap and m.scale == pytest.approx(D**-0.5) and m.mask_kind == "additive"
    assert m.reason == ""


def test_soft_capping_mask_inside_the_cap_is_refused():
    (m,) = find_attention(graph_of(MaskInsideCapAttn))
    assert m.softcap == 50.0 and "before the soft-cap" in m.reason


def test_soft_capping_unsupported_form():
    g = graph_of(OddCapAttn)
    assert find_attention(g) == []
    msg = why_no_attention(g)
    assert "soft-capping" in msg and "tanh" in msg and "not support" in msg
    assert "mul, truediv, tanh, mul, add" in msg


def test_soft_capping_counts_sites():
    msg = why_no_attention(graph_of(OddCapAttn, layers=2))
    assert "soft-capping" in msg and "in module 0 " in msg
    assert msg.endswith("(2 sites like this in the graph).")


def test_hf_gemma2_eager_soft_capping_recognized():
    tr = pytest.importorskip("transformers")
    if not hasattr(tr, "Gemma2Config"):
        pytest.skip("no Gemma-2 in this transformers")
    cfg = tr.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          attn_implementation="eager")
    torch.manual_seed(0)
    model = tr.Gemma2ForCausalLM(cfg).eval()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.graph)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 64, (1, 6)))
    assert graphs and all(m.softcap == 50.0 for g in graphs for m in find_attention(g))
    assert sum(len(find_attention(g)) for g in graphs) >= 2
    assert why_no_attention(graphs[0]) == ""


def test_einsum():
    g = graph_of(EinsumAttn)
    assert find_attention(g) == []
    msg = why_no_attention(g)
    assert "einsum" in msg and "'bhqd,bhkd->bhqk'" in msg and "torch.matmul" in msg
    assert attention_like_ops(g) == [
        "einsum 'bhqd,bhkd->bhqk' → truediv → add → softmax → einsum 'bhqk,bhkd->bhqd'"]


@pytest.mark.parametrize("cls, op", [(BiasFnAttn, "sub"), (ClampAttn, "clamp")])
def test_unrecognized_op_between_matmul_and_softmax(cls, op):
    g = graph_of(cls)
    assert find_attention(g) == []
    msg = why_no_attention(g)
    assert msg.startswith("Saw a softmax over a q·kᵀ product")
    assert f"the ops between the matmul and the softmax ({op})" in msg
    assert "not in the chain kvfx recognizes" in msg


def test_bmm_3d():
    g = graph_of(BmmAttn)
    assert find_attention(g) == []
    msg = why_no_attention(g)
    assert "3-D bmm attention (heads folded into batch)" in msg
    assert f"scores of shape ({B * H}, {T}, {T})" in msg
    assert "bmm → truediv → add → softmax → bmm" in msg


def test_key_not_transposed():
    g = graph_of(PreTransposedKey)
    assert find_attention(g) == []
    msg = why_no_attention(g)
    assert "second operand comes from contiguous" in msg and "permute(0, 1, 3, 2)" in msg


@pytest.mark.parametrize("cls", [MLP, Router])
def test_nothing_attention_like(cls):
    g = graph_of(cls)
    assert why_no_attention(g) == ""
    assert attention_like_ops(g) == []


def test_recognized_attention_is_not_diagnosed():
    g = graph_of(Attn)
    assert len(find_attention(g)) == 1
    assert why_no_attention(g) == ""


def test_odd_graphs_do_not_raise():
    assert why_no_attention(Graph()) == ""
    g = Graph()
    x = g.placeholder("x")
    s = g.call_method("softmax", (x,))  # no dim, no product behind it
    g.call_function(torch.matmul, (s, s))
    g.output(g.call_function(torch.softmax, (g.call_function(torch.bmm, (x, x)), "dim")))
    assert isinstance(why_no_attention(g), str)
    assert why_no_attention(None) == ""
    assert attention_like_ops(None) == []


def test_other_attention_function():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, H, batch_first=True).eval()
    x = torch.randn(B, T, DIM)
    g = capture(mha, x, x, x)
    assert find_attention(g) == []
    msg = why_no_attention(g)
    assert msg.startswith("Saw a call to multi_head_attention_forward")
    assert "F.scaled_dot_product_attention" in msg
