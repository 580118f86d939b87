"""What a mixer's hooks see of one call besides q, k and v, and the one place that makes padding inert.

`Tokens` holds the layer input x, which tokens are real (the checked mask) and how many real tokens came
before the call, from which it gives each token's position (zoo.kernels.positions.token_positions).
`zero_padding` zeroes padded tokens in any per-token tensor ([B, h, T] or [B, h, T, ...]): a padded key,
value, feature, gate or write strength set to 0 adds nothing to a state and decays nothing.

A state that keeps no token count of its own (the linear kernels' S, z) can carry one as a `CountedState`:
see `Mixer.counts_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from zoo.kernels.positions import token_positions, tokens_after


def real_tokens(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """mask [B, T] (1 real, 0 padding) checked against q [B, H, T, D] -> bool [B, T] on q's device
    (True: a real token), or None without a mask."""
    if mask is None:
        return None
    expected = q.shape[:1] + q.shape[2:3]
    if mask.shape != expected:
        raise ValueError(f"mask must be [B, T] = {tuple(expected)}, got {tuple(mask.shape)}")
    return mask.to(q.device).bool()


class CountedState(NamedTuple):
    """A kernel's state with the count of real tokens it has seen, for a mixer that needs positions."""

    state: Any  # the kernel's state (e.g. LinearAttentionState)
    seen: torch.Tensor  # [B] int64


@dataclass(frozen=True)
class Tokens:
    """One call of T tokens as a mixer's hooks see it.

    x: [B, T, hidden], the layer input (None in `attention_weights`, which the engine gives q and k alone).
    mask: [B, T] bool on q's device, True for real tokens; None: every token is real.
    seen: [B] int64, the real tokens before this call; None where the state keeps no count.
    batch, length, device: B, T and the device of q.
    """

    x: torch.Tensor | None
    mask: torch.Tensor | None
    seen: torch.Tensor | None
    batch: int
    length: int
    device: torch.device

    @classmethod
    def of(
        cls,
        q: torch.Tensor,
        x: torch.Tensor | None,
        mask: torch.Tensor | None,
        seen: torch.Tensor | None = None,
    ) -> Tokens:
        """The Tokens of a call with queries q [B, H, T, D]; the mask is checked here."""
        return cls(x, real_tokens(mask, q), seen, q.shape[0], q.shape[2], q.device)

    @classmethod
    def whole(cls, q: torch.Tensor) -> Tokens:
        """A whole sequence from its start, without padding or layer input (for `attention_weights`)."""
        B, _, T, _ = q.shape
        return cls(None, None, torch.zeros(B, dtype=torch.long, device=q.device), B, T, q.device)

    @property
    def real(self) -> torch.Tensor:
        """[B, T] bool: True for real tokens (all True without a mask)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.batch, self.length, dtype=torch.bool, device=self.device)

    @property
    def positions(self) -> torch.Tensor:
        """[B, T] int64: each token's position in its sequence, counting real tokens only (a pad repeats the
        position of the real token before it)."""
        if self.seen is None:
            raise ValueError(
                "positions are unknown here: this mixer's state keeps no token count (set "
                "counts_tokens = True on the mixer class, or keep a count in its state)"
            )
        return token_positions(self.seen, self.mask, self.length)

    @property
    def seen_after(self) -> torch.Tensor:
        """[B] int64: the real tokens seen after this call."""
        if self.seen is None:
            raise ValueError("seen_after needs the count of tokens before the call (seen)")
        return tokens_after(self.seen, self.mask, self.length)

    def zero_padding(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Each tensor [B, h, T] or [B, h, T, ...] with its padded tokens set to 0 (unchanged without a mask;
        None stays None)."""
        if self.mask is None:
            return tensors
        pad = ~self.mask[:, None, :]  # [B, 1, T]
        return tuple(
            None if t is None else t.masked_fill(pad.view(*pad.shape, *[1] * (t.dim() - 3)), 0.0)
            for t in tensors
        )
