"""The registered mixers' names and `zoo list` columns, without importing torch when nothing changed.

The first call imports the mixers (torch with them) and keeps their class attributes in the zoo cache under
a key made of zoo's version, the size and time of each file in zoo/mixers and the installed `zoo.mixers`
entry points; later calls with the same key read that file. A changed mixer file or plugin makes a new key.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import entry_points
from pathlib import Path

from zoo.atomic import write_json
from zoo.paths import cache_dir

#: the class attributes `zoo list` shows
FIELDS = ("family", "state_size", "description")
MIXER_FILES = Path(__file__).resolve().parent / "mixers"


def catalog_key(folder: Path = MIXER_FILES) -> str:
    """What the catalog depends on, hashed: zoo's version, the mixer files and the plugin entry points."""
    import zoo

    digest = hashlib.sha256(zoo.__version__.encode())
    for path in sorted(folder.glob("*.py")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for ep in sorted(entry_points(group="zoo.mixers"), key=lambda e: e.name):
        digest.update(f"{ep.name}={ep.value}:{getattr(ep.dist, 'version', '')}\n".encode())
    return digest.hexdigest()[:16]


def mixer_catalog() -> list[dict]:
    """[{"name", "family", "state_size", "description"}] for every registered mixer, sorted by name."""
    path = cache_dir("catalog") / f"mixers-{catalog_key()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    from zoo.mixers import get_mixer, list_mixers

    rows = [{"name": name, **{f: getattr(get_mixer(name), f) for f in FIELDS}} for name in list_mixers()]
    write_json(path, rows)
    return rows
