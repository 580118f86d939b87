"""Recipes: one YAML file per (model, mixer) run, validated against a typed schema.

The schema is the dataclasses below. Loading checks every key and type, so a typo is an error that
names the dotted key and the keys allowed there, and a wrong type names the expected one::

    recipe = load_recipe("recipes/smollm2-135m/lolcats.yaml", ["stage1.lr=1e-3", "mixer.layers=[0,1]"])
    recipe.stage1.lr            # 0.001
    recipe.to_yaml()            # the resolved recipe, loadable again

Overrides are ``dotted.key=value`` strings; the value is read as YAML (``[0, 1]``, ``true``,
``null``), with two fixes for PyYAML's YAML 1.1 reading: ``1e-3`` (a string to PyYAML) is accepted
wherever a float is expected, and a slice such as ``0:10`` or ``-4:`` stays a string (PyYAML
would read ``1:30`` as the base-60 number 90 and ``-4:`` as a mapping). In a YAML file, quote
slices: ``layers: "0:10"``.

``mixer.options`` is a free mapping, checked later by the mixer itself. An option given as the string
``seq_len`` takes the run's training length (the longest stage's blocks) where the mixer is built
(``Recipe.mixer_options``), so that it follows ``data.seq_len`` when a budget or an override changes it:
``linear_horizon: seq_len``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from zoo.layers import SLICE, parse_layers, parse_slice
from zoo.transfer.loop import LR_SCHEDULES, TrainingConfig

__all__ = [
    "RecipeError",
    "Recipe",
    "ModelConfig",
    "MixerConfig",
    "DataConfig",
    "StageConfig",
    "Stage1Config",
    "Stage2Config",
    "LoraConfig",
    "EvalConfig",
    "BlockwiseConfig",
    "load_recipe",
    "parse_layers",
    "parse_override",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


class RecipeError(ValueError):
    """An invalid recipe: an unknown key, a wrong type or a value out of range.

    ``key`` is the dotted key at fault; ``allowed`` lists the keys allowed where an unknown key was
    found (empty otherwise)."""

    def __init__(self, message: str, key: str = "", allowed: Iterable[str] = ()):
        super().__init__(message)
        self.key = key
        self.allowed = list(allowed)


# ----------------------------------------------------------------------------------------- schema


def _rule_problems(section, rules):
    """(key, message) for each (key, what is allowed, whether the value is allowed) rule that fails."""
    for key, allowed, ok in rules:
        if not ok:
            yield key, f"must be {allowed}, got {getattr(section, key)}"


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "smollm2-135m"  # "smollm2-135m" (embedded), a hub id or a local folder
    dtype: str = "auto"  # auto, float32, bfloat16, float16

    def _problems(self):
        if self.dtype not in DTYPES:
            yield "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        if not self.name.strip():
            yield "name", "must not be empty"


@dataclass(kw_only=True)
class MixerConfig:
    name: str  # a registered mixer (`zoo list`)
    options: dict[str, Any] = field(default_factory=dict)  # passed to the mixer, checked by it
    layers: list[int] | str | None = None  # None: every layer; [0, 2, 5]; or a slice "start:stop[:step]"

    def _problems(self):
        if not self.name.strip():
            yield "name", "must not be empty"
        if isinstance(self.layers, str):
            try:
                parse_slice(self.layers)
            except ValueError as e:
                yield "layers", str(e)
        elif isinstance(self.layers, list) and len(set(self.layers)) != len(self.layers):
            yield "layers", f"has repeated layers: {self.layers}"

    def layer_indices(self, num_layers: int) -> list[int]:
        """The converted layers of a model with ``num_layers`` layers."""
        return parse_layers(self.layers, num_layers)


@dataclass(kw_only=True)
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["austen", "bible"])  # embedded names, files, "hf:<id>"
    eval_ood: list[str] = field(default_factory=lambda: ["brown"])  # never trained on
    seq_len: int = 256  # tokens per training/eval block
    heldout_fraction: float = 0.1  # of each source's documents, kept out of training
    seed: int = 0  # the split and the shuffling
    skip_unavailable: bool = False  # a source that fails to load is skipped with a warning, not an error

    def _problems(self):
        if not self.train:
            yield "train", "must name at least one source"
        if self.seq_len < 2:
            yield "seq_len", f"must be >= 2, got {self.seq_len}"
        if not 0 < self.heldout_fraction < 1:
            yield "heldout_fraction", f"must be between 0 and 1 (exclusive), got {self.heldout_fraction}"


@dataclass(kw_only=True)
class StageConfig(TrainingConfig):
    """A training stage: whether it runs, and how it trains (the fields the loop shares,
    zoo.transfer.loop)."""

    enabled: bool = True
    # tokens per training block of this stage; null: data.seq_len (stage1 256, stage2 1024: short to long)
    seq_len: int | None = None

    def _problems(self):
        if self.seq_len is not None and self.seq_len < 2:
            yield "seq_len", f"must be >= 2 or null (data.seq_len), got {self.seq_len}"
        yield from _rule_problems(
            self,
            (
                ("tokens", ">= 0", self.tokens >= 0),
                ("batch_size", ">= 1", self.batch_size >= 1),
                ("lr", "> 0", self.lr > 0),
                ("weight_decay", ">= 0", self.weight_decay >= 0),
                ("checkpoint_every", ">= 0 (0: only at the end)", self.checkpoint_every >= 0),
                ("log_every", ">= 1", self.log_every >= 1),
                ("grad_clip", ">= 0 (0 = off)", self.grad_clip >= 0),
            ),
        )
        if self.lr_schedule not in LR_SCHEDULES:
            yield "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            yield "adam_betas", f"must be two numbers in [0, 1) (beta1, beta2), got {self.adam_betas}"


@dataclass(kw_only=True)
class BlockwiseConfig:
    """Block-wise attention transfer (LoLCATs' recipe for 70B and 405B): the layers are cut into blocks
    of `block_size`; the teacher's hidden states entering each block are computed once and stored on
    disk; each block's mixers then train alone from them, blocks spread over the ranks of a torchrun
    launch. Off (0) trains all layers jointly, as before."""

    block_size: int = 0  # layers per block; 0 = off
    store: str | None = None  # hidden-state store folder (shared by all ranks); None: <run folder>/store
    shard_sequences: int = 64  # sequences per store shard: bounds memory, and the unit written or redone
    sequences: int = (
        0  # training sequences stored and trained on (a seeded sample); 0 = those stage1.tokens reach
    )

    def _problems(self):
        if self.block_size < 0:
            yield "block_size", f"must be >= 0 (0 = off), got {self.block_size}"
        if self.shard_sequences < 1:
            yield "shard_sequences", f"must be >= 1, got {self.shard_sequences}"
        if self.sequences < 0:
            yield "sequences", f"must be >= 0 (0 = as many as stage1.tokens reaches), got {self.sequences}"
        if self.store is not None and not self.store.strip():
            yield "store", "must be a folder path or null"


@dataclass(kw_only=True)
class Stage1Config(StageConfig):
    """Attention transfer: train only the mixers' own parameters to match the teacher's attention."""

    tokens: int = 200_000
    lr: float = 1e-2
    attention_ce: float = 0.0  # weight of the attention-weight cross-entropy (Hedgehog); 0 = off
    attention_ce_max_len: int = 128  # the cross-entropy looks at the first this-many tokens only
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)

    def _problems(self):
        yield from super()._problems()
        if self.attention_ce < 0:
            yield "attention_ce", f"must be >= 0, got {self.attention_ce}"
        if self.attention_ce_max_len < 1:
            yield "attention_ce_max_len", f"must be >= 1, got {self.attention_ce_max_len}"


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def _problems(self):
        if self.rank < 1:
            yield "rank", f"must be >= 1, got {self.rank}"
        if self.alpha <= 0:
            yield "alpha", f"must be > 0, got {self.alpha}"
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if not self.targets:
            yield "targets", "must name at least one module"


DISTILL_FROM = ("teacher", "reference")


@dataclass(kw_only=True)
class Stage2Config(StageConfig):
    """LoRA fine-tuning with the next-token loss."""

    tokens: int = 200_000
    lr: float = 1e-3
    train_mixer: bool = False  # also train the mixers' own parameters
    # weight of the KL to the teacher's next-token distribution, added to the next-token loss; 0 = off
    distill: float = 0.0
    distill_from: str = (
        "teacher"  # "teacher" (untouched) or "reference" (the teacher + the same LoRA budget, cached)
    )
    merge_on_save: bool = True  # merge LoRA into the weights of the saved model
    gradient_checkpointing: bool = (
        False  # recompute each layer in the backward pass: less memory, ~1/3 more compute
    )
    lora: LoraConfig = field(default_factory=LoraConfig)

    def _problems(self):
        yield from super()._problems()
        if self.distill < 0:
            yield "distill", f"must be >= 0 (0 = off), got {self.distill}"
        if self.distill_from not in DISTILL_FROM:
            yield "distill_from", f"must be one of {', '.join(DISTILL_FROM)}, got {self.distill_from!r}"


@dataclass(kw_only=True)
class EvalConfig:
    max_blocks: int = 32  # held-out blocks of seq_len tokens per source
    batch_size: int = 8
    teacher_lora: bool = False  # also fine-tune the teacher with the stage-2 LoRA budget (fair reference)
    mmlu: int = 0  # MMLU questions (5-shot); 0 = skip
    generate_prompt: str = "Once upon a time"
    generate_tokens: int = 32
    mse_blocks: int = 8  # training blocks for the per-layer transfer MSE (swap and after stage 1)
    passkey_lengths: list[int] = field(
        default_factory=list
    )  # contexts (tokens) for passkey retrieval; [] = skip
    passkey_trials: int = 4  # prompts per context length (trial i of n hides the key at depth (i + 0.5) / n)
    passkey_multikey: int = 0  # also the multi-key variant with this many named keys (2..8); 0 = skip
    long_context: int = 0  # perplexity by position on held-out blocks of this many tokens; 0 = skip
    long_context_blocks: int = 4  # blocks per source for long_context
    decode_contexts: list[int] = field(
        default_factory=list
    )  # contexts for decode tok/s and state bytes; [] = skip
    decode_steps: int = 8  # timed decoding steps at each of decode_contexts
    branches: bool = False  # hybrids: also evaluate the window branch alone and the linear branch alone
    generation_prompts: int = 4  # held-out texts continued greedily, scored for repeated 4-grams; 0 = skip
    generation_prompt_tokens: int = 32  # tokens of each text given as the prompt
    generation_tokens: int = 48  # tokens generated after each prompt

    def _problems(self):
        yield from _rule_problems(
            self,
            (
                ("max_blocks", ">= 1", self.max_blocks >= 1),
                ("batch_size", ">= 1", self.batch_size >= 1),
                ("mmlu", ">= 0 (0 = skip)", self.mmlu >= 0),
                ("generate_tokens", ">= 0", self.generate_tokens >= 0),
                ("mse_blocks", ">= 1", self.mse_blocks >= 1),
                ("passkey_lengths", "context lengths >= 2 tokens", all(n >= 2 for n in self.passkey_lengths)),
                ("passkey_trials", ">= 1", self.passkey_trials >= 1),
                (
                    "passkey_multikey",
                    "0 (skip) or 2 to 8 keys",
                    self.passkey_multikey == 0 or 2 <= self.passkey_multikey <= 8,
                ),
                (
                    "long_context",
                    "0 (skip) or a block length >= 512 tokens",
                    self.long_context == 0 or self.long_context >= 512,
                ),
                ("long_context_blocks", ">= 1", self.long_context_blocks >= 1),
                ("decode_steps", ">= 1", self.decode_steps >= 1),
                ("generation_prompts", ">= 0 (0 = skip)", self.generation_prompts >= 0),
                ("generation_prompt_tokens", ">= 1", self.generation_prompt_tokens >= 1),
                (
                    "generation_tokens",
                    ">= 4 (the repeats are counted in 4-grams)",
                    self.generation_tokens >= 4,
                ),
            ),
        )
        ctx = self.decode_contexts
        if ctx and (ctx[0] < 1 or any(b - a <= self.decode_steps for a, b in zip(ctx, ctx[1:]))):
            yield (
                "decode_contexts",
                (
                    f"must be >= 1 and grow by more than decode_steps ({self.decode_steps}) "
                    f"each time, got {ctx}"
                ),
            )


#: a mixer option's value that stands for the run's training length (`Recipe.mixer_options`)
TRAINING_LENGTH = "seq_len"


@dataclass(kw_only=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    mixer: MixerConfig
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda

    def _problems(self):
        if self.device not in DEVICES:
            yield "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}"

    # ------------------------------------------------------------------ construction and output

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | None, overrides: Iterable[str] | Mapping[str, Any] = ()
    ) -> Recipe:
        """Validate a mapping (as read from YAML), after applying ``overrides``."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
        raw = copy.deepcopy(dict(data))
        for path, value in _iter_overrides(overrides):
            _set_path(raw, path, value)
        recipe = _build(cls, raw, "")
        recipe.validate()
        return recipe

    def validate(self) -> Recipe:
        """Check value ranges of every section (types are checked by ``from_dict``)."""
        _check_values(self, "")
        return self

    def override(self, overrides: Iterable[str] | Mapping[str, Any]) -> Recipe:
        """A new recipe with ``overrides`` applied."""
        return Recipe.from_dict(self.to_dict(), overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_length(self) -> int:
        """Tokens per training block of the longest stage (a stage's seq_len, else data.seq_len)."""
        return max(stage.seq_len or self.data.seq_len for stage in (self.stage1, self.stage2))

    def mixer_options(self) -> dict[str, Any]:
        """mixer.options as the mixer is built with them: each value "seq_len" is the training length."""
        length = self.training_length()
        return {k: length if v == TRAINING_LENGTH else v for k, v in self.mixer.options.items()}

    def data_key(self) -> dict[str, Any]:
        """The data section as cache keys see it: only what changes the documents (not how failures are
        met)."""
        data = dataclasses.asdict(self.data)
        data.pop("skip_unavailable")
        return data

    def to_yaml(self) -> str:
        """Block-style YAML (short lists of plain values inline) that ``load_recipe`` reads back."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Sections in block style, lists of plain values in flow style: [austen, bible]."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def load_recipe(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> Recipe:
    """Read, override and validate a recipe file (and the base recipes it inherits, see
    `read_recipe_file`)."""
    path = Path(path)
    data = read_recipe_file(path)
    try:
        return Recipe.from_dict(data, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}", key=e.key, allowed=e.allowed) from None


def read_recipe_file(path: Path, inheriting: tuple[Path, ...] = ()) -> Any:
    """The recipe mapping of a YAML file, before validation. A top-level `base: other.yaml` (a path
    relative to this file) inherits that recipe: its sections are merged key by key with this file's,
    which wins, except `mixer`, which this file replaces whole when it has one (another mixer has other
    options)."""
    if path.is_dir():
        raise RecipeError(
            f"{path} is a folder, not a recipe file (recipes/<model>/<mixer>.yaml, or a run folder's "
            "recipe.yaml)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no recipe at {path}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path}: not a recipe (not UTF-8 text: byte {e.start} is {e.object[e.start]:#04x})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not (isinstance(data, Mapping) and "base" in data):
        return data
    data = dict(data)
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(
            f"{path}: base must name a recipe file (relative to {path.parent}), got {base!r}", key="base"
        )
    base_path = path.parent / base
    if base_path.resolve() in inheriting + (path.resolve(),):
        raise RecipeError(f"{path}: base {base} inherits from itself", key="base")
    if not base_path.is_file():
        raise RecipeError(f"{path}: base {base}: no recipe at {base_path}", key="base")
    inherited = read_recipe_file(base_path, inheriting + (path.resolve(),))
    if not isinstance(inherited, Mapping):
        raise RecipeError(f"{path}: base {base} is not a recipe (a mapping of sections)", key="base")
    return _inherit(dict(inherited), data)


def _inherit(base: dict, child: Mapping) -> dict:
    """`child` over `base`: sections merged key by key, the mixer section replaced whole."""
    merged = dict(base)
    for key, value in child.items():
        if key != "mixer" and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _inherit(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------------ overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stage1.lr=1e-3"`` -> (["stage1", "lr"], "1e-3" read as YAML). See the module docstring."""
    if not isinstance(text, str) or "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [part.strip() for part in key.strip().split(".")]
    if not all(path):
        raise RecipeError(f"override {text!r} has an empty key", key=key.strip())
    if SLICE.match(raw):
        return path, raw.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML: take it as the plain string it looks like
    if _leaf_type(path) is str and not isinstance(value, str) and value is not None:
        value = raw.strip()  # model.name=123 or generate_prompt=yes: the user meant the text
    return path, value


def _iter_overrides(overrides: Iterable[str] | Mapping[str, Any]):
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            yield str(key).split("."), value
    else:
        for text in overrides:
            yield parse_override(text)


def _leaf_type(path: list[str]) -> Any:
    """The schema type at ``path``, or None where the path leaves the schema."""
    tp: Any = Recipe
    for part in path:
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``raw[path[0]][path[1]]... = value``, checking the path against the schema as it goes.

    Unknown keys raise the same error as in a file; a value given for a whole section is merged
    into what the file set there."""
    node: dict[str, Any] = raw
    tp: Any = Recipe
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                raise _unknown_key(dotted, list(hints))
            tp = hints[part]
        elif _is_free_dict(tp) or tp is Any:
            tp = Any
        elif depth > 0:
            parent = ".".join(path[:depth])
            raise RecipeError(
                f"cannot set {dotted!r}: {parent!r} is a value ({_type_name(tp)}), not a section", key=dotted
            )
        last = depth == len(path) - 1
        if last:
            if (
                isinstance(tp, type)
                and dataclasses.is_dataclass(tp)
                and isinstance(value, Mapping)
                and isinstance(node.get(part), Mapping)
            ):
                merged = dict(node[part])
                merged.update(value)
                node[part] = merged
            else:
                node[part] = copy.deepcopy(value)
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(
                    f"cannot set {'.'.join(path)!r}: {dotted!r} is {child!r}, not a section", key=dotted
                )
            node = child


# ----------------------------------------------------------------------------- type checking


def _unknown_key(dotted: str, allowed: list[str]) -> RecipeError:
    leaf = dotted.rsplit(".", 1)[-1]
    where = f"under {dotted.rsplit('.', 1)[0]!r}" if "." in dotted else "at the top level"
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return RecipeError(
        f"unknown key {dotted!r}{did_you_mean}; allowed keys {where}: {', '.join(allowed)}",
        key=dotted,
        allowed=allowed,
    )


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_free_dict(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if _is_free_dict(tp):
        return "mapping"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "mapping (section)"
    if tp is str:
        return "string"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _wrong_type(key: str, tp: Any, value: Any, extra: str = "") -> RecipeError:
    return RecipeError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}{extra}", key=key)


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _wrong_type(key, float, value)
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip().replace("_", ""))
        except ValueError:
            raise _wrong_type(key, float, value) from None
    else:
        raise _wrong_type(key, float, value)
    if not math.isfinite(result):
        raise RecipeError(f"{key}: must be a finite number, got {value!r}", key=key)
    return result


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise _wrong_type(key, int, value)
    if isinstance(value, int):
        return value
    if isinstance(value, (float, str)):  # 2.0e+7 or "2e7": fine if it is a whole number
        try:
            number = float(value.strip().replace("_", "")) if isinstance(value, str) else value
        except ValueError:
            raise _wrong_type(key, int, value) from None
        if math.isfinite(number) and number == int(number):
            return int(number)
    raise _wrong_type(key, int, value)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except RecipeError:
            continue
    hint = ""
    if key.endswith("layers") and isinstance(value, (int, dict)):
        hint = ' (quote slices in YAML: layers: "0:10"; unquoted, 1:30 reads as a base-60 number)'
    raise _wrong_type(key, tp, value, hint)


def _coerce_exact(value: Any, tp: type, key: str) -> Any:
    """bool and str: the value as it is, of that type only."""
    if not isinstance(value, tp):
        raise _wrong_type(key, tp, value)
    return value


def _coerce_list(value: Any, tp: Any, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(key, tp, value)
    (item,) = typing.get_args(tp)
    return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_mapping(value: Any, tp: Any, key: str) -> dict:
    if not isinstance(value, Mapping):
        raise _wrong_type(key, tp, value)
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{key}: keys must be strings, got {bad!r}", key=key)
    return copy.deepcopy(dict(value))


#: plain schema types and how a value becomes one
_PLAIN = {
    bool: _coerce_exact,
    str: _coerce_exact,
    int: lambda v, tp, key: _to_int(v, key),
    float: lambda v, tp, key: _to_float(v, key),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as schema type `tp` (the one generic coercion), or a RecipeError naming `key`."""
    if tp is Any:
        return copy.deepcopy(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if _is_union(tp):
        return _coerce_union(value, tp, key)
    if tp in _PLAIN:
        return _PLAIN[tp](value, tp, key)
    if typing.get_origin(tp) is list:
        return _coerce_list(value, tp, key)
    if _is_free_dict(tp):
        return _coerce_mapping(value, tp, key)
    raise TypeError(f"recipe schema: unsupported type {tp!r} at {key}")


def _build(cls: type, value: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls)]
    allowed = [f.name for f in fields]
    if value is None:  # an empty section in YAML: all defaults
        value = {}
    if not isinstance(value, Mapping):
        where = prefix or "the recipe"
        raise RecipeError(
            f"{where}: expected a mapping with keys {', '.join(allowed)}, got {_describe(value)}",
            key=prefix,
            allowed=allowed,
        )
    for key in value:
        if key not in hints:
            raise _unknown_key(f"{prefix}.{key}" if prefix else str(key), allowed)
    kwargs = {}
    for f in fields:
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in value:
            kwargs[f.name] = _coerce(value[f.name], hints[f.name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key {dotted!r}", key=dotted, allowed=allowed)
    return cls(**kwargs)


def _check_values(obj: Any, prefix: str) -> None:
    for name, message in getattr(obj, "_problems", lambda: ())():
        dotted = f"{prefix}.{name}" if prefix else name
        raise RecipeError(f"{dotted}: {message}", key=dotted)
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _check_values(child, f"{prefix}.{f.name}" if prefix else f.name)
