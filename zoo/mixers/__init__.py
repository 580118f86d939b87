"""Token mixers. Importing this package registers every built-in mixer."""

from importlib import import_module

from zoo.mixers.base import Mixer, build_mixer, get_mixer, list_mixers, register_mixer, repeat_kv

# One module per mixer; each registers itself on import. A module not yet written is skipped so the
# registry holds exactly what exists.
_BUILTIN = ["softmax", "linear_elu", "t2r", "hedgehog", "lolcats"]
for _name in _BUILTIN:
    try:
        import_module(f"zoo.mixers.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"zoo.mixers.{_name}":
            raise

__all__ = ["Mixer", "build_mixer", "get_mixer", "list_mixers", "register_mixer", "repeat_kv"]
