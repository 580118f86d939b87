"""The device and dtype a recipe asks for, and how results name the machine and the versions."""

from __future__ import annotations

import platform

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """The device in words, as results record it: "cuda (NVIDIA H100 80GB HBM3)", "cpu (x86_64, 2
    threads)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def versions() -> dict:
    import transformers

    import zoo

    return {"zoo": zoo.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def keep_device_blocks_whole() -> None:
    """Make `with torch.device(...)` blocks catch every tensor factory for the rest of the process; call it
    before loading a model with transformers.

    torch lists the factory functions such a block intercepts once, the first time one is used. transformers
    swaps torch.linspace for a wrapper while `from_pretrained` initializes a model; if torch's first use of a
    device block falls inside that swap, its list lacks torch.linspace for good, and a mixer later built on
    the meta device (preflight, block-wise scale-out) gets CPU tensors from it. One block used here, outside
    any swap, makes the list from the real functions. Cheap; later calls do nothing new."""
    with torch.device("cpu"):
        torch.empty(0)
