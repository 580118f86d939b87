"""zoo: linearize pretrained Transformer LLMs with any registered token mixer."""

__version__ = "0.1.0"

from zoo.convert import linearize, register_families  # noqa: E402
from zoo.io import load_linearized, save_linearized  # noqa: E402
from zoo.mixers import Mixer, get_mixer, list_mixers, register_mixer  # noqa: E402  (registers built-ins)
from zoo.teacher import load_teacher  # noqa: E402

register_families()  # so AutoModelForCausalLM.from_pretrained reads saved linearized folders

__all__ = ["Mixer", "get_mixer", "list_mixers", "register_mixer", "linearize", "load_linearized",
           "save_linearized", "load_teacher", "__version__"]
