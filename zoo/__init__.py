"""zoo: linearize pretrained Transformer LLMs with any registered token mixer.

The package imports lazily: `import zoo` costs next to nothing, and each public name below loads its
module (torch, transformers) on first use, so `zoo --help` and a bad recipe's error come in seconds.
The converted model families (`zoo_llama`, ...) are registered with the transformers Auto classes when
`zoo.convert` is imported, which `zoo.linearize`, `zoo.load_linearized` and `zoo.register_families()`
all do; after any of them, `AutoModelForCausalLM.from_pretrained` reads a saved linearized folder.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "linearize": "zoo.convert",
    "register_families": "zoo.convert",
    "swap_mixers": "zoo.convert",
    "load_linearized": "zoo.io",
    "save_linearized": "zoo.io",
    "Mixer": "zoo.mixers",
    "get_mixer": "zoo.mixers",
    "list_mixers": "zoo.mixers",
    "register_mixer": "zoo.mixers",
    "load_teacher": "zoo.teacher",
}

__all__ = [
    "Mixer",
    "get_mixer",
    "list_mixers",
    "register_mixer",
    "linearize",
    "swap_mixers",
    "load_linearized",
    "save_linearized",
    "load_teacher",
    "register_families",
    "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        try:  # a submodule asked for as an attribute (zoo.recipe, zoo.cli ...)
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'zoo' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
