"""Where zoo keeps what it downloads and derives: `$ZOO_CACHE`, else `~/.cache/zoo` (see zoo.paths)."""

from __future__ import annotations

from zoo.paths import cache_dir

__all__ = ["cache_dir"]
