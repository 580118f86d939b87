"""A converted model's decoding step without transformers' per-layer machinery: one token a row, on the CPU
in fp32.

transformers' forward of a Llama-family layer is some hundred small PyTorch ops and module calls (the RMS
norm alone is five ops, the rotary embedding seven); decoding one token of SmolLM2-135M on a 2-core CPU,
they took about as long as the layer's seven matrix products, whatever attention the layer has. This step
runs the same layers from the same weights with few ops a layer:

    h = rms_norm(x)                      C (zoo.kernels.decode_glue)
    q, k, v = h Wq, h Wk, h Wv           matrix products
    rotate q, k in place                 C
    y = the layer's mixer step           the mixer's own call (C for the window hybrids), state in the cache
    x += y Wo                            one matrix product, in place
    h = rms_norm(x)                      C
    x += (silu(h Wg) * h Wu) Wd          products; the gate in C, the last product in place

then the final norm and the logits. A layer that keeps softmax attention runs transformers' attention
module on h (its keys and values appended to the cache) in place of the four lines about q, k, v and y.
The result is transformers' forward's within float rounding (the tests compare logits and states over
many steps, for every mixer and family, with and without left padding and kept softmax layers).

It runs only where it gives that result, checked at each call: the model in eval mode with no gradient,
one token a row given as ids, a `ZooCache`, every decoder layer a Llama, Mistral, Qwen2 or Qwen3 one whose
attention is a converted layer in its plain mode or that family's softmax attention, plain `nn.Linear`
projections (an unmerged LoRA is not), no forward hooks on the modules it steps past, the current token
not padding, fp32 on the CPU, and no output asked for beyond the logits and the cache. A kept softmax
layer adds two: no padding anywhere in the attention mask and no sliding window in the config (both would
need transformers' mask). Elsewhere `decode_step` returns None and the model runs transformers' forward.
`off()` turns it off within a block (to compare the two); ZOO_LEAN_DECODE=off does for a process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from zoo.cache import CACHE_ARG, ZooCache
from zoo.kernels.decode_glue import rms_norm, rotate_heads_, silu_mul_

__all__ = ["ENV_VAR", "decode_step", "mask_positions", "off", "steps_taken"]

ENV_VAR = "ZOO_LEAN_DECODE"

#: the decoder layers, MLPs and norms whose forward this step repeats (residual + attention(norm(x)), then
#: residual + down(act(gate(h)) * up(h)) on norm(x); the norm w * x / sqrt(mean(x^2) + eps))
DECODER_LAYERS = frozenset(f"{family}DecoderLayer" for family in ("Llama", "Mistral", "Qwen2", "Qwen3"))
MLPS = frozenset(f"{family}MLP" for family in ("Llama", "Mistral", "Qwen2", "Qwen3"))
NORMS = frozenset(f"{family}RMSNorm" for family in ("Llama", "Mistral", "Qwen2", "Qwen3"))
#: the softmax attentions a layer may keep (called as they are, with no mask: see `_fits`)
ATTENTIONS = frozenset(f"{family}Attention" for family in ("Llama", "Mistral", "Qwen2", "Qwen3"))

#: keyword arguments a forward may bring that change nothing here (with these values)
_NEUTRAL = {
    "return_dict": (None, True),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "labels": (None,),
    "inputs_embeds": (None,),
}
_IGNORED = frozenset({"cache_position", "logits_to_keep"})

_off = 0
_taken = 0


def steps_taken() -> int:
    """How many forwards this process has run through `decode_step` (a bench tells its cells apart by it)."""
    return _taken


@contextmanager
def off() -> Iterator[None]:
    """Within the block converted models decode through transformers' forward. Nests."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def _off_by_env() -> bool:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in ("", "on", "off"):
        raise ValueError(f"{ENV_VAR}={value!r} is not a setting; choose on or off")
    return value == "off"


def _plain(*modules: nn.Module) -> bool:
    """No hooks and no forward replaced on any of them (what this step steps past would not run)."""
    return not any(
        m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules if m is not None
    )


def _linears(*modules: nn.Module) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _layer_fits(layer: nn.Module, softmax_allowed: bool) -> bool:
    """A decoder layer this step can run (see the module docstring)."""
    attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
    if type(layer).__name__ not in DECODER_LAYERS or type(mlp).__name__ not in MLPS:
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    projections = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not hasattr(attn, "mixing"):  # softmax attention kept: called as a module, its own hooks run
        if not softmax_allowed or type(attn).__name__ not in ATTENTIONS:
            return False
    elif not attn.mixing:
        return False
    else:
        norms += [n for n in (attn.q_norm, attn.k_norm) if n is not None]
        projections += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    if any(type(n).__name__ not in NORMS for n in norms):
        return False
    return _linears(*projections) and _plain(layer, attn, mlp, *norms, *projections)


def _fits(model: nn.Module, input_ids, cache, attention_mask, kwargs: dict[str, Any]) -> bool:
    if _off or model.training or torch.is_grad_enabled() or not isinstance(cache, ZooCache):
        return False
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return False
    for key, value in kwargs.items():
        if key not in _IGNORED and (key not in _NEUTRAL or value not in _NEUTRAL[key]):
            return False
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if embed is None or embed.weight.dtype != torch.float32 or embed.weight.device.type != "cpu":
        return False
    if not _linears(model.lm_head) or type(inner.norm).__name__ not in NORMS:
        return False
    if not _plain(inner, embed, inner.norm, model.lm_head, *inner.layers):
        return False
    # a kept softmax layer attends to its whole cache with no mask: right only with no padding anywhere
    # and no sliding window (Mistral's, Qwen2's), which transformers puts in the mask
    softmax_allowed = getattr(model.config, "sliding_window", None) is None and (
        attention_mask is None or bool(attention_mask.all())
    )
    layers = inner.layers[: model.config.num_hidden_layers]
    return all(_layer_fits(layer, softmax_allowed) for layer in layers) and not _off_by_env()


def mask_positions(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The positions [B, length] of a forward's last `length` tokens under a 2D attention mask [B, S]: real
    tokens numbered from 0 as in an unpadded batch (left padding), padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def _positions(cache: ZooCache, attention_mask, position_ids) -> torch.Tensor | None:
    """Each row's position [B, 1] or [1, 1] (as the converted model's forward numbers them), or None where
    the current token of some row is padding."""
    if attention_mask is not None:
        if attention_mask.dim() != 2 or not bool(attention_mask[:, -1].all()):
            return None
        if position_ids is None:
            return mask_positions(attention_mask, 1)
    if position_ids is not None:
        return position_ids
    return torch.full((1, 1), cache.get_seq_length(), dtype=torch.long)


def _project(h: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    return F.linear(h, proj.weight, proj.bias)


def _add_projection_(x: torch.Tensor, h: torch.Tensor, proj: nn.Linear) -> None:
    """x += h W^T (+ b), in place."""
    if proj.bias is None:
        x.addmm_(h, proj.weight.t())
    else:
        x.add_(F.linear(h, proj.weight, proj.bias))


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return rms_norm(x, norm.weight, norm.variance_epsilon)


def _heads(x: torch.Tensor, norm: nn.Module | None, dim: int) -> torch.Tensor:
    """A projection [B, heads * dim] with its per-head norm (Qwen3's q_norm, k_norm) where it has one."""
    if norm is None:
        return x
    return _norm(x.view(-1, dim), norm).view(x.shape)


def _mixer_step(attn: nn.Module, x: torch.Tensor, h: torch.Tensor, cos, sin, cache: ZooCache) -> None:
    """x += a converted layer's attention output for h [B, hidden] (its mixer's state moves on in `cache`)."""
    B, D = x.shape[0], attn.head_dim
    q = rotate_heads_(_heads(_project(h, attn.q_proj), attn.q_norm, D), cos, sin)
    k = rotate_heads_(_heads(_project(h, attn.k_proj), attn.k_norm, D), cos, sin)
    v = _project(h, attn.v_proj)
    y = attn.mix(q.view(B, -1, 1, D), k.view(B, -1, 1, D), v.view(B, -1, 1, D), h.view(B, 1, -1), cache, None)
    _add_projection_(x, y.reshape(B, -1), attn.o_proj)


def _softmax_step(attn: nn.Module, x: torch.Tensor, h: torch.Tensor, cos, sin, cache: ZooCache) -> None:
    """x += a kept softmax layer's output for h [B, hidden]: transformers' attention module, its keys and
    values appended to `cache`, no mask (see `_fits`)."""
    B = x.shape[0]
    tables = (cos.view(B, 1, -1), sin.view(B, 1, -1))
    out, _ = attn(h.view(B, 1, -1), position_embeddings=tables, attention_mask=None, **{CACHE_ARG: cache})
    x.add_(out.view(B, -1))


def _layer_step(layer: nn.Module, x: torch.Tensor, cos, sin, cache: ZooCache, silu: bool) -> None:
    """One decoder layer on x [B, hidden], in place; its state (a mixer's, or keys and values) moves on in
    `cache`."""
    attn, mlp = layer.self_attn, layer.mlp
    h = _norm(x, layer.input_layernorm)
    (_mixer_step if hasattr(attn, "mixing") else _softmax_step)(attn, x, h, cos, sin, cache)
    h = _norm(x, layer.post_attention_layernorm)
    gate, up = _project(h, mlp.gate_proj), _project(h, mlp.up_proj)
    _add_projection_(x, silu_mul_(gate, up) if silu else mlp.act_fn(gate) * up, mlp.down_proj)


def decode_step(
    model: nn.Module, input_ids, cache, attention_mask=None, position_ids=None, **kwargs: Any
) -> CausalLMOutputWithPast | None:
    """The converted causal LM's forward for input_ids [B, 1] with `cache` (see the module docstring), or
    None where this step does not apply: the caller then runs transformers' forward."""
    if not _fits(model, input_ids, cache, attention_mask, kwargs):
        return None
    B = input_ids.shape[0]
    positions = _positions(cache, attention_mask, position_ids)
    if positions is None:
        return None
    global _taken
    _taken += 1
    inner = model.model
    x = F.embedding(input_ids.view(B), inner.embed_tokens.weight)  # [B, hidden], ours to change in place
    cos, sin = inner.rotary_emb(x, positions)  # [B or 1, 1, head_dim]
    cos, sin = (t.view(t.shape[0], -1).expand(B, -1).contiguous() for t in (cos, sin))
    silu = model.config.hidden_act == "silu"
    for layer in inner.layers[: model.config.num_hidden_layers]:
        _layer_step(layer, x, cos, sin, cache, silu)
    logits = _project(_norm(x, inner.norm), model.lm_head)
    return CausalLMOutputWithPast(logits=logits.view(B, 1, -1), **{CACHE_ARG: cache})
