"""Token mixers. Importing this package imports every module in it, and each mixer module registers
its classes; a new mixer is one new file here. Shared building blocks (features, tokens, the bases
feature_map, gated, hybrid, delta_base) register nothing; see zoo.mixers.base for the contract."""

import pkgutil
from importlib import import_module

from zoo.kernels.positions import token_positions
from zoo.mixers.base import (
    Mixer,
    build_mixer,
    get_mixer,
    list_mixers,
    register_mixer,
    repeat_kv,
    unregister_mixer,
)
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Mixer",
    "Option",
    "Tokens",
    "build_mixer",
    "get_mixer",
    "list_mixers",
    "register_mixer",
    "repeat_kv",
    "token_positions",
    "unregister_mixer",
]
