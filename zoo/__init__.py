"""zoo: linearize pretrained Transformer LLMs with any registered token mixer."""

__version__ = "0.1.0"

from zoo.mixers import Mixer, get_mixer, list_mixers, register_mixer  # noqa: E402  (registers built-ins)

__all__ = ["Mixer", "get_mixer", "list_mixers", "register_mixer", "__version__"]
