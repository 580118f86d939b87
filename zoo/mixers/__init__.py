"""Token mixers. Importing this package registers every built-in mixer (one module each)."""

from zoo.mixers import hedgehog, linear_elu, lolcats, softmax, t2r  # noqa: F401  (registration)
from zoo.mixers.base import Mixer, build_mixer, get_mixer, list_mixers, register_mixer, repeat_kv

__all__ = ["Mixer", "build_mixer", "get_mixer", "list_mixers", "register_mixer", "repeat_kv"]
