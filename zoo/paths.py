"""Where zoo keeps what it downloads and derives: `$ZOO_CACHE`, else `~/.cache/zoo` (no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The zoo cache folder (or a sub-folder of it, e.g. ``cache_dir("corpus")``), created if missing."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zoo")
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
