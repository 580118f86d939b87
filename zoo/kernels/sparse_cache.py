"""The terraced window hybrid with a sparse global cache (LoLA, McDermott et al. 2025, arXiv:2505.23666): the
older keys that the linear state would recall worst are kept exactly, as extra softmax keys.

Blocks of W positions (LoLCATs' terraced window). A query at position p, in block j = p // W, sees:
- softmax keys: all of block j - 1 and block j up to p (the window); the first `sinks` tokens once they have
  left the window (attention sinks); and the sparse cache, up to C older key/value pairs kept exactly;
- linear keys: every other older key, through the state S = sum phi(k)^T v [F, Dv] and z = sum phi(k) [F].

  y_p = (a sum_soft e^{q.k*scale - m} v + b phi(q) S) / (a sum_soft e^{q.k*scale - m} + b phi(q) . z)

with m the max of q.k*scale over the softmax keys: the window hybrid's formula (zoo.kernels.window_hybrid)
with c = 0. a and b are per query head.

Eviction. When block j is complete, block j - 1 leaves the window (the next query is in block j + 1). Its
tokens that are not sinks, and the cache's entries, are the candidates. Each is scored per key/value head by
its self-recall error ||v - phi(k) S / (phi(k) . z + eps)||^2 against the linear state before the eviction:
how badly the state would give back v when asked with k (or, with `relative`, that error over ||v||^2:
`kept_keys`). The C highest stay in the cache (in the order of their positions) and the rest are added to
S and z. So after n tokens, with E = max(0, (n // W - 1) W)
tokens out of the window and E' = max(0, E - sinks) of them not sinks, the cache holds min(C, E') keys
and the state E' - min(C, E') (`held_keys`).

Forms (keys, values and key features come once per key/value head; query head h reads head h // (H / HKV)):
- sparse_hybrid_naive: the reference, from the start of a sequence. A loop over rows, key/value heads and
  tokens, in fp32, over Python lists of each head's keys.
- sparse_hybrid: each row's real tokens (padding dropped) in runs up to the next block end, vectorized
  within a run, with the eviction at each block end, from and to a SparseHybridState. Training, prefill and
  decoding (one token is a run of one). On the CPU in fp32, a decoding step of rows at one position past
  their sinks is one C call (zoo/kernels/csrc/sparse_decode.c; `decode_in_c`), which writes the token into
  the current block's slot in place where no other step has (an older state reads only the slots before
  it); at a block end the eviction follows in PyTorch. The PyTorch form runs where that kernel is not
  available.

The state is constant in the context: sinks + C + 2W keys, values and key features per key/value head, the
fp32 S and z, and the token count.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from zoo.kernels import native
from zoo.kernels._utils import same_objects
from zoo.kernels.positions import common_count

#: added to phi(k) . z in the self-recall error (an empty state recalls 0: the error is ||v||^2)
RECALL_EPS = 1e-6


def held_keys(n, window: int, sinks: int, cache_size: int):
    """(in the sparse cache, in the linear state) after n tokens (an int, or a tensor of them): see the
    module docstring. n = a query's position gives what that query reads."""
    if isinstance(n, int):
        out = max(0, max(0, n // window - 1) * window - sinks)
        return min(out, cache_size), out - min(out, cache_size)
    out = ((n // window - 1).clamp(min=0) * window - sinks).clamp(min=0)
    cached = out.clamp(max=cache_size)
    return cached, out - cached


@dataclass
class SparseHybridState:
    """What a sequence leaves behind, per key/value head: the sinks' keys and values, the cache, the previous
    and the current block, and the linear state. Slots not yet used are zero."""

    sink_k: torch.Tensor  # [B, HKV, sinks, D]
    sink_v: torch.Tensor  # [B, HKV, sinks, Dv]
    cache_k: torch.Tensor  # [B, HKV, C, D]: the first held_keys(n)[0] slots used, oldest first
    cache_v: torch.Tensor  # [B, HKV, C, Dv]
    cache_fk: torch.Tensor  # [B, HKV, C, F]
    prev_k: torch.Tensor  # [B, HKV, W, D]: block n // W - 1 (zeros before it exists)
    prev_v: torch.Tensor  # [B, HKV, W, Dv]
    prev_fk: torch.Tensor  # [B, HKV, W, F]
    cur_k: torch.Tensor  # [B, HKV, W, D]: the first n mod W tokens of block n // W
    cur_v: torch.Tensor  # [B, HKV, W, Dv]
    cur_fk: torch.Tensor  # [B, HKV, W, F]
    S: torch.Tensor  # [B, HKV, F, Dv] fp32
    z: torch.Tensor  # [B, HKV, F] fp32
    n: torch.Tensor  # [B] int64: real tokens seen
    # Set by the one-token C step only (not init fields: a state rebuilt from its fields has neither):
    # [the first slot of cur_* no step has written], shared by the states that step made from one another,
    # so that a step writes its token in place only into a slot no other step has (else it copies cur_*);
    # the one value of n of every row; and the C step bound to these tensors and the layer's weights.
    cur_end: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    position: int | None = field(default=None, init=False, repr=False, compare=False)
    c_step: _CStep | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, B, HKV, D, Dv, F_, window, sinks, cache_size, dtype, device) -> SparseHybridState:
        def zeros(length, dim, dt=dtype):
            return torch.zeros(B, HKV, length, dim, dtype=dt, device=device)

        slots = []
        for length in (cache_size, window, window):
            slots += [zeros(length, D), zeros(length, Dv), zeros(length, F_, torch.float32)]
        return cls(
            zeros(sinks, D),
            zeros(sinks, Dv),
            *slots,
            torch.zeros(B, HKV, F_, Dv, dtype=torch.float32, device=device),
            torch.zeros(B, HKV, F_, dtype=torch.float32, device=device),
            torch.zeros(B, dtype=torch.long, device=device),
        )

    @property
    def window(self) -> int:
        return self.cur_k.shape[2]

    @property
    def sinks(self) -> int:
        return self.sink_k.shape[2]

    @property
    def cache_size(self) -> int:
        return self.cache_k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """Every field, in order (what a SparseHybridState is built from)."""
        return [
            self.sink_k,
            self.sink_v,
            self.cache_k,
            self.cache_v,
            self.cache_fk,
            self.prev_k,
            self.prev_v,
            self.prev_fk,
            self.cur_k,
            self.cur_v,
            self.cur_fk,
            self.S,
            self.z,
            self.n,
        ]


def _open_sinks(block: int, window: int, sinks: int) -> int:
    """The sinks a query in block `block` reads as extra softmax keys: those out of its window."""
    return min(sinks, max(0, (block - 1) * window))


def self_recall_error(k_feat, v, S, z, eps=RECALL_EPS):
    """||v - phi(k) S / (phi(k) . z + eps)||^2 per key: phi(k) [..., N, F], v [..., N, Dv], S [..., F, Dv],
    z [..., F] -> [..., N], fp32."""
    recalled = (k_feat @ S) / ((k_feat @ z[..., None]) + eps)
    return (v.float() - recalled).pow(2).sum(-1)


def kept_keys(err, v, cache_size: int, relative: bool, eps=RECALL_EPS):
    """Indices [..., cache_size] of the keys the cache keeps, in position order: the highest self-recall
    errors `err` [..., N]. `relative`: ranked by err / (||v||^2 + eps) (how wrong the recalled value is for
    its size, so a value does not stay for its norm alone), ties (as when the state is empty and every key
    recalls 0) broken by err."""
    if not relative:
        return err.topk(cache_size, dim=-1).indices.sort(dim=-1).values
    rel = err / (v.float().pow(2).sum(-1) + eps)
    by_err = err.argsort(dim=-1, descending=True, stable=True)
    order = by_err.gather(-1, rel.gather(-1, by_err).argsort(dim=-1, descending=True, stable=True))
    return order[..., :cache_size].sort(dim=-1).values


def _evict(cache, cached: int, block, first_real: int, S, z, cache_size: int, relative: bool):
    """The eviction at a block end, for rows at one position. cache: (k, v, fk) [B, HKV, C, *] with `cached`
    used slots; block: (k, v, fk) [B, HKV, W, *] leaving the window, its tokens from `first_real` on not
    sinks. Returns the new cache (padded with zeros to C) and S, z."""
    cand = [torch.cat([c[:, :, :cached], x[:, :, first_real:]], 2) for c, x in zip(cache, block)]
    ck, cv, cf = cand
    n_cand = ck.shape[2]
    if n_cand <= cache_size:
        return (
            [torch.cat([x, x.new_zeros(*x.shape[:2], cache_size - n_cand, x.shape[3])], 2) for x in cand],
            S,
            z,
        )
    err = self_recall_error(cf, cv, S, z)  # [B, HKV, n_cand]
    keep = kept_keys(err, cv, cache_size, relative)  # [B, HKV, C]
    new_cache = [x.gather(2, keep[..., None].expand(-1, -1, -1, x.shape[3])) for x in cand]
    leave = torch.ones_like(err, dtype=torch.bool).scatter_(-1, keep, False)
    out_f = cf * leave[..., None]
    S = S + out_f.transpose(-1, -2) @ cv.to(S.dtype)
    z = z + out_f.sum(-2)
    return new_cache, S, z


def _block_end(cache, cached: int, prev, cur, j: int, sinks: int, S, z, cache_size: int, relative: bool):
    """Block j is complete (cur: its W tokens' (k, v, fk)): block j - 1 (prev) leaves the window, its
    tokens that are not sinks competing with the cache's `cached` entries (`_evict`), and block j becomes
    the previous one. Returns the new cache, prev, S and z."""
    if j >= 1:
        first_real = max(0, sinks - (j - 1) * prev[0].shape[2])
        cache, S, z = _evict(cache, cached, prev, first_real, S, z, cache_size, relative)
    return cache, cur, S, z


def _rows(q, k, v, fq, fk, a, b, state: list[torch.Tensor], window: int, scale: float, relative: bool):
    """Rows that all stand at one position, every token real: q [B, H, T, D], fq [B, H, T, F], k [B, HKV, T,
    D], v [B, HKV, T, Dv], fk [B, HKV, T, F]; a, b [H]; `state`: SparseHybridState.tensors() of these rows.
    Returns y [B, H, T, Dv] (fp32) and the rows' new state tensors."""
    sink_k, sink_v, cache_k, cache_v, cache_fk, prev_k, prev_v, prev_fk, cur_k, cur_v, cur_fk, S, z, n = state
    B, H, T, D = q.shape
    HKV, C, sinks = k.shape[1], cache_k.shape[2], sink_k.shape[2]
    G, W = H // HKV, window
    n0 = int(n[0])
    fa, fb = a.float().view(1, HKV, G, 1, 1), b.float().view(1, HKV, G, 1, 1)
    cdt = torch.float32
    cur = [x[:, :, : n0 % W] for x in (cur_k, cur_v, cur_fk)]
    ys, t, pos = [], 0, n0
    while t < T:
        r0, j = pos % W, pos // W
        m = min(T - t, W - r0)
        run_k, run_v, run_f = k[:, :, t : t + m], v[:, :, t : t + m], fk[:, :, t : t + m]
        if pos < sinks:  # the run's first tokens are sinks: their keys and values are kept
            take = min(sinks, pos + m) - pos
            sink_k, sink_v = (
                torch.cat([old[:, :, :pos], new[:, :, :take].to(old.dtype), old[:, :, pos + take :]], 2)
                for old, new in ((sink_k, run_k), (sink_v, run_v))
            )
        cached = held_keys(pos, W, sinks, C)[0]
        open_sinks = _open_sinks(j, W, sinks)
        window_kv = [prev_k, prev_v] if j >= 1 else [prev_k[:, :, :0], prev_v[:, :, :0]]
        keys = torch.cat([sink_k[:, :, :open_sinks], cache_k[:, :, :cached], window_kv[0], cur[0], run_k], 2)
        vals = torch.cat([sink_v[:, :, :open_sinks], cache_v[:, :, :cached], window_kv[1], cur[1], run_v], 2)
        qg = q[:, :, t : t + m].reshape(B, HKV, G, m, D).to(cdt)
        s = (qg @ keys.to(cdt)[:, :, None].transpose(-1, -2)) * scale  # [B, HKV, G, m, N]
        N = keys.shape[2]
        later = torch.ones(m, N, dtype=torch.bool, device=q.device).triu(N - m + 1)
        s = s.masked_fill(later, float("-inf"))  # the run's own later tokens
        e = (s - s.amax(-1, keepdim=True)).exp() * fa
        fqg = fq[:, :, t : t + m].reshape(B, HKV, G, m, -1).to(cdt)
        num = e @ vals.to(cdt)[:, :, None] + fb * (fqg @ S[:, :, None])
        den = e.sum(-1, keepdim=True) + fb * (fqg @ z[:, :, None, :, None])
        ys.append((num / den).reshape(B, H, m, -1))
        cur = [torch.cat([c, x.to(c.dtype)], 2) for c, x in zip(cur, (run_k, run_v, run_f))]
        t, pos = t + m, pos + m
        if pos % W == 0:  # block j is complete: block j - 1 leaves the window
            (cache_k, cache_v, cache_fk), (prev_k, prev_v, prev_fk), S, z = _block_end(
                (cache_k, cache_v, cache_fk),
                cached,
                (prev_k, prev_v, prev_fk),
                cur,
                j,
                sinks,
                S,
                z,
                C,
                relative,
            )
            cur = [x[:, :, :0] for x in cur]
    cur = [torch.cat([c, c.new_zeros(*c.shape[:2], W - c.shape[2], c.shape[3])], 2) for c in cur]
    new = [sink_k, sink_v, cache_k, cache_v, cache_fk, prev_k, prev_v, prev_fk, *cur, S, z, n + T]
    y = torch.cat(ys, 2) if ys else q.new_zeros(B, H, 0, v.shape[-1], dtype=cdt)
    return y, new


def sparse_hybrid(
    q, k, v, fq, fk, a, b, *, window, sinks, cache_size, scale=None, state=None, key_mask=None, relative=False
):
    """q [B, H, T, D], fq [B, H, T, F]; k [B, HKV, T, D], v [B, HKV, T, Dv], fk [B, HKV, T, F] (one per
    key/value head); a, b [H]; key_mask [B, T] (True/1: real; padded tokens are dropped: they enter nothing
    and their outputs are 0). Returns y [B, H, T, Dv] in q's dtype and the SparseHybridState after the call
    (see the module docstring). Rows at one position without padding (a batch of prompts of one length,
    `generate`'s steps) run together; others one by one, their padding dropped. `relative`: the eviction
    scores each key by its relative self-recall error (self_recall_error)."""
    B, H, T, D = q.shape
    HKV, Dv, F_ = k.shape[1], v.shape[-1], fk.shape[-1]
    if window < 1 or H % HKV:
        raise ValueError(
            f"sparse_hybrid: need window >= 1 and the key/value heads dividing the query heads; got "
            f"window={window}, {H} query heads, {HKV} key/value heads"
        )
    scale = D**-0.5 if scale is None else scale
    if state is None:
        state = SparseHybridState.empty(B, HKV, D, Dv, F_, window, sinks, cache_size, k.dtype, q.device)
    elif (state.window, state.sinks, state.cache_size) != (window, sinks, cache_size):
        raise ValueError(
            f"state of window={state.window}, sinks={state.sinks}, cache_size={state.cache_size}; called "
            f"with window={window}, sinks={sinks}, cache_size={cache_size}"
        )
    if T == 1 and (key_mask is None or bool(key_mask.bool().all())):
        fused = decode_in_c(q, k, v, fq, fk, a, b, state, scale, relative=relative)
        if fused is not None:
            return fused
    fields = state.tensors()
    if common_count(state.n, state.position) is not None and (
        key_mask is None or bool(key_mask.bool().all())
    ):
        y, new = _rows(q, k, v, fq, fk, a, b, fields, window, scale, relative)
        return y.to(q.dtype), SparseHybridState(*new)
    y = q.new_zeros(B, H, T, Dv, dtype=torch.float32)
    rows = []
    for r in range(B):
        row = [x[r : r + 1] for x in fields]
        pick = [x[r : r + 1] for x in (q, k, v, fq, fk)]
        real = None if key_mask is None else key_mask[r].bool()
        if real is None or bool(real.all()):
            y_row, new = _rows(*pick, a, b, row, window, scale, relative)
            y[r] = y_row[0]
        else:
            idx = real.nonzero().squeeze(1)
            real_pick = [x.index_select(2, idx) for x in pick]
            y_real, new = _rows(*real_pick, a, b, row, window, scale, relative)
            y[r] = y[r].index_copy(1, idx, y_real[0])
        rows.append(new)
    return y.to(q.dtype), SparseHybridState(*(torch.cat(parts) for parts in zip(*rows)))


_C_ARGTYPES = [*[ctypes.c_int64] * 13, *[ctypes.c_void_p] * 18, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
_C_ENTRIES = {  # C entry -> its argument types
    "zoo_sparse_hybrid_decode_f32": _C_ARGTYPES,
    "zoo_hedgehog_sparse_decode_f32": [*_C_ARGTYPES, ctypes.c_float],
}


class _CStep:
    """One layer's C decoding step bound to a state's tensors (the sinks, the cache, the two blocks, S and
    z, which a step that ends no block leaves where they are) and to the layer's weights a, b (and maps):
    made by `decode_in_c` after its full checks, and carried by the states its steps make, so that the next
    token's step checks only what changes (the token's tensors and its position)."""

    def __init__(
        self, fn, state: SparseHybridState, cur: list[torch.Tensor], a, b, maps, H: int, scale, relative
    ):
        B, HKV, W, D = state.cur_k.shape
        self.fn, self.a, self.b, self.scale = fn, a, b, float(scale)
        self.maps = None if maps is None else maps[:2]  # (Wq, Wk)
        self.relative = relative
        self.W, self.sinks, self.C = W, state.sinks, state.cache_size
        self.B, self.H, self.DV = B, H, state.cur_v.shape[-1]
        fields = state.tensors()
        # kept alive here: the C call gets their addresses
        self.held = [
            a.float().contiguous(),
            b.float().contiguous(),
            *fields[:4],
            *fields[5:7],
            *cur,
            *fields[11:13],
        ]
        self.cur = cur
        self.shape = (B, HKV, H // HKV, D, self.DV, state.cur_fk.shape[-1], W, self.sinks, self.C)
        self.weights = [x.data_ptr() for x in self.held[:2]]
        self.kept = [x.data_ptr() for x in self.held[2:]]
        self.threads = min(torch.get_num_threads(), B * HKV)  # the units: rows x key/value heads

    def made_for(self, a, b, c, maps, scale, relative: bool | None = None) -> bool:
        """Whether this step was made for these weights (c: None, as for every `lola` layer; maps: (Wq, Wk),
        or None where the features are given), this scale and (unless None: the layer's own) eviction."""
        return (
            a is self.a
            and b is self.b
            and c is None
            and same_objects(maps, self.maps)
            and float(scale) == self.scale
            and relative in (None, self.relative)
        )

    def continues(self, state: SparseHybridState, n0: int) -> bool:
        """Whether `state` holds this step's tensors (a state made by this step, or by another step from
        one) and the token's slot, n0 mod W, is one no other step has written."""
        end = state.cur_end
        return state.cur_k is self.cur[0] and end is not None and end[0] == n0 % self.W

    def next_token(self, q, k, v, state: SparseHybridState, fq_scale: float):
        """The step for a state that a step made (its position known), the features computed from the
        maps: (y, next state), or None (then the full checks run)."""
        n0 = state.position
        if n0 is None or not self.continues(state, n0):
            return None
        return self(q, k, v, None, None, state, n0, fq_scale)

    def __call__(self, q, k, v, fq, fk, state: SparseHybridState, n0: int, fq_scale: float | None):
        """(y, next state) for the token q [B, H, 1, D], k, v (fq, fk where no maps) at position n0 of a
        state it `continues`, or None where it does not apply (the sinks, inputs not fp32 on the CPU, another
        batch). A token that ends its block is followed by the eviction (`_block_end`, in PyTorch)."""
        given = (fq, fk) if self.maps is None else self.maps
        ins = [x.contiguous() for x in (q, given[0], k, v, given[1])]
        if q.shape[0] != self.B or q.device.type != "cpu" or any(x.dtype != torch.float32 for x in ins):
            return None
        if n0 < self.sinks:
            return None
        W, r, j, end = self.W, n0 % self.W, n0 // self.W, state.cur_end
        cached, open_sinks = held_keys(n0, W, self.sinks, self.C)[0], _open_sinks(j, W, self.sinks)
        y = q.new_empty(self.B, self.H, 1, self.DV)
        pointers = [x.data_ptr() for x in ins]
        extra = () if self.maps is None else (float(fq_scale),)
        sizes = (*self.shape, open_sinks, cached, int(j >= 1), r)
        if self.fn(
            *sizes, *pointers, *self.weights, *self.kept, self.scale, y.data_ptr(), self.threads, *extra
        ):
            raise MemoryError("zoo's C decode step could not allocate its scratch space")
        end[0] = r + 1
        if r + 1 == W:
            return y, self._after_block(state, j, cached, n0 + 1)
        new = SparseHybridState(*state.tensors()[:-1], state.n + 1)
        new.cur_end, new.position, new.c_step = end, n0 + 1, self
        return y, new

    def _after_block(self, state: SparseHybridState, j: int, cached: int, n: int) -> SparseHybridState:
        """The state after the token that completed block j (written into its last slot): the eviction,
        then a new, empty current block of this state's own (its slots are written in place from 0)."""
        f = state.tensors()
        cache, prev, S, z = _block_end(
            f[2:5], cached, f[5:8], f[8:11], j, self.sinks, f[11], f[12], self.C, self.relative
        )
        new = SparseHybridState(
            f[0], f[1], *cache, *prev, *(torch.zeros_like(x) for x in f[8:11]), S, z, state.n + 1
        )
        new.cur_end, new.position = [0], n
        return new


def decode_in_c(q, k, v, fq, fk, a, b, state: SparseHybridState, scale: float, maps=None, relative=False):
    """One token per row (q [B, H, 1, D] ...), every row at one position n past its sinks, fp32 on the
    CPU: (y, next state) from one C call (zoo/kernels/csrc/sparse_decode.c), followed at a block end by
    the eviction in PyTorch (`relative`: as `sparse_hybrid`'s); else None (the PyTorch form runs). With
    `maps` = (Wq [H, D, F/2], Wk [HKV, D, F/2], fq_scale), fq and fk are None and the C code computes the
    Hedgehog features itself."""
    n0 = common_count(state.n, state.position)
    if n0 is None:
        return None
    fq_scale = None if maps is None else maps[2]
    step = state.c_step
    made_for = step is not None and step.made_for(
        a, b, None, None if maps is None else maps[:2], scale, relative
    )
    if made_for and step.continues(state, n0):
        return step(q, k, v, fq, fk, state, n0, fq_scale)
    fields = state.tensors()
    given = (fq, fk) if maps is None else maps[:2]
    if q.device.type != "cpu" or any(x.dtype != torch.float32 for x in (q, k, v, *given, *fields[:-1])):
        return None
    W = state.window
    if n0 < state.sinks:
        return None
    entry = "zoo_sparse_hybrid_decode_f32" if maps is None else "zoo_hedgehog_sparse_decode_f32"
    fn = native.function("sparse_decode", entry, _C_ENTRIES[entry])
    if fn is None:
        return None
    if any(not x.is_contiguous() for x in fields[:13]):
        return None  # cur_* must be written in place; the others are read where they are
    r = n0 % W
    if state.cur_end is None or state.cur_end[0] != r:  # another step wrote this slot (or none made cur_*)
        state = SparseHybridState(*fields[:8], *(x.clone() for x in fields[8:11]), *fields[11:])
        state.cur_end, state.position = [r], n0
    step = _CStep(
        fn, state, [state.cur_k, state.cur_v, state.cur_fk], a, b, maps, q.shape[1], scale, relative
    )
    return step(q, k, v, fq, fk, state, n0, fq_scale)


def sparse_hybrid_naive(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window,
    sinks,
    cache_size,
    scale=None,
    key_mask=None,
    eps=RECALL_EPS,
    relative=False,
):
    """The reference of `sparse_hybrid` for whole sequences (no state): y [B, H, T, Dv] in fp32. Every
    key/value head of every row keeps Python lists of (position, k, v, phi(k)) for its sinks, its cache and
    its window, and S, z; each token first evicts the block that leaves its window, then joins, then is
    read by its G query heads."""
    B, H, T, D = q.shape
    HKV = k.shape[1]
    G, W = H // HKV, window
    scale = D**-0.5 if scale is None else scale
    y = torch.zeros(B, H, T, v.shape[-1])
    for r in range(B):
        for h in range(HKV):
            sink, cache, recent = [], [], []
            S = torch.zeros(fk.shape[-1], v.shape[-1])
            z = torch.zeros(fk.shape[-1])
            p = 0
            for t in range(T):
                if key_mask is not None and not bool(key_mask[r, t]):
                    continue
                j = p // W
                if p % W == 0 and j >= 2:  # block j - 2 leaves the window of this and every later query
                    leaving = [e for e in recent if e[0] // W == j - 2]
                    recent = [e for e in recent if e[0] // W >= j - 1]
                    cand = cache + [e for e in leaving if e[0] >= sinks]
                    errs = [((e[2] - e[3] @ S / (e[3] @ z + eps)) ** 2).sum().detach() for e in cand]
                    rel = [x / ((e[2] ** 2).sum().detach() + eps) for x, e in zip(errs, cand)]
                    rank = [(-float(r), -float(x)) if relative else (-float(x),) for r, x in zip(rel, errs)]
                    order = sorted(range(len(cand)), key=lambda i: rank[i])
                    kept = sorted(order[:cache_size])
                    for i in order[cache_size:]:
                        S = S + torch.outer(cand[i][3], cand[i][2])
                        z = z + cand[i][3]
                    cache = [cand[i] for i in kept]
                entry = (p, k[r, h, t].float(), v[r, h, t].float(), fk[r, h, t].float())
                recent.append(entry)
                if p < sinks:
                    sink.append(entry)
                soft = [e for e in sink if e[0] < (j - 1) * W] + cache + recent
                for g in range(G):
                    qh = h * G + g
                    s = torch.stack([q[r, qh, t].float() @ e[1] for e in soft]) * scale
                    e_w = torch.exp(s - s.max()) * float(a[qh])
                    f = fq[r, qh, t].float()
                    num = (e_w[:, None] * torch.stack([e[2] for e in soft])).sum(0) + float(b[qh]) * (f @ S)
                    den = e_w.sum() + float(b[qh]) * (f @ z)
                    y[r, qh, t] = num / den
                p += 1
    return y
