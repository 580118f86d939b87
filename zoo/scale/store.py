"""The hidden-state store: the teacher's hidden states entering each block, computed once, on disk.

Layout of a store folder (shared by every rank)::

    index.json                              what is stored: model, layers, shapes, dtype, shards
    layer-009/shard-00003.safetensors       {"hidden": [rows, T, hidden]}: the input of layer 9 for
                                            sequences 3*S .. 3*S+rows-1 (S = shard_sequences)

Size: bytes per element x stored layers x tokens x hidden. For Llama 3.1 405B at 50M tokens in bf16
that is 2 x 126 x 50e6 x 16384 = 206 TB with a block per layer, and 2 x 14 x 50e6 x 16384 = 22.9 TB
with blocks of 9 (126 / 9 = 14 stored layers), the LoLCATs blog's "200 TB" and "22 TB".

Writing is streaming and resumable: the teacher runs one block at a time (only its layers in
memory) over one shard at a time (only its rows in memory), each shard computed from the same
shard of the previous stored layer. A shard is written atomically (temporary file, then rename) and
never written again; one that is missing, truncated or not what the index says is (re)written.
Shards are spread over the ranks of a torchrun launch (shard s goes to rank s % world).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from zoo.atomic import atomic_file, write_json
from zoo.scale.skeleton import CheckpointReader, partial_model, run_layers

FORMAT = "zoo-hidden-states/1"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def tokens_fingerprint(input_ids: torch.Tensor) -> str:
    """sha256 of the token ids [N, T] (as int64): the store holds states of exactly these sequences."""
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class StoreLayout:
    """What a store holds; `index.json` is this, written once, checked on every open."""

    model: str
    num_layers: int
    layers: list[int]  # the layers whose input is stored, ascending (0 = the embeddings' output)
    sequences: int
    seq_len: int
    hidden_size: int
    dtype: str  # "float32", "bfloat16", "float16"
    shard_sequences: int
    tokens_sha256: str
    format: str = FORMAT

    @property
    def num_shards(self) -> int:
        return -(-self.sequences // self.shard_sequences)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_sequences, min(self.sequences, (shard + 1) * self.shard_sequences))

    def nbytes(self) -> int:
        element = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return element * len(self.layers) * self.sequences * self.seq_len * self.hidden_size


def shard_path(root: Path, layer: int, shard: int) -> Path:
    return root / f"layer-{layer:03d}" / f"shard-{shard:05d}.safetensors"


def _header(path: Path) -> dict | None:
    """The safetensors header of `path` if the file is whole (its size matches the header), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return header if 8 + length + max(ends, default=0) == size else None


class HiddenStateStore:
    """A store folder: its layout, which shards are whole, and reads of stored rows."""

    def __init__(self, root: str | Path, layout: StoreLayout):
        self.root = Path(root)
        self.layout = layout

    @classmethod
    def open(cls, root: str | Path, layout: StoreLayout, create: bool) -> HiddenStateStore:
        """Open the store at `root`, which must hold `layout` (it is created there when `create`)."""
        root = Path(root)
        index = root / "index.json"
        if index.is_file():
            found = json.loads(index.read_text())
            wanted = asdict(layout)
            differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            if differ:
                raise ValueError(
                    f"the hidden-state store {root} was built for another run (it differs in "
                    f"{', '.join(differ)}); give stage1.blockwise.store another folder or delete it"
                )
        elif create:
            write_json(index, asdict(layout))
        else:
            raise FileNotFoundError(f"no hidden-state store at {root} (no index.json)")
        return cls(root, layout)

    def shard_is_whole(self, layer: int, shard: int) -> bool:
        header = _header(shard_path(self.root, layer, shard))
        if header is None or "hidden" not in header:
            return False
        rows = self.layout.shard_rows(shard)
        dtype = _SAFETENSORS_DTYPES[getattr(torch, self.layout.dtype)]
        return (
            header["hidden"]["shape"] == [len(rows), self.layout.seq_len, self.layout.hidden_size]
            and header["hidden"]["dtype"] == dtype
            and header.get("__metadata__", {}).get("rows") == f"{rows.start}:{rows.stop}"
        )

    def missing(self, layer: int, shards) -> list[int]:
        return [s for s in shards if not self.shard_is_whole(layer, s)]

    def write_shard(self, layer: int, shard: int, hidden: torch.Tensor) -> None:
        """Write one shard atomically: whole under its name, or not there at all."""
        rows = self.layout.shard_rows(shard)
        tensor = hidden.detach().to("cpu", getattr(torch, self.layout.dtype)).contiguous()
        payload = save(
            {"hidden": tensor},
            metadata={"layer": str(layer), "rows": f"{rows.start}:{rows.stop}", "model": self.layout.model},
        )
        with atomic_file(shard_path(self.root, layer, shard), "wb") as f:
            f.write(payload)

    def read_rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The stored input of `layer` for sequences `rows` (1-D), in that order: [len(rows), T, hidden]."""
        wanted = [int(r) for r in rows]
        bad = [r for r in wanted if not 0 <= r < self.layout.sequences]
        if bad:
            raise IndexError(f"rows {bad[:5]} are outside the store's {self.layout.sequences} sequences")
        per_shard: dict[int, list[int]] = {}
        for r in wanted:
            per_shard.setdefault(r // self.layout.shard_sequences, []).append(r)
        found: dict[int, torch.Tensor] = {}
        for shard, shard_rows in per_shard.items():
            with safe_open(str(shard_path(self.root, layer, shard)), "pt") as f:
                sliced = f.get_slice("hidden")
                for r in shard_rows:
                    local = r - shard * self.layout.shard_sequences
                    found[r] = sliced[local : local + 1]
        return torch.cat([found[r] for r in wanted])

    def inputs(self, layer: int) -> StoredInputs:
        return StoredInputs(self, layer)


class StoredInputs:
    """The stored inputs of one layer as a training set for `train_loop`: shape (N, T), and
    indexing by a 1-D tensor of rows gives their hidden states [rows, T, hidden]."""

    ndim = 2

    def __init__(self, store: HiddenStateStore, layer: int):
        self.store, self.layer = store, layer
        self.shape = torch.Size((store.layout.sequences, store.layout.seq_len))

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.store.read_rows(self.layer, rows)


@torch.no_grad()
def build_store(
    store: HiddenStateStore,
    reader: CheckpointReader,
    input_ids: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> int:
    """Write this rank's missing shards of every stored layer; returns how many it wrote.

    Stored layer l_j is computed from stored layer l_{j-1} (the embeddings for the first) through
    the teacher's layers l_{j-1} .. l_j - 1, which are the only layers in memory meanwhile."""
    layout = store.layout
    if tuple(input_ids.shape) != (layout.sequences, layout.seq_len):
        raise ValueError(
            f"the store holds {layout.sequences} x {layout.seq_len} tokens, got {tuple(input_ids.shape)}"
        )
    mine = [s for s in range(layout.num_shards) if s % world == rank]
    written = 0
    previous: int | None = None
    for layer in layout.layers:
        todo = store.missing(layer, mine)
        if todo:
            print(
                f"zoo: store: rank {rank} writes {len(todo)} shard(s) of the input of layer {layer}",
                file=sys.stderr,
                flush=True,
            )
            if previous is None:
                model = partial_model(reader, dtype, range(0, layer), device, embeddings=True)
            else:
                model = partial_model(reader, dtype, range(previous, layer), device)
            for shard in todo:
                rows = layout.shard_rows(shard)
                parts = []
                for start in range(rows.start, rows.stop, batch_size):
                    batch = torch.arange(start, min(rows.stop, start + batch_size))
                    if previous is None:
                        hidden = model.model.embed_tokens(input_ids[batch].to(device))
                        if layer > 0:
                            hidden = run_layers(model, hidden, layer - 1)
                    else:
                        hidden = run_layers(model, store.read_rows(previous, batch).to(device), layer - 1)
                    parts.append(hidden.cpu())
                store.write_shard(layer, shard, torch.cat(parts))
                written += 1
            del model
        previous = layer
    return written
