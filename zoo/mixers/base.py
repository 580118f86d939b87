"""The Mixer contract and the mixer registry.

A mixer sits between an attention layer's q/k/v projections and its output projection. The shared
wrapper (zoo.convert) keeps the projections, q/k norms and RoPE, so every mixer sees the same
inputs and LoRA can target the projections whatever the mixer.

The contract:
- `forward(q, k, v, x, state=None, mask=None) -> (y, state)`, one forward for training, prefill and
  decoding: q [B, H, T, D] (RoPE applied), k, v [B, Hkv, T, D], x [B, T, hidden] the layer input,
  mask [B, T] (1 real, 0 padding: padding adds nothing to the state), y [B, H, T, D]. Splitting a
  sequence anywhere and carrying the state gives the same y as the whole.
- Positions. forward gets none: the wrapper passes only what this call holds. A token's position in its
  sequence is the number of real tokens before it, so a mixer that needs positions keeps the count of
  real tokens seen in its state ([B] int64, updated by each call) and takes them from the one public
  helper, zoo.kernels.positions.token_positions(seen, mask, T) -> [B, T] (zoo.mixers.tokens.Tokens
  wraps it: `Tokens.of(q, x, mask, seen).positions`). The shared bases hand their hooks a `Tokens` (x,
  mask, positions): the window-hybrid state counts tokens itself; the linear bases keep a count beside
  their kernel's state when the class sets `counts_tokens = True`.
- Grouped-query attention. `kv_group_size` = H / Hkv query heads share each key/value head (query head
  h reads key/value head h // kv_group_size; `repeat_kv` repeats k and v to the query heads). The
  kernels' `kv_groups` argument (zoo.kernels.dispatch) says that the heads they are given come in runs
  of `kv_groups` that share their keys, values, key features and gates, hence their state: the kernel
  then keeps that state once per run, [B, Hkv, ...], like the teacher's KV cache. The window hybrid's
  dispatcher also takes k, v and key features once per key/value head (the window mixers pass them so:
  its Triton kernels read them in place). Pass kv_group_size
  when everything the state holds is per key/value head, 1 when anything differs per query head (a gate
  made per query head gives each query head its own state).
- Padding. `zoo.mixers.tokens` is the one place that checks the mask and zeroes padded tokens.
- Building blocks live in modules that register nothing, so no mixer file imports another: feature maps
  and HeadwiseLinear in `features`, masks and positions in `tokens`, and the bases with their hooks, each
  given the call's Tokens: `feature_map.FeatureMapMixer` (linear attention; hook `feature_map(h, is_query,
  tokens)`), `gated.GatedLinearMixer` (+ `log_gate(q, k, tokens)`), `hybrid.WindowHybridMixer` (window
  softmax + linear; `feature_map`), `delta_base.DeltaRuleMixer` (`features(q, k, tokens)`,
  `log_gate(tokens)`).
- Registration: `@register_mixer("name")`, class attributes for `zoo list`, options declared as
  `Option`s (zoo.mixers.options), and `test_options`: small options with which the registry-wide tests
  (tests/mixers/test_registry.py) reach the mixer's limits (windows and conv histories that slide
  several times within the tests' sequences) rather than pass inside them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from torch import nn

from zoo.mixers.options import Option, infer_option
from zoo.mixers.tokens import CountedState, Tokens

_REGISTRY: dict[str, type[Mixer]] = {}
_ENTRY_POINT_GROUP = "zoo.mixers"
_entry_points_loaded = False


class Mixer(nn.Module):
    """Base class of every token mixer.

    Subclasses set the class attributes below (shown by `zoo list`) and implement `forward`.
    Options arrive as keyword arguments, checked against `option_specs` (see `options`).
    """

    #: short family name: "softmax", "linear", "hybrid", "gated", "ssm", ...
    family: str = "?"
    #: state bytes per sequence, as a formula in H (heads), Hkv, D (head dim), W (window), T (context)
    state_size: str = "?"
    #: one line for `zoo list`
    description: str = ""
    #: where it comes from (paper or project)
    source: str = ""
    #: the options this mixer accepts, with their defaults. A subclass declares each as an `Option` (kind,
    #: range, doc) or as a plain default (which keeps the spec a base class declared for that key);
    #: `__init_subclass__` turns this back into plain defaults and the specs into `option_specs`.
    options: dict[str, Any] = {}
    #: each option's spec (kind, range, doc), keyed as `options`
    option_specs: ClassVar[dict[str, Option]] = {}
    #: small options for the registry-wide tests (short windows and conv histories, few sinks, small feature
    #: dims), so that their short sequences cross the mixer's limits; checked against `option_specs`
    test_options: ClassVar[dict[str, Any]] = {}
    #: True: the shared bases (feature_map, gated, delta_rule) keep the count of real tokens beside the
    #: kernel's state (a CountedState), so that their hooks know `tokens.positions`
    counts_tokens: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "options" in cls.__dict__:
            cls._declare_options()
        unknown = sorted(set(cls.test_options) - set(cls.option_specs))
        if unknown:
            raise TypeError(f"{cls.__qualname__}.test_options: unknown option(s) {unknown}")
        for key, value in cls.test_options.items():
            cls.option_specs[key].check(value, f"{cls.__qualname__}.test_options.{key}")

    @classmethod
    def _declare_options(cls) -> None:
        """`options` (plain defaults or `Option`s) -> `option_specs` and plain default `options`."""
        inherited: dict[str, Option] = {}
        for base in reversed(cls.__mro__[1:]):
            inherited.update(getattr(base, "option_specs", {}))
        specs = {}
        for key, value in cls.__dict__["options"].items():
            if isinstance(value, Option):
                specs[key] = value
            elif key in inherited:
                specs[key] = replace(inherited[key], default=value)
            else:
                specs[key] = infer_option(value)
            default = specs[key].check(specs[key].default, f"{cls.__qualname__}.options.{key} (default)")
            specs[key] = replace(specs[key], default=default)
        cls.option_specs = specs
        cls.options = {key: spec.default for key, spec in specs.items()}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The defaults updated with `options`, each checked against its spec; an unknown option or a value
        out of its kind or range is a one-line ValueError. Makes no tensor."""
        unknown = sorted(set(options) - set(cls.option_specs))
        if unknown:
            allowed = ", ".join(sorted(cls.option_specs)) or "none"
            raise ValueError(f"mixer {cls.name!r} got unknown option(s) {unknown}; allowed: {allowed}")
        checked = {
            key: cls.option_specs[key].check(value, f"mixer.options.{key}") for key, value in options.items()
        }
        return {**cls.options, **checked}

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        layer_idx: int,
        **options: Any,
    ):
        super().__init__()
        config = self.check_options(options)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.config = config

    name: str = "?"  # set by register_mixer

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention): see the module docstring."""
        return self.num_heads // self.num_kv_heads

    def tokens_and_state(
        self, q: torch.Tensor, x: torch.Tensor, state: Any, mask: torch.Tensor | None
    ) -> tuple[Tokens, Any]:
        """The call's Tokens (mask checked) and the kernel's part of `state`. With `counts_tokens` the
        state is a CountedState, whose count gives the Tokens their positions; otherwise it passes as is."""
        if not self.counts_tokens:
            return Tokens.of(q, x, mask), state
        if state is None:
            return Tokens.of(q, x, mask, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)), None
        return Tokens.of(q, x, mask, state.seen), state.state

    def carry(self, tokens: Tokens, state: Any) -> Any:
        """The state a forward returns: the kernel's, with the new count when `counts_tokens`."""
        return CountedState(state, tokens.seen_after) if self.counts_tokens else state

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        state: Any = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """q: [B, H, T, D] (RoPE applied); k, v: [B, Hkv, T, D]; x: [B, T, hidden], the layer input.

        state: what earlier tokens left (None at the start). mask: [B, T], 1 for real tokens and 0
        for padding; padding adds nothing to the state. Returns y [B, H, T, D] and the new state.
        Splitting a sequence anywhere and carrying the state gives the same y as the whole.
        """
        raise NotImplementedError

    def init_from_teacher(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        """Optional: initialize the mixer's own parameters from the teacher's projections."""

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Optional: the mixer's causal attention weights [B, H, T, T] for the attention-weight
        cross-entropy of stage 1 (short sequences only). None where the mixer has no such weights."""
        return None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer={self.layer_idx}, options={self.config}"


def repeat_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, H, T, D] by repeating each key/value head for its query group."""
    groups = num_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def register_mixer(name: str):
    """Class decorator: `@register_mixer("hedgehog")`. A duplicate name is an error."""

    def decorate(cls: type[Mixer]) -> type[Mixer]:
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"@register_mixer({name!r}) needs a subclass of zoo.Mixer, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"a mixer named {name!r} is already registered ({_REGISTRY[name].__module__}."
                f"{_REGISTRY[name].__qualname__}); pick another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_mixer(name: str) -> type[Mixer]:
    """Remove the mixer registered under `name` (a temporary test mixer, a plugin being reloaded) and return
    its class; an unknown name is a KeyError."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise KeyError(f"no mixer named {name!r} is registered") from None


def _load_entry_points() -> None:
    """Import third-party mixers declared in the `zoo.mixers` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not break zoo; say which and why
            import warnings

            warnings.warn(f"zoo: could not load mixer plugin {ep.name!r} ({ep.value}): {err}", stacklevel=2)


def list_mixers() -> list[str]:
    """Names of all registered mixers, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_mixer(name: str) -> type[Mixer]:
    """The mixer class registered under `name`; an unknown name lists the registered ones."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_REGISTRY))}") from None


def build_mixer(
    name: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    layer_idx: int,
    **options: Any,
) -> Mixer:
    """Instantiate a registered mixer."""
    return get_mixer(name)(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)


def decay_bias(dt_min: float, dt_max: float, heads: int) -> torch.Tensor:
    """softplus^-1 of per-step decay rates log-uniform from dt_min (head 0) to dt_max (the last head)
    [heads]: the dt_bias that starts each head of a gated recurrence at its own time scale (Mamba2's init)."""
    dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), heads))
    return dt + torch.log(-torch.expm1(-dt))
