"""Token mixers. Importing this package imports every module in it, and each mixer module registers
its classes; a new mixer is one new file here."""

import pkgutil
from importlib import import_module

from zoo.mixers.base import Mixer, build_mixer, get_mixer, list_mixers, register_mixer, repeat_kv
from zoo.mixers.options import Option

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

__all__ = ["Mixer", "Option", "build_mixer", "get_mixer", "list_mixers", "register_mixer", "repeat_kv"]
