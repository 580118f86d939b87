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
  decoding (one token is a run of one). On the CPU in fp32, a decoding step of rows at one position whose
  token does not end its block is one C call (zoo/kernels/csrc/sparse_decode.c; `decode_in_c`), which
  writes the token into the current block's slot in place where no other step has (an older state reads
  only the slots before it); the PyTorch form runs where that kernel is not available.

The state is constant in the context: sinks + C + 2W keys, values and key features per key/value head, the
fp32 S and z, and the token count.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from zoo.kernels import native
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
    # and the one value of n of every row.
    cur_end: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    position: int | None = field(default=None, init=False, repr=False, compare=False)

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
            if j >= 1:
                first_real = max(0, sinks - (j - 1) * W)
                (cache_k, cache_v, cache_fk), S, z = _evict(
                    (cache_k, cache_v, cache_fk),
                    cached,
                    (prev_k, prev_v, prev_fk),
                    first_real,
                    S,
                    z,
                    C,
                    relative,
                )
            prev_k, prev_v, prev_fk = cur
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
        fused = decode_in_c(q, k, v, fq, fk, a, b, state, scale)
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


def decode_in_c(q, k, v, fq, fk, a, b, state: SparseHybridState, scale: float, maps=None):
    """One token per row (q [B, H, 1, D] ...), every row at one position n past its sinks, n + 1 not a
    block end, fp32 on the CPU: (y, next state) from one C call (zoo/kernels/csrc/sparse_decode.c); else
    None (the PyTorch form runs). With `maps` = (Wq [H, D, F/2], Wk [HKV, D, F/2], fq_scale), fq and fk
    are None and the C code computes the Hedgehog features itself."""
    fields = state.tensors()
    given = (fq, fk) if maps is None else maps[:2]
    if q.device.type != "cpu" or any(x.dtype != torch.float32 for x in (q, k, v, *given, *fields[:-1])):
        return None
    W, sinks, C = state.window, state.sinks, state.cache_size
    n0 = common_count(state.n, state.position)
    if n0 is None or n0 < sinks or (n0 + 1) % W == 0:
        return None
    entry = "zoo_sparse_hybrid_decode_f32" if maps is None else "zoo_hedgehog_sparse_decode_f32"
    fn = native.function("sparse_decode", entry, _C_ENTRIES[entry])
    if fn is None:
        return None
    B, H, _, D = q.shape
    HKV, DV, F_ = k.shape[1], v.shape[-1], state.cur_fk.shape[-1]
    r, j = n0 % W, n0 // W
    cached, open_sinks = held_keys(n0, W, sinks, C)[0], _open_sinks(j, W, sinks)
    cur, end = [state.cur_k, state.cur_v, state.cur_fk], state.cur_end
    if end is None or end[0] != r:  # another step wrote this slot (or none made cur_*): a copy of our own
        cur, end = [x.clone() for x in cur], [r]
    ins = [x.contiguous() for x in (q, given[0], k, v, given[1], a.float(), b.float())]
    kept = [x.contiguous() for x in (*fields[:8], *cur, *fields[11:13])]
    if any(x.data_ptr() != y.data_ptr() for x, y in zip(kept[8:11], cur)):
        return None  # cur_* must be written in place: not contiguous, so the PyTorch form runs
    y = q.new_empty(B, H, 1, DV)
    sizes = (B, HKV, H // HKV, D, DV, F_, W, sinks, C, open_sinks, cached, int(j >= 1), r)
    pointers = [x.data_ptr() for x in (*ins, kept[0], kept[1], kept[2], kept[3], kept[5], kept[6], *kept[8:])]
    threads = min(torch.get_num_threads(), B * HKV)  # the units: rows x key/value heads
    extra = () if maps is None else (float(maps[2]),)
    if fn(*sizes, *pointers, float(scale), y.data_ptr(), threads, *extra):
        raise MemoryError("zoo's C decode step could not allocate its scratch space")
    end[0] = r + 1
    new = SparseHybridState(*fields[:8], *cur, *fields[11:13], state.n + 1)
    new.cur_end, new.position = end, n0 + 1
    return y, new


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
