"""Sliding-window softmax + linear attention hybrid (LoLCATs), in one layer with one normalizer.

For a query at position t (positions count real tokens only, so padding never shifts a window; see
zoo.kernels.positions.token_positions):

  y_t = (a * sum_{s in win(t)} e^{q_t.k_s*scale - m_t} v_s + b * sum_{s < t, s not in win(t)} (fq_t.fk_s) v_s)
        / (a * sum_{s in win(t)} e^{q_t.k_s*scale - m_t}   + b * sum_{s < t, s not in win(t)} fq_t.fk_s)

with m_t = max_{s in win(t)} q_t.k_s*scale, and a, b per-head factors [H]. This is the LoLCATs
formulation, taken as the *definition*: the window branch is max-normalized (its top key weighs
exactly a) and the linear weights are compared with that, not with the raw e^{q.k}. Because the
window of every query is always at hand (in the chunk band or in the decoding state), m_t is computed
exactly in every form, so the result is exact under any split, and stable: e^{. - m} <= 1 and the
denominator is >= a for a real query. (Scaling the linear terms by e^{-m_t} instead would make the
branch balance depend on the absolute logit scale and underflow the linear branch for large logits.)

Optional c [H] adds c * fq_t.fk_s to the weight of the in-window keys; a=0, b=c=1 is plain causal
linear attention over all keys (the "linear branch alone" ablation), a=1, b=0 is sliding-window
softmax alone.

Attention sinks (`sinks` = S > 0, StreamingLLM's observation): the first S real tokens are softmax keys
of every later query, inside its window or not, and never linear ones: win(t) above becomes
win(t) U {0, ..., S-1}, in the max m_t too. A pretrained model parks much of its attention on the first
tokens; a window without them loses it (SmolLM2-135M, 256-token blocks, no training: sliding window of
64 alone 174.5 held-out perplexity on Austen, with 1 sink 56.8, full attention 51.2). Every form keeps
the sinks' key features at zero (fk of positions < S, in the state's slots too), so the linear part and
the linear state skip them by construction, and adds a sink outside the query's window as an extra
softmax column (one inside the window is already there).

Windows:
- plain (terraced=False): win(t) = {t-W+1, ..., t}; W = 0 (with sinks): no window, the sinks are the only
  softmax keys and every other key, the query's own included, is linear.
- terraced (terraced=True): blocks of W positions; a query in block j attends by softmax to all keys
  of block j-1 and causally within block j; older keys go to the linear part.

Forms (same signature; each returns y [B, H, T, Dv] in q's dtype and the new WindowHybridState):
- window_hybrid_naive: a loop over time in fp32 over the whole history (the reference).
- window_hybrid_chunked: linear in T; a loop over query chunks of C tokens (a multiple of W, default
  >= 64), vectorized within each chunk: the softmax and in-band linear parts use the current and
  previous chunk's keys under a fixed band mask; older chunks come from a running linear state
  [S | z] updated once per chunk. The CPU training path (and the prefill path).
- window_hybrid_step: recurrent decoding from the state, one token at a time.
- window_hybrid: picks the step form for a few tokens with a state, the chunked form otherwise.

The state keeps only O(W) tokens: the last L real keys, values and fk (L = W plain, 2W terraced),
plus the fp32 linear state S [B,H,F,Dv], z [B,H,F] of every real key older than those, the number
n [B] of real tokens seen, and with sinks the first S real keys and values. Padded keys (key_mask 0)
are dropped: they enter neither the window, the linear part nor the state, and their outputs are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoo.kernels._utils import group_heads, repeat_heads
from zoo.kernels.positions import token_positions


def state_len(window: int, terraced: bool) -> int:
    """Tokens cached in the state: W for the plain window, 2W for the terraced one."""
    return 2 * window if terraced else window


@dataclass
class SlotBuffer:
    """Room for window slots past a state's own, so that a decoding step appends its token in place
    instead of copying the window (zoo.kernels.window_decode): k, v, fk [B, H, capacity, *], of which the
    state's k, v, fk are views of its L slots. `end` is the first slot that no step has written yet: a
    step appends at `end` only where its state's slots end there, so a state that another step already
    extended is copied into a new buffer, never overwritten."""

    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor
    end: int

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.fk))


@dataclass
class WindowHybridState:
    """Decoding state. Window slots are right-aligned: slot i holds a real token iff i >= L - min(n, L);
    the real slots hold the last min(n, L) real tokens in order (unused slots are zero).

    `slots`, set by the in-place decoding step only, is the SlotBuffer that k, v, fk are views of,
    `position` the one value of n when that step knows every row is there (so the next step reads no
    tensor to learn it), and `c_step` that step's C call bound to the layer's weights and the sinks
    (zoo.kernels.window_decode), so that the next token checks only what changes. None is an init field: a
    state rebuilt from its fields (moved, reordered, repeated) has none, and the next decoding step copies
    its slots into a new buffer."""

    k: torch.Tensor  # [B, H, L, D]
    v: torch.Tensor  # [B, H, L, Dv]
    fk: torch.Tensor  # [B, H, L, F]
    S: torch.Tensor  # [B, H, F, Dv], fp32 (or fp64): keys that have left the window
    z: torch.Tensor  # [B, H, F]
    n: torch.Tensor  # [B] int64: real tokens seen
    window: int
    terraced: bool
    sink_k: torch.Tensor | None = None  # [B, H, S, D]: the first S real keys (attention sinks); None: S = 0
    sink_v: torch.Tensor | None = None  # [B, H, S, Dv] (slots past n are zero)
    slots: SlotBuffer | None = field(default=None, init=False, repr=False, compare=False)
    position: int | None = field(default=None, init=False, repr=False, compare=False)
    c_step: object | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cached_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def sinks(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        sinks = () if self.sink_k is None else (self.sink_k, self.sink_v)
        return (self.k, self.v, self.fk, self.S, self.z, self.n, *sinks)

    def slot_valid(self) -> torch.Tensor:
        return _slot_valid(self.n, self.cached_tokens)

    def select(self, index) -> WindowHybridState:
        """The state of the batch rows `index` (a list or tensor of row indices): for beam reordering."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.n.device)
        k, v, fk, S, z, n, *sinks = (t.index_select(0, index) for t in self._tensors())
        return WindowHybridState(k, v, fk, S, z, n, self.window, self.terraced, *sinks)

    def nbytes(self) -> int:
        """Bytes the state holds: its tensors, and the room of its slot buffer where it has one."""
        own = sum(t.numel() * t.element_size() for t in self._tensors())
        if self.slots is None:
            return own
        return (
            own - sum(t.numel() * t.element_size() for t in (self.k, self.v, self.fk)) + self.slots.nbytes()
        )

    def _per_head(self, fn, groups: int) -> WindowHybridState:
        k, v, fk, S, z, _, *sinks = (t if t is self.n else fn(t, groups) for t in self._tensors())
        return WindowHybridState(k, v, fk, S, z, self.n, self.window, self.terraced, *sinks)

    def repeat_heads(self, groups: int) -> WindowHybridState:
        """Each head repeated `groups` times (zoo.kernels._utils.repeat_heads)."""
        return self._per_head(repeat_heads, groups)

    def group_heads(self, groups: int) -> WindowHybridState:
        """One head per run of `groups` identical ones (zoo.kernels._utils.group_heads)."""
        return self._per_head(group_heads, groups)

    @classmethod
    def empty(cls, B, H, D, Dv, F_, window, terraced, dtype, device, acc_dtype=torch.float32, sinks=0):
        L = state_len(window, terraced)
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        sink_slots = (z(B, H, sinks, D), z(B, H, sinks, Dv)) if sinks else ()
        return cls(
            z(B, H, L, D),
            z(B, H, L, Dv),
            z(B, H, L, F_),
            z(B, H, F_, Dv, dt=acc_dtype),
            z(B, H, F_, dt=acc_dtype),
            torch.zeros(B, dtype=torch.long, device=device),
            window,
            terraced,
            *sink_slots,
        )


def _slot_valid(n: torch.Tensor, L: int) -> torch.Tensor:
    return torch.arange(L, device=n.device)[None, :] >= (L - n.clamp(max=L))[:, None]


def _member(pq: torch.Tensor, pk: torch.Tensor, window: int, terraced: bool) -> torch.Tensor:
    """Is key position pk inside the softmax window of query position pq (given pk <= pq)?"""
    if terraced:
        return (
            torch.div(pk, window, rounding_mode="floor") >= torch.div(pq, window, rounding_mode="floor") - 1
        )
    return (pq - pk) < window


def sink_open(pq: torch.Tensor, sinks: int, window: int, terraced: bool) -> torch.Tensor:
    """[..., S]: is sink i a softmax key of query position pq through being a sink (i <= pq, outside
    pq's window; inside it, the window already has it)? pq: [...] positions."""
    i = torch.arange(sinks, device=pq.device)
    pq = pq[..., None]
    return (i <= pq) & ~_member(pq, i, window, terraced)


def drop_sink_features(fk, valid, n0, sinks):
    """fk with the rows of the sinks (real tokens at positions < sinks) zeroed: a sink is never a linear
    key."""
    if not sinks:
        return fk
    is_sink = valid & (token_positions(n0, valid, valid.shape[1]) < sinks)
    return fk * ~is_sink[:, None, :, None]


def updated_sink_slots(k, v, valid, st, sinks):
    """The sinks' keys and values [B, H, S, *] after this call: the state's, and this call's real tokens at
    positions the state had not reached yet. (A query only looks at sinks at or before its own position.)"""
    B, H, T, _ = k.shape
    pos = token_positions(st.n, valid, T)
    slot = torch.where(valid & (pos < sinks), pos, sinks)
    src = torch.full((B, sinks + 1), T, dtype=torch.long, device=k.device)
    src = src.scatter(1, slot, torch.arange(T, device=k.device).expand(B, T).contiguous())[:, :sinks]
    here = (src < T)[:, None, :, None]

    def pick(x, old):
        x = torch.cat([x, x.new_zeros(B, H, 1, x.shape[-1])], 2)
        picked = x.gather(2, src[:, None, :, None].expand(B, H, sinks, x.shape[-1])).to(old.dtype)
        return torch.where(here, picked, old)

    return pick(k, st.sink_k), pick(v, st.sink_v)


def _prepare(q, k, v, fq, fk, a, b, c, window, terraced, scale, state, key_mask, sinks=0):
    B, H, T, D = q.shape
    if (
        k.shape != (B, H, T, D)
        or v.shape[:3] != (B, H, T)
        or fq.shape[:3] != (B, H, T)
        or fk.shape != fq.shape
    ):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"fq {tuple(fq.shape)}, fk {tuple(fk.shape)} (k, v must be repeated to H heads)"
        )
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if window < 1 and not (window == 0 and sinks > 0 and not terraced):
        raise ValueError(
            f"window must be >= 1, or 0 (no window: softmax over the sinks alone) with sinks "
            f">= 1 and the plain window; got window={window}, sinks={sinks}, "
            f"terraced={terraced}"
        )
    cdt = torch.promote_types(q.dtype, torch.float32)
    facs = [
        None if f is None else torch.as_tensor(f, dtype=cdt, device=q.device).expand(H) for f in (a, b, c)
    ]
    scale = D**-0.5 if scale is None else scale
    valid = (
        torch.ones(B, T, dtype=torch.bool, device=q.device)
        if key_mask is None
        else key_mask.to(device=q.device).bool()
    )
    if valid.shape != (B, T):
        raise ValueError(f"key_mask must be [B, T] = {(B, T)}, got {tuple(valid.shape)}")
    fresh = state is None
    if fresh:
        state = WindowHybridState.empty(
            B,
            H,
            D,
            v.shape[-1],
            fq.shape[-1],
            window,
            terraced,
            k.dtype,
            q.device,
            acc_dtype=cdt,
            sinks=sinks,
        )
    elif state.window != window or state.terraced != terraced or state.sinks != sinks:
        raise ValueError(
            f"state was made with window={state.window}, terraced={state.terraced}, "
            f"sinks={state.sinks}; called with window={window}, terraced={terraced}, "
            f"sinks={sinks}"
        )
    # the sinks, once for every form: their key features zeroed (never linear keys), their keys and values
    sink_slots = updated_sink_slots(k, v, valid, state, sinks) if sinks else None
    return cdt, facs, scale, valid, state, fresh, drop_sink_features(fk, valid, state.n, sinks), sink_slots


def _one_query(qt, fqt, keys, values, fks, win, lin, a, b, c, S, z, scale, sinks=None):
    """Numerator [B, H, Dv] and denominator [B, H] of one query per row (qt [B, H, D], fqt [B, H, F]):
    softmax over the keys [B, H, N, *] in `win`, linear over those in `lin` ([B, 1, N] masks) and the
    linear state S, z; `sinks` = (keys, values, open [B, 1, S]) adds the open sinks as softmax keys.
    a, b, c: [1, H, 1] (c may be None)."""
    s = (torch.einsum("bhd,bhnd->bhn", qt, keys) * scale).masked_fill(~win, float("-inf"))
    lw = torch.einsum("bhf,bhnf->bhn", fqt, fks)
    w_lin = b * lw * lin if c is None else b * lw * lin + c * lw * win
    if sinks is not None:
        sink_k, sink_v, sink_open = sinks
        s_sink = (torch.einsum("bhd,bhnd->bhn", qt, sink_k) * scale).masked_fill(~sink_open, float("-inf"))
        s, values = torch.cat([s, s_sink], -1), torch.cat([values, sink_v], 2)
        w_lin = torch.cat([w_lin, torch.zeros_like(s_sink)], -1)
    m = s.amax(-1, keepdim=True)
    w = a * torch.exp(s - m.masked_fill(torch.isinf(m), 0.0)) + w_lin
    num = torch.einsum("bhn,bhnd->bhd", w, values) + b * torch.einsum("bhf,bhfd->bhd", fqt, S)
    den = w.sum(-1) + b[..., 0] * torch.einsum("bhf,bhf->bh", fqt, z)
    return num, den


def window_hybrid_naive(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    sinks=0,
):
    """Reference: loop over time; each query scores every real key seen so far (state slots included)."""
    cdt, (a, b, c), scale, valid, st, _, fk, sink_slots = _prepare(
        q, k, v, fq, fk, a, b, c, window, terraced, scale, state, key_mask, sinks
    )
    B, H, T, D = q.shape
    L = state_len(window, terraced)
    a, b = a.view(1, H, 1), b.view(1, H, 1)
    c = None if c is None else c.view(1, H, 1)
    hk, hv, hfk = st.k.to(cdt), st.v.to(cdt), st.fk.to(cdt)
    hvalid = st.slot_valid()
    hpos = st.n[:, None] - L + torch.arange(L, device=q.device)
    n = st.n.clone()
    ys = []
    for t in range(T):
        real = valid[:, t]
        pos = n.clone()
        n = n + real.long()
        hk = torch.cat([hk, k[:, :, t : t + 1].to(cdt)], 2)
        hv = torch.cat([hv, v[:, :, t : t + 1].to(cdt)], 2)
        hfk = torch.cat([hfk, fk[:, :, t : t + 1].to(cdt)], 2)
        hvalid = torch.cat([hvalid, real[:, None]], 1)
        hpos = torch.cat([hpos, pos[:, None]], 1)
        causal = hvalid & (hpos <= pos[:, None])
        win = (causal & _member(pos[:, None], hpos, window, terraced))[:, None]  # [B, 1, N]
        lin = causal[:, None] & ~win
        sink = None if sink_slots is None else (*sink_slots, sink_open(pos, sinks, window, terraced)[:, None])
        num, den = _one_query(
            q[:, :, t].to(cdt), fq[:, :, t].to(cdt), hk, hv, hfk, win, lin, a, b, c, st.S, st.z, scale, sink
        )
        keep = real[:, None]
        y = num / torch.where(keep, den, torch.ones_like(den))[..., None]
        ys.append(torch.where(keep[..., None], y, torch.zeros_like(y)))
    y = torch.stack(ys, 2) if ys else q.new_zeros(B, H, 0, v.shape[-1], dtype=cdt)
    # New state: per row, the last L real tokens stay in the window; older ones go to S, z.
    S, z = st.S.clone(), st.z.clone()
    nk, nv, nfk = (torch.zeros_like(t[:, :, :L]) for t in (hk, hv, hfk))
    Srows, zrows = [], []
    for bi in range(B):
        idx = hvalid[bi].nonzero().flatten()
        keep, gone = idx[max(len(idx) - L, 0) :], idx[: max(len(idx) - L, 0)]
        r = len(keep)
        if r:
            nk[bi, :, L - r :], nv[bi, :, L - r :], nfk[bi, :, L - r :] = (
                hk[bi, :, keep],
                hv[bi, :, keep],
                hfk[bi, :, keep],
            )
        Srows.append(S[bi] + torch.einsum("hnf,hnd->hfd", hfk[bi, :, gone], hv[bi, :, gone]))
        zrows.append(z[bi] + hfk[bi, :, gone].sum(1))
    new = WindowHybridState(
        nk.to(k.dtype),
        nv.to(v.dtype),
        nfk.to(fk.dtype),
        torch.stack(Srows),
        torch.stack(zrows),
        n,
        window,
        terraced,
        *(sink_slots or ()),
    )
    return y.to(q.dtype), new


def _bands(t: torch.Tensor, C: int) -> tuple[torch.Tensor, ...]:
    """[BH, N, X] -> one [BH, 2C, X] view per chunk of C rows: the previous chunk's rows, then its own (zeros
    before the first and after the last row). Views of one padded tensor, not copies; under autograd their
    gradients gather into one buffer (not a full-size gradient per slice, nor a copy per chunk)."""
    n = -(-t.shape[1] // C)
    padded = torch.nn.functional.pad(t, (0, 0, C, (n + 1) * C - C - t.shape[1]))  # [BH, (n + 1) C, X]
    return padded.unfold(1, 2 * C, C).transpose(2, 3).unbind(1)


def _chunk_len(window: int, chunk_size: int | None) -> int:
    """The query chunk length C: `chunk_size`, by default the smallest multiple of the window >= 64 (64
    without a window). C must be a multiple of the window, so that no terraced block straddles two chunks."""
    W = window
    C = chunk_size or (W * max(1, -(-64 // W)) if W else 64)
    if W and C % W:
        raise ValueError(f"chunk_size ({C}) must be a multiple of window ({W})")
    return C


def _scratch_layout(q, k, v, fq, fk, valid, st, fresh, n_call, window, terraced, cdt):
    """Lay out [state slots, this call] in a scratch sequence of N rows. q, k, v, fq, fk: this call's
    [B, H, T, *] in the compute dtype cdt; valid [B, T]; st the state (empty when `fresh`); n_call [B] this
    call's real tokens. Returns the scratch q, k, v, fq, fk [B, H, N, *] (zero outside the real rows), lo [B]
    (first real row), R [B] (real rows), N, base [B] (the position of scratch row 0) and tgt [B, T]: the
    scratch row of each of this call's tokens (0 for padding)."""
    B, H, _, D = q.shape
    dev = q.device
    W, L = window, state_len(window, terraced)
    # Real tokens are contiguous, starting at lo, and scratch index = position - base, base a multiple of W
    # for the terraced window (so block boundaries fall on chunk boundaries). Padding is dropped; empty rows
    # are zero.
    Le = 0 if fresh else L
    ext_valid = valid if fresh else torch.cat([st.slot_valid(), valid], 1)
    Ne = ext_valid.shape[1]
    r_slots = torch.zeros_like(st.n) if fresh else st.n.clamp(max=L)
    first = st.n - r_slots
    base = torch.div(first, W, rounding_mode="floor") * W if terraced else first
    lo, R = first - base, r_slots + n_call
    N = max(int((lo + R).max()), 1)
    rank = ext_valid.long().cumsum(1) - 1
    real_idx = torch.full((B, Ne + 1), Ne, dtype=torch.long, device=dev)
    real_idx.scatter_(
        1, torch.where(ext_valid, rank, Ne), torch.arange(Ne, device=dev).expand(B, Ne).contiguous()
    )
    r = torch.arange(N, device=dev)[None, :] - lo[:, None]
    ok = ((r >= 0) & (r < R[:, None]))[:, None, :, None]
    src = real_idx.gather(1, r.clamp(0, Ne)).clamp(max=Ne - 1)[:, None, :, None]

    def lay(t, slots):
        e = t if fresh else torch.cat([slots.to(cdt), t], 2)
        return e.gather(2, src.expand(B, H, N, e.shape[-1])) * ok

    q, fq = lay(q, q.new_zeros(B, H, Le, D)), lay(fq, fq.new_zeros(B, H, Le, fq.shape[-1]))
    k, v, fk = lay(k, st.k), lay(v, st.v), lay(fk, st.fk)
    tgt = torch.where(ext_valid, rank + lo[:, None], 0)[:, Le:]
    return (q, k, v, fq, fk), lo, R, N, base, tgt


def _band_masks(C, window, terraced, a, b, c, B, H, cdt, dev):
    """The fixed band pattern of a query chunk against [previous chunk, its own chunk]: query row r sits at
    band row C + r, key column u at u. a, b, c: [H] (c may be None). Returns a3, b3 [BH, 1, 1] (a, b for
    every batch row and head), coef_all [BH, C, 2C] (the linear weight factor: b outside the window, plus c
    inside it), bias_all [C, 2C] (0 in the window, -inf elsewhere) and the band columns [ulo, uhi) that can
    hold a linear weight."""
    W = window
    i = torch.arange(C, device=dev)[:, None] + C
    j = torch.arange(2 * C, device=dev)[None, :]
    member = (j // W >= i // W - 1) if terraced else (i - j < W)
    pwin, plin = (j <= i) & member, (j <= i) & ~member
    a3, b3 = a.repeat(B).view(B * H, 1, 1), b.repeat(B).view(B * H, 1, 1)
    coef_all = b3 * plin if c is None else b3 * plin + c.repeat(B).view(B * H, 1, 1) * pwin
    bias_all = torch.zeros(C, 2 * C, dtype=cdt, device=dev).masked_fill(~pwin, float("-inf"))
    # Band columns that can hold a linear weight (none at all for the terraced window with C == W).
    lcols = (plin if c is None else plin | pwin).any(0).nonzero().flatten().tolist()
    ulo, uhi = (lcols[0], lcols[-1] + 1) if lcols else (0, 0)
    return a3, b3, coef_all, bias_all, ulo, uhi


def _sink_columns(sink_slots, cdt):
    """The sinks as extra softmax columns: keys [BH, S, D] and values with a ones column [BH, S, Dv + 1] in
    the compute dtype cdt; (None, None) without sinks."""
    if sink_slots is None:
        return None, None
    sink_k = sink_slots[0].to(cdt).flatten(0, 1)  # [BH, S, D]
    sink_v1 = torch.cat(
        [sink_slots[1].to(cdt), torch.ones_like(sink_slots[1][..., :1], dtype=cdt)], -1
    ).flatten(0, 1)
    return sink_k, sink_v1


@dataclass
class _ChunkPlan:
    """What every query chunk of window_hybrid_chunked shares; fixed for the call. BH = B * H."""

    B: int
    H: int
    N: int  # scratch rows
    C: int  # chunk length
    Dv: int
    window: int
    terraced: bool
    scale: float
    identity: bool  # no state, no padding: every scratch row is real, its position its index
    svalid: torch.Tensor  # [B, N]: real scratch rows
    base: torch.Tensor  # [B]: position of scratch row 0
    a3: torch.Tensor  # [BH, 1, 1]
    b3: torch.Tensor  # [BH, 1, 1]
    coef_all: torch.Tensor  # [BH, C, 2C] (_band_masks)
    bias_all: torch.Tensor  # [C, 2C]
    ulo: int  # band columns [ulo, uhi) can hold a linear weight
    uhi: int
    sinks: int
    sink_k: torch.Tensor | None  # [BH, S, D]; None without sinks
    sink_v1: torch.Tensor | None  # [BH, S, Dv + 1]


def _chunk_softmax(p: _ChunkPlan, qc, kb, vb, q0, q1, k0, u0):
    """The softmax part [BH, q1 - q0, Dv + 1] (numerator, then denominator) of the query rows q0:q1 (qc
    [BH, q1 - q0, D]): a * e^{s - m} over the keys k0:q1 in each query's window (kb [BH, q1 - k0, D], vb
    [BH, q1 - k0, Dv + 1], from band column u0 on) and over the sinks outside it, m the max of those
    logits (0 for a row without any)."""
    B, H = p.B, p.H
    bias = p.bias_all[: q1 - q0, u0 : u0 + q1 - k0]
    if not p.identity:
        kok = p.svalid[:, None, None, k0:q1]
        bias = bias.masked_fill(~kok, float("-inf")).expand(B, H, -1, -1).flatten(0, 1)
    s = torch.baddbmm(bias, qc, kb.transpose(1, 2), alpha=p.scale)
    m = s.amax(-1, keepdim=True)
    if p.sink_k is not None:  # the sinks outside each query's window: extra softmax columns
        qpos = p.base[:, None] + torch.arange(q0, q1, device=qc.device)
        closed = ~sink_open(qpos, p.sinks, p.window, p.terraced)[:, None].expand(B, H, -1, -1).flatten(0, 1)
        s_sink = torch.bmm(qc, p.sink_k.transpose(1, 2)).mul_(p.scale).masked_fill_(closed, float("-inf"))
        m = torch.maximum(m, s_sink.amax(-1, keepdim=True))
    if not p.identity:  # rows of padding have no key at all
        m = m.masked_fill(torch.isinf(m), 0.0)
    out = torch.bmm(p.a3 * torch.exp(s - m), vb)
    if p.sink_k is not None:
        out = torch.baddbmm(out, p.a3 * torch.exp(s_sink - m), p.sink_v1)
    return out


def _chunk_band_linear(p: _ChunkPlan, out, fqc, fkb, vb, q0, q1, k0, u0):
    """out [BH, q1 - q0, Dv + 1] plus the linear weights of the band keys k0:q1 (fkb [BH, q1 - k0, F], vb
    [BH, q1 - k0, Dv + 1], from band column u0 on) for the query rows q0:q1 (fqc [BH, q1 - q0, F]): fq.fk
    times coef_all, over the band columns that can hold one."""
    l0, l1 = max(p.ulo, u0), min(p.uhi, u0 + q1 - k0)
    if l1 <= l0:
        return out
    # linear weights of the band keys outside the window (and inside it, with c)
    coef = p.coef_all[:, : q1 - q0, l0:l1]
    if not p.identity:
        jj0 = k0 + l0 - u0
        coef = (coef.view(p.B, p.H, *coef.shape[1:]) * p.svalid[:, None, None, jj0 : jj0 + l1 - l0]).flatten(
            0, 1
        )
    lw = torch.bmm(fqc, fkb[:, l0 - u0 : l1 - u0].transpose(1, 2)) * coef
    return torch.baddbmm(out, lw, vb[:, l0 - u0 : l1 - u0])


def _chunk_output(p: _ChunkPlan, ch, qc, fqc, kband, fkband, vband, S):
    """y [BH, q1 - q0, Dv] of query chunk ch, scratch rows q0:q1 (qc [BH, q1 - q0, D], fqc [BH, q1 - q0, F]):
    softmax and linear over its band (kband, fkband, vband [BH, 2C, *]: chunks ch - 1 and ch), linear over
    the running state S = [S | z] [BH, F, Dv + 1] of chunks <= ch - 2. Rows of padding are 0."""
    C = p.C
    q0, q1 = ch * C, min((ch + 1) * C, p.N)
    k0 = max(q0 - C, 0)
    u0 = C - (q0 - k0)  # band column of key k0
    kb, fkb, vb = (t[:, u0 : C + q1 - q0] for t in (kband, fkband, vband))
    out = _chunk_softmax(p, qc, kb, vb, q0, q1, k0, u0)
    out = _chunk_band_linear(p, out, fqc, fkb, vb, q0, q1, k0, u0)
    out = torch.addcmul(out, p.b3, torch.bmm(fqc, S))
    num, den = out[..., : p.Dv], out[..., p.Dv :]
    if p.identity:
        return num / den
    qok = p.svalid[:, q0:q1].repeat_interleave(p.H, 0)[..., None]
    return num / torch.where(qok, den, torch.ones_like(den)) * qok


def _finish_linear_state(S, S_fin, fks, vs, cut, jfull, pos, C, H):
    """The new state's [S | z] [BH, F, Dv + 1]: every real scratch row < cut [B] (the rows that leave the
    window). S: the running state after the chunk loop; S_fin: the running state once the chunks < jfull
    (gone in every row) were in, None if the loop ended before; fks, vs: the chunks [BH, C, *]; pos [N]."""
    if S_fin is None:
        for jj in range(max(len(fks) - 2, 0), jfull):
            S = torch.baddbmm(S, fks[jj].transpose(1, 2), vs[jj])
        S_fin = S
    cmax = int(cut.max())
    for jj in range(jfull, -(-cmax // C) if cmax > 0 else 0):
        g = (pos[None, jj * C : (jj + 1) * C] < cut[:, None]).to(S.dtype).repeat_interleave(H, 0)[..., None]
        S_fin = torch.baddbmm(S_fin, (fks[jj] * g).transpose(1, 2), vs[jj])
    return S_fin


def _new_state(k, v, fk, S_fin, st, n_call, lo, end, L, sink_slots):
    """The state after this call: in the window slots, the last L real scratch rows (lo <= row < end [B]) of
    k, v, fk [B, H, N, *]; S_fin [BH, F, Dv + 1] = [S | z] of the older real keys; n_call [B] more tokens."""
    B, H, N, Dv = v.shape
    S_fin = S_fin.view(B, H, *S_fin.shape[1:])
    sidx = end[:, None] - L + torch.arange(L, device=k.device)[None]
    sok = (sidx >= lo[:, None])[:, None, :, None]
    sidx = sidx.clamp(0, N - 1)[:, None, :, None]

    def slots(t, like):
        return (t.gather(2, sidx.expand(B, H, L, t.shape[-1])) * sok).to(like.dtype)

    return WindowHybridState(
        slots(k, st.k),
        slots(v, st.v),
        slots(fk, st.fk),
        S_fin[..., :Dv].contiguous(),
        S_fin[..., Dv].contiguous(),
        st.n + n_call,
        st.window,
        st.terraced,
        *(sink_slots or ()),
    )


def window_hybrid_chunked(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    sinks=0,
):
    """Chunked form, linear in T: a loop over query chunks of C tokens (C a multiple of W, default the
    smallest >= 64), vectorized within each chunk. Chunk j's queries score the keys of chunks j-1 and j
    under a fixed band mask (softmax inside the window, linear outside); chunks <= j-2 come from the
    running linear state; the sinks outside a query's window are extra softmax columns. Working sets stay
    chunk-sized, so they stay in the CPU caches."""
    cdt, (a, b, c), scale, valid, st, fresh, fk, sink_slots = _prepare(
        q, k, v, fq, fk, a, b, c, window, terraced, scale, state, key_mask, sinks
    )
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    L = state_len(window, terraced)
    C = _chunk_len(window, chunk_size)
    dev, out_dtype = q.device, q.dtype
    q, k, v, fq, fk = (t.to(cdt) for t in (q, k, v, fq, fk))
    n_call = valid.sum(1)
    identity = fresh and bool(valid.all())
    if identity:  # training: no state, no padding; positions are the time indices
        lo, R, N, base, tgt = torch.zeros_like(n_call), n_call, T, torch.zeros_like(n_call), None
    else:
        (q, k, v, fq, fk), lo, R, N, base, tgt = _scratch_layout(
            q, k, v, fq, fk, valid, st, fresh, n_call, window, terraced, cdt
        )
    end = lo + R
    pos = torch.arange(N, device=dev)
    svalid = (pos[None] >= lo[:, None]) & (pos[None] < end[:, None])  # [B, N] real scratch rows
    a3, b3, coef_all, bias_all, ulo, uhi = _band_masks(C, window, terraced, a, b, c, B, H, cdt, dev)
    # Values get a ones column so that one matmul yields numerator and denominator; S_aug = [S | z].
    # Split into chunks once: slicing one big tensor per chunk would make autograd allocate a full-size
    # gradient for every slice (quadratic traffic in the backward pass).
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    qs, fqs, fks, vs = (t.flatten(0, 1).split(C, 1) for t in (q, fq, fk, v1))
    kbands, fkbands, vbands = (_bands(t.flatten(0, 1), C) for t in (k, fk, v1))
    S = torch.cat([st.S.to(cdt), st.z.to(cdt)[..., None]], -1).flatten(0, 1)  # [BH, F, Dv+1]
    sink_k, sink_v1 = _sink_columns(sink_slots, cdt)
    plan = _ChunkPlan(
        B,
        H,
        N,
        C,
        Dv,
        window,
        terraced,
        scale,
        identity,
        svalid,
        base,
        a3,
        b3,
        coef_all,
        bias_all,
        ulo,
        uhi,
        sinks,
        sink_k,
        sink_v1,
    )
    cut = end - L  # scratch rows < cut leave the window: they end in the new state's S, z
    jfull = int(cut.clamp(min=0).min()) // C  # chunks entirely gone in every row
    S_fin = None
    ys = []
    for ch in range(len(qs)):
        if ch >= 2:
            S = torch.baddbmm(S, fks[ch - 2].transpose(1, 2), vs[ch - 2])
        if ch == jfull + 1:
            S_fin = S
        ys.append(_chunk_output(plan, ch, qs[ch], fqs[ch], kbands[ch], fkbands[ch], vbands[ch], S))
    y = torch.cat(ys, 1).view(B, H, N, Dv)
    # New state: the last L real scratch rows stay in the window; older real rows join S, z.
    new = _new_state(
        k,
        v,
        fk,
        _finish_linear_state(S, S_fin, fks, vs, cut, jfull, pos, C, H),
        st,
        n_call,
        lo,
        end,
        L,
        sink_slots,
    )
    if not identity:
        y = y.gather(2, tgt[:, None, :, None].expand(B, H, T, Dv)) * valid[:, None, :, None]
    return y.to(out_dtype), new


def window_hybrid_step(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    sinks=0,
):
    """Recurrent form for decoding: one token at a time against the O(W) state."""
    cdt, (a, b, c), scale, valid, st, _, fk, sink_slots = _prepare(
        q, k, v, fq, fk, a, b, c, window, terraced, scale, state, key_mask, sinks
    )
    sink_cdt = None if sink_slots is None else tuple(x.to(cdt) for x in sink_slots)
    B, H, T, D = q.shape
    L = state_len(window, terraced)
    a, b = a.view(1, H, 1), b.view(1, H, 1)
    c = None if c is None else c.view(1, H, 1)
    kw, vw, fkw = st.k.to(cdt), st.v.to(cdt), st.fk.to(cdt)
    S, z, n = st.S.to(cdt), st.z.to(cdt), st.n
    ar = torch.arange(L, device=q.device)
    ys = []
    for t in range(T):
        real = valid[:, t]
        kk = torch.cat([kw, k[:, :, t : t + 1].to(cdt)], 2)
        vv = torch.cat([vw, v[:, :, t : t + 1].to(cdt)], 2)
        ff = torch.cat([fkw, fk[:, :, t : t + 1].to(cdt)], 2)
        ok = torch.cat([_slot_valid(n, L), real[:, None]], 1)
        pos = torch.cat([n[:, None] - L + ar, n[:, None]], 1)
        member = _member(n[:, None], pos, window, terraced)
        win, lin = (ok & member)[:, None], (ok & ~member)[:, None]
        sink = None if sink_cdt is None else (*sink_cdt, sink_open(n, sinks, window, terraced)[:, None])
        num, den = _one_query(
            q[:, :, t].to(cdt), fq[:, :, t].to(cdt), kk, vv, ff, win, lin, a, b, c, S, z, scale, sink
        )
        y = num / torch.where(real[:, None], den, torch.ones_like(den))[..., None]
        ys.append(y * real[:, None, None])
        # A real token enters the window; the oldest of [slots, token] (if real) leaves it for S, z: the
        # oldest slot, or without a window (L = 0) the token itself.
        ev = (real & (n >= L)).to(cdt)[:, None, None]
        S = S + ev[..., None] * ff[:, :, 0, :, None] * vv[:, :, 0, None, :]
        z = z + ev * ff[:, :, 0]
        r4 = real[:, None, None, None]
        kw, vw, fkw = (torch.where(r4, x[:, :, 1:], old) for x, old in ((kk, kw), (vv, vw), (ff, fkw)))
        n = n + real.long()
    y = torch.stack(ys, 2) if ys else q.new_zeros(B, H, 0, v.shape[-1], dtype=cdt)
    new = WindowHybridState(
        kw.to(st.k.dtype),
        vw.to(st.v.dtype),
        fkw.to(st.fk.dtype),
        S,
        z,
        n,
        window,
        terraced,
        *(sink_slots or ()),
    )
    return y.to(q.dtype), new


def window_hybrid(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    step_max_tokens=4,
    sinks=0,
):
    """Dispatch: the step form for up to `step_max_tokens` tokens after a state, the chunked form
    otherwise."""
    fn = window_hybrid_step if state is not None and q.shape[2] <= step_max_tokens else window_hybrid_chunked
    return fn(
        q,
        k,
        v,
        fq,
        fk,
        a,
        b,
        window=window,
        terraced=terraced,
        scale=scale,
        state=state,
        key_mask=key_mask,
        c=c,
        chunk_size=chunk_size,
        sinks=sinks,
    )


def window_hybrid_weights(q, k, fq, fk, a, b, *, window=64, terraced=False, scale=None, c=None, sinks=0):
    """The normalized hybrid attention weights [B, H, T, T] of one whole sequence (no state, no padding):
    row t gives the weight of each key s in y_t. Quadratic in T: for short sequences only."""
    B, H, T, D = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    a, b = (torch.as_tensor(f, dtype=cdt, device=q.device).expand(H).view(1, H, 1, 1) for f in (a, b))
    pos = torch.arange(T, device=q.device)
    causal = pos[None, :] <= pos[:, None]
    is_sink = pos[None, :] < sinks
    win = causal & (_member(pos[:, None], pos[None, :], window, terraced) | is_sink)
    lin = causal & ~win
    s = (torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale).masked_fill(~win, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    lw = torch.matmul(fq.to(cdt), fk.to(cdt).transpose(-1, -2)) * ~is_sink  # a sink is never a linear key
    w = a * p + b * lw * lin
    if c is not None:
        w = w + torch.as_tensor(c, dtype=cdt, device=q.device).expand(H).view(1, H, 1, 1) * lw * win
    return w / w.sum(-1, keepdim=True)
