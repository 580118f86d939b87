"""The decoding step's small passes (csrc/decode_glue.c) against what transformers computes: the RMS norm
(LlamaRMSNorm), the rotary embedding (apply_rotary_pos_emb with LlamaRotaryEmbedding's tables) and the
MLP's SiLU gate; and their PyTorch forms (zoo.kernels.native off) against the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from zoo.kernels import native
from zoo.kernels.decode_glue import rms_norm, rotate_heads_, silu_mul_

needs_compiler = pytest.mark.skipif(native.find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(params=["c", "torch"])
def form(request):
    """Each test runs the C form and the PyTorch form (the C one where a compiler is found)."""
    if request.param == "c":
        if native.find_compiler() is None:
            pytest.skip("no C compiler on this machine")
        assert native.library("decode_glue") is not None, native.unavailable_reason("decode_glue")
        yield "c"
    else:
        with native.disabled():
            yield "torch"


def close(actual, expected, tol=2e-6):
    """max |actual - expected| <= tol * max |expected|."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("shape", [(1, 576), (5, 37), (2, 3, 64)])
def test_rms_norm_is_transformers_norm(form, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        expected = norm(x)
    before = x.clone()
    close(rms_norm(x, norm.weight.detach(), norm.variance_epsilon), expected)
    assert torch.equal(x, before)  # a new tensor, the input kept


def test_rms_norm_eps_counts(form):
    x = torch.full((1, 8), 1e-3)
    w = torch.ones(8)
    close(rms_norm(x, w, 1e-6), x / (1e-6 + 1e-6) ** 0.5)  # mean(x^2) = 1e-6: eps is half the denominator


@pytest.mark.parametrize("batch,heads,dim", [(1, 9, 64), (3, 2, 16), (2, 1, 6)])
def test_rotation_is_transformers_rotary_embedding(form, batch, heads, dim):
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, head_dim=dim, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([[5], [1000], [0]])[:batch]  # each row at its own position
    x = torch.randn(batch, heads * dim, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary(x, positions)  # [B, 1, dim]
    q = x.view(batch, 1, heads, dim).transpose(1, 2)  # [B, heads, 1, dim], transformers' layout
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
    out = rotate_heads_(x, cos.view(batch, dim).contiguous(), sin.view(batch, dim).contiguous())
    assert out is x  # in place
    close(x.view(batch, heads, 1, dim), expected)


def test_rotation_refuses_tables_that_do_not_fit(form):
    with pytest.raises(ValueError, match=r"rotate_heads_: x \(2, 10\) is not \[B, heads \* dim\]"):
        rotate_heads_(torch.zeros(2, 10), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="with an even dim"):
        rotate_heads_(torch.zeros(1, 6), torch.zeros(1, 3), torch.zeros(1, 3))


def test_silu_gate_is_silu_times_up(form):
    g = torch.Generator().manual_seed(2)
    gate = torch.cat(
        [torch.randn(2, 1531, generator=g) * 4, torch.tensor([[-100.0, -30.0, 0.0, 30.0, 100.0]] * 2)], 1
    )
    up = torch.randn_like(gate)
    expected = F.silu(gate) * up
    out = silu_mul_(gate, up)
    assert out is gate
    close(gate, expected)
    assert torch.isfinite(gate).all()


def test_shapes_are_checked(form):
    with pytest.raises(ValueError, match=r"rms_norm: weight \(7,\) does not match x \(2, 8\)"):
        rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match=r"silu_mul_: gate \(1, 4\) and up \(1, 5\) differ"):
        silu_mul_(torch.zeros(1, 4), torch.zeros(1, 5))


@needs_compiler
def test_the_c_form_runs_only_on_contiguous_cpu_fp32(monkeypatch):
    asked = []
    real = native.function
    monkeypatch.setattr(native, "function", lambda name, *a, **k: asked.append(name) or real(name, *a, **k))
    x, w = torch.randn(2, 8), torch.ones(8)
    rms_norm(x, w, 1e-6)
    assert asked == ["decode_glue"]
    asked.clear()
    rms_norm(x.double(), w.double(), 1e-6)
    rms_norm(torch.randn(8, 2).t(), w, 1e-6)  # not contiguous
    assert asked == []
    close(rms_norm(x.double(), w.double(), 1e-6), F.rms_norm(x.double(), (8,), w.double(), 1e-6))
