"""Conversion: swap the attention of chosen layers for the shared wrapper + a registered mixer.

The wrapper keeps the teacher's q/k/v/o projections (and q/k norms where the family has them),
applies RoPE, and calls the mixer. Nothing else changes, so peft can target the projections by
their usual names and the state dict keeps the teacher's keys plus `...self_attn.mixer.*`.

The wrapper owns its modes, entered only through the context managers defined here beside it:
`teacher_forced` (stage 1's attention transfer), `softmax_teacher` (the teacher inside the model, for
stage 2's distillation) and `branch` (one branch of a window hybrid). Each finds the converted layers
of the model it is given (the converted model, or a peft or FSDP wrapper around it), and restores
what they were on exit, also on an exception, so the modes nest.

A converted model becomes an instance of `Zoo<Family>ForCausalLM` (a subclass of the family's
causal LM that knows its mixers from `config.zoo_mixers`), so `save_pretrained` writes a config that
`AutoModelForCausalLM.from_pretrained` reads back once this module is imported (`register_families`
runs at its end), with no remote code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from zoo.cache import CACHE_ARG, ZooCache
from zoo.families import SUPPORTED_FAMILIES
from zoo.kernels.softmax import causal_softmax_attention
from zoo.lean_decode import decode_step, mask_positions
from zoo.mixers.base import Mixer, build_mixer
from zoo.recipe import parse_layers


@dataclass
class ForwardContext:
    """What one forward of a converted model tells its converted layers: the 2D padding mask, set by the
    model's forward and shared by its layers. Modes are not here: each wrapper holds its own."""

    mask: torch.Tensor | None = None  # [B, S] over past + current tokens, 1 real / 0 padding


@dataclass
class _TeacherForcing:
    """Stage 1's mode: a converted layer records its transfer loss in `losses` and passes the teacher's
    output on. `mask` [B, S] serves forwards that bring none (the decoder called directly)."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_ce: float = 0.0  # weight of the attention-weight cross-entropy (0: off)
    attention_ce_max_len: int = 128
    mask: torch.Tensor | None = None


class _SoftmaxTeacher:
    """Distillation's mode: a converted layer computes the teacher's softmax attention."""


_SOFTMAX_TEACHER = _SoftmaxTeacher()


class LinearizedAttention(nn.Module):
    """The shared wrapper: teacher projections + RoPE + a mixer in place of softmax attention.

    Its mode (plain mixer, teacher-forced, softmax teacher) is private: enter one with
    `teacher_forced`, `softmax_teacher` below."""

    def __init__(self, attn: nn.Module, mixer: Mixer, context: ForwardContext | None = None):
        super().__init__()
        context = ForwardContext() if context is None else context
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
        )
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.mixer = mixer
        self.layer_idx = attn.layer_idx
        self.head_dim = mixer.head_dim
        self.scaling = self.head_dim**-0.5
        object.__setattr__(self, "context", context)  # shared, not a submodule
        self._mode: _TeacherForcing | _SoftmaxTeacher | None = None  # None: the mixer

    def project(self, hidden_states: torch.Tensor, position_embeddings):
        """q [B, H, T, D] and k, v [B, Hkv, T, D], normed and rotated as the teacher does."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ):
        cache = past_key_values if cache is None else cache  # the decoder layer's name for it: see CACHE_ARG
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        mode = self._mode
        full_mask = self.context.mask
        if full_mask is None and isinstance(mode, _TeacherForcing):
            full_mask = mode.mask
        mask = None if full_mask is None else full_mask[:, -T:].to(q.device)
        if isinstance(
            mode, _TeacherForcing
        ):  # the teacher's modes use no cache: a forward sees its own tokens
            return self._transfer(q, k, v, hidden_states, mask, mode), None
        if isinstance(mode, _SoftmaxTeacher):
            return self._teacher_output(q, k, v, mask), None
        y = self.mix(q, k, v, hidden_states, cache, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), None

    @property
    def mixing(self) -> bool:
        """True in the plain mode (the mixer's output goes on), False in a teacher's mode."""
        return self._mode is None

    def mix(self, q, k, v, hidden_states, cache, mask):
        """The mixer's output y [B, H, T, D] for q, k, v (projected and rotated) and the layer input
        hidden_states [B, T, hidden], from the state this layer left in `cache` (a ZooCache; the new state
        and token count are written back to it) or from nothing (any other cache, or None)."""
        layer = cache.mixer_layer(self.layer_idx) if isinstance(cache, ZooCache) else None
        y, state = self.mixer(q, k, v, hidden_states, state=None if layer is None else layer.state, mask=mask)
        if layer is not None:
            layer.state, layer.seen = state, layer.seen + q.shape[2]
        return y

    def _teacher_output(self, q, k, v, mask):
        """The teacher's attention output (softmax over q, k, v, then o_proj) [B, T, hidden]."""
        B, _, T, _ = q.shape
        y = causal_softmax_attention(q, k, v, key_mask=mask, scale=self.scaling)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _transfer(self, q, k, v, x, mask, mode: _TeacherForcing):
        """Stage 1: the mixer learns the teacher's output from the same q, k, v; the teacher's flows on."""
        B, T, _ = x.shape
        with torch.no_grad():
            out_teacher = self._teacher_output(q, k, v, mask)
        y, _ = self.mixer(q.detach(), k.detach(), v.detach(), x.detach(), state=None, mask=mask)
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        err = (out.float() - out_teacher.float()).pow(2).mean(-1)  # [B, T]
        loss = err.mean() if mask is None else (err * mask).sum() / mask.sum().clamp(min=1)
        if mode.attention_ce and T <= mode.attention_ce_max_len:
            loss = loss + mode.attention_ce * self._attention_ce(q.detach(), k.detach(), mask)
        mode.losses[self.layer_idx] = loss
        return out_teacher

    def _attention_ce(self, q, k, mask):
        """Hedgehog-style cross-entropy between teacher and mixer attention weights (short T only)."""
        weights = self.mixer.attention_weights(q, k)
        if weights is None:
            return q.new_zeros(())
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q.float() @ kk.float().transpose(-1, -2)) * self.scaling
        T = q.shape[-2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        teacher = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        ce = -(teacher * weights.float().clamp(min=1e-12).log()).sum(-1)  # [B, H, T]
        if mask is not None:
            return (ce * mask[:, None]).sum() / (mask.sum() * ce.shape[1]).clamp(min=1)
        return ce.mean()


# ---------------------------------------------------------------------------------------------
# modes: the only way into the wrapper's modes


def linearized_layers(model: nn.Module) -> list[LinearizedAttention]:
    """Every converted layer inside `model` (a converted model, a peft or FSDP wrapper around one, a
    part of one, or a wrapper itself), in module order."""
    return [module for module in model.modules() if isinstance(module, LinearizedAttention)]


@contextmanager
def _layers_in_mode(
    model: nn.Module, mode: _TeacherForcing | _SoftmaxTeacher, only: Iterable[int] | None = None
) -> Iterator[None]:
    """Every converted layer of `model` (those whose layer index is in `only`, if given) in `mode` within the
    block; each gets its own previous mode back."""
    layers = linearized_layers(model)
    if not layers:
        raise ValueError("the model has no converted layer: call zoo.linearize(model, mixer) first")
    if only is not None:
        wanted = set(only)
        unknown = wanted - {layer.mixer.layer_idx for layer in layers}
        if unknown:
            raise ValueError(f"layer(s) {sorted(unknown)} are not converted layers of the model")
        layers = [layer for layer in layers if layer.mixer.layer_idx in wanted]
    previous = [layer._mode for layer in layers]
    try:
        for layer in layers:
            layer._mode = mode
        yield
    finally:
        for layer, mode_before in zip(layers, previous):
            layer._mode = mode_before


@contextmanager
def teacher_forced(
    model: nn.Module,
    attention_ce: float = 0.0,
    attention_ce_max_len: int = 128,
    mask: torch.Tensor | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Stage 1's attention transfer: `with teacher_forced(model) as losses:` each converted layer computes
    the teacher's softmax output and its mixer's from the same q, k, v, passes the teacher's on (so the
    model's output is the teacher's) and records its transfer loss in `losses` (layer index -> scalar
    tensor: the MSE of the attention output after o_proj, + `attention_ce` x the attention-weight
    cross-entropy for sequences of at most `attention_ce_max_len` tokens).

    `losses` is emptied when a forward of `model` starts, so after one it holds that forward's losses
    exactly; a forward of a part of `model` (its decoder called directly) records without emptying it.
    `mask` [B, S] (1 real, 0 padding) serves forwards that bring no 2D attention mask of their own."""
    mode = _TeacherForcing(attention_ce=attention_ce, attention_ce_max_len=attention_ce_max_len, mask=mask)
    handle = model.register_forward_pre_hook(lambda module, args: mode.losses.clear())
    try:
        with _layers_in_mode(model, mode):
            yield mode.losses
    finally:
        handle.remove()


@contextmanager
def softmax_teacher(model: nn.Module, layers: Iterable[int] | None = None) -> Iterator[nn.Module]:
    """Within the block every converted layer of `model` computes plain softmax attention: the teacher's,
    with whatever projections it has (stage 2's distillation teacher; LoRA is the caller's business).
    `layers`: only the converted layers with these indices (zoo.layer_select gives one back at a time)."""
    with _layers_in_mode(model, _SOFTMAX_TEACHER, layers):
        yield model


def hybrid_mixers(model: nn.Module) -> list[Mixer]:
    """The mixers of `model`'s converted layers that can switch branch (the window hybrids: `BRANCHES`)."""
    return [
        layer.mixer
        for layer in linearized_layers(model)
        if hasattr(layer.mixer, "BRANCHES") and hasattr(layer.mixer, "branch")
    ]


@contextmanager
def branch(model: nn.Module, name: str) -> Iterator[None]:
    """Every hybrid mixer of `model` runs one branch, `name` ("window", "linear" or "both"), within the
    block; mixers without branches run as they are. Each hybrid gets its previous branch back on exit.
    A ValueError for a branch a hybrid does not have, or for "window"/"linear" on a model without hybrids."""
    mixers = hybrid_mixers(model)
    if not mixers and name != "both":
        raise ValueError(
            f"the model has no hybrid mixer (window + linear) whose branch can be chosen: "
            f"cannot run branch {name!r}"
        )
    for mixer in mixers:
        if name not in mixer.BRANCHES:
            raise ValueError(f"{mixer.name}: branch must be one of {mixer.BRANCHES}, got {name!r}")
    previous = [mixer.branch for mixer in mixers]
    try:
        for mixer in mixers:
            mixer.branch = name
        yield
    finally:
        for mixer, branch_before in zip(mixers, previous):
            mixer.branch = branch_before


# ---------------------------------------------------------------------------------------------
# families


def _family_classes():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    return {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }


ZOO_CLASSES: dict[str, tuple[type, type]] = {}  # family -> (ZooConfig, ZooForCausalLM)


class ZooModelMixin:
    """Behaviour every converted causal LM adds to its family's class."""

    def _zoo_context(self) -> ForwardContext:
        ctx = getattr(self, "_zoo_ctx", None)
        if ctx is None:
            ctx = ForwardContext()
            object.__setattr__(self, "_zoo_ctx", ctx)
        return ctx

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        position_ids=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        if cache is not None and past_key_values is not None:
            raise ValueError("give the cache as `cache` or as `past_key_values`, not both")
        cache = past_key_values if cache is None else cache  # either name, whatever the transformers version
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, ZooCache):
            if cache.get_seq_length():
                raise TypeError(
                    "a converted model needs a zoo.cache.ZooCache, not a "
                    f"{type(cache).__name__} that already holds tokens"
                )
            cache = ZooCache()
        if cache is None and use_cache:
            cache = ZooCache()
        stepped = (
            decode_step(self, input_ids, cache, attention_mask, position_ids, **kwargs) if use_cache else None
        )
        if stepped is not None:
            return stepped
        if attention_mask is not None and attention_mask.dim() == 2 and position_ids is None:
            # left padding: real tokens are numbered from 0, as they would be in an unpadded batch
            T = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            position_ids = mask_positions(attention_mask, T)
        ctx = self._zoo_context()
        ctx.mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        try:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_ARG: cache},
                **kwargs,
            )
        finally:
            ctx.mask = None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get(CACHE_ARG)
        if user_cache is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_ARG] = ZooCache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def converted_layers(self) -> dict[int, LinearizedAttention]:
        return {
            i: layer.self_attn
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.self_attn, LinearizedAttention)
        }


def _make_zoo_classes(family: str, config_cls: type, model_cls: type) -> tuple[type, type]:
    model_type = f"zoo_{family}"
    zoo_config = type(
        f"Zoo{config_cls.__name__}",
        (config_cls,),
        {
            "model_type": model_type,
            "__doc__": f"A {family} config whose `zoo_mixers` lists each layer's mixer (None: softmax kept).",
        },
    )

    def __init__(self, config):
        model_cls.__init__(self, config)
        _apply_mixers(self, getattr(config, "zoo_mixers", None) or [])

    zoo_model = type(
        f"Zoo{model_cls.__name__}",
        (ZooModelMixin, model_cls),
        {
            "config_class": zoo_config,
            "__init__": __init__,
            "__doc__": f"A {family} causal LM with some attention layers converted to zoo mixers.",
        },
    )
    AutoConfig.register(model_type, zoo_config, exist_ok=True)
    AutoModelForCausalLM.register(zoo_config, zoo_model, exist_ok=True)
    return zoo_config, zoo_model


def register_families() -> None:
    """Register `zoo_<family>` configs and models with the transformers Auto classes (idempotent)."""
    if ZOO_CLASSES:
        return
    for family, (config_cls, model_cls) in _family_classes().items():
        ZOO_CLASSES[family] = _make_zoo_classes(family, config_cls, model_cls)


def model_family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = model_type[4:] if model_type and model_type.startswith("zoo_") else model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"cannot convert a model of type {model_type!r}; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    return family


# ---------------------------------------------------------------------------------------------
# conversion


def resolve_layers(layers: Any, num_layers: int) -> list[int]:
    """None: all layers; a list of ints; a Python slice; or a "start:stop[:step]" string."""
    if isinstance(layers, slice):
        layers = list(range(num_layers))[layers]
    return parse_layers(layers, num_layers)


def _apply_mixers(model: nn.Module, zoo_mixers: list) -> None:
    """Swap in wrappers for the layers named in `zoo_mixers` (a list: None or {"mixer", "options"})."""
    config = model.config
    ctx = model._zoo_context()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for idx, spec in enumerate(zoo_mixers):
        if spec is None:
            continue
        layer = model.model.layers[idx]
        attn = layer.self_attn
        if isinstance(attn, LinearizedAttention):
            raise ValueError(f"layer {idx} is already converted (to {attn.mixer.name!r})")
        mixer = build_mixer(
            spec["mixer"],
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            config.hidden_size,
            idx,
            **spec.get("options", {}),
        )
        param = attn.q_proj.weight
        mixer.to(device=param.device, dtype=param.dtype if param.dtype.is_floating_point else None)
        layer.self_attn = LinearizedAttention(attn, mixer, ctx)


def linearize(model: nn.Module, mixer: str, layers: Any = None, **options: Any) -> nn.Module:
    """Replace the attention of the chosen layers (all by default) with `mixer`, in place.

    Works on Llama, Mistral, Qwen2 and Qwen3 causal LMs. The mixer may initialize its parameters
    from the teacher's projections. Everything but the mixers' own parameters is frozen.
    Returns the same model object, now a `Zoo<Family>ForCausalLM`.
    """
    register_families()
    family = model_family(model)
    config = model.config
    num_layers = config.num_hidden_layers
    chosen = resolve_layers(layers, num_layers)
    specs = list(getattr(config, "zoo_mixers", None) or [None] * num_layers)
    new_specs: list = [None] * num_layers
    for idx in chosen:
        if specs[idx] is not None:
            raise ValueError(f"layer {idx} is already converted (to {specs[idx]['mixer']!r})")
        new_specs[idx] = {"mixer": mixer, "options": dict(options)}
    zoo_config, zoo_model = ZOO_CLASSES[family]
    model.__class__ = zoo_model
    config.__class__ = zoo_config
    _apply_mixers(model, new_specs)
    for idx in chosen:
        attn = model.model.layers[idx].self_attn
        attn.mixer.init_from_teacher(attn.q_proj, attn.k_proj, attn.v_proj)
    config.zoo_mixers = [new if new is not None else old for new, old in zip(new_specs, specs)]
    freeze_all_but_mixers(model)
    return model


def swap_mixers(model: nn.Module, mixer: str, **options: Any) -> nn.Module:
    """Give every converted layer of `model` the mixer `mixer`, built with that layer's options updated by
    `options`, and carry its weights over. The new mixer must have exactly the old one's parameters (`lola`
    has those of `lolcats-terraced-sink`): this is for changes made without training, such as LoLA's sparse
    cache. A ValueError, before any layer changes, for an option the new mixer does not take or weights it
    cannot hold. Returns the model; its config's `zoo_mixers` names the new mixer."""
    layers = linearized_layers(model)
    if not layers:
        raise ValueError("the model has no converted layer: call zoo.linearize(model, mixer) first")
    specs = list(model.config.zoo_mixers)
    swapped = []
    for layer in layers:
        old, idx = layer.mixer, layer.mixer.layer_idx
        merged = {**(specs[idx] or {}).get("options", {}), **options}
        new = build_mixer(
            mixer, old.num_heads, old.num_kv_heads, old.head_dim, old.hidden_size, idx, **merged
        )
        param = layer.q_proj.weight  # placed as _apply_mixers places a loaded model's mixers
        new.to(device=param.device, dtype=param.dtype if param.dtype.is_floating_point else None)
        missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"layer {idx}: {old.name!r} weights do not fit {mixer!r} (missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}); only a mixer with the same parameters can be swapped in"
            )
        swapped.append((layer, new, idx, merged))
    for layer, new, idx, merged in swapped:
        layer.mixer = new
        specs[idx] = {"mixer": mixer, "options": merged}
    model.config.zoo_mixers = specs
    return model


def mixer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".mixer." in name]


def freeze_all_but_mixers(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".mixer." in name)


register_families()  # importing zoo.convert makes saved linearized folders readable by the Auto classes
