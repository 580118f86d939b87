"""The mixers reach the Triton kernels through zoo.kernels.dispatch: with the backend forced to triton
(on the CPU: Triton's interpreter), the window mixers give what the PyTorch path gives, in prefill
(with gradients of the mixer's own parameters) and in decoding."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels.dispatch import ENV_VAR
from zoo.mixers import build_mixer

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
H, HKV, D, HIDDEN = 2, 1, 8, 16


def prefill_and_decode(name, backend, monkeypatch, T=40, steps=2):
    """Prefill T tokens (window 16: both branches matter), then decode `steps` tokens one at a time.
    Returns the prefill output, the gradients of the inputs and parameters, the decoded outputs."""
    monkeypatch.setenv(ENV_VAR, backend)
    torch.manual_seed(0)
    mixer = build_mixer(name, H, HKV, D, HIDDEN, 0, window=16).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, T + steps, D, generator=g).to(DEVICE)
    k, v = (torch.randn(1, HKV, T + steps, D, generator=g).to(DEVICE) for _ in range(2))
    x = torch.randn(1, T + steps, HIDDEN, generator=g).to(DEVICE)
    inputs = [t[:, :, :T].clone().requires_grad_() for t in (q, k, v)]
    y, state = mixer(*inputs, x[:, :T])
    (y * torch.randn(y.shape, generator=g).to(DEVICE)).sum().backward()
    grads = [t.grad for t in inputs] + [p.grad for p in mixer.parameters()]
    with torch.no_grad():
        decoded = []
        for t in range(T, T + steps):
            y_t, state = mixer(
                q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], x[:, t : t + 1], state=state
            )
            decoded.append(y_t)
    return y.detach(), grads, decoded


def count_calls(monkeypatch, module, names):
    calls = dict.fromkeys(names, 0)
    for fn_name in names:
        fn = getattr(module, fn_name)

        def counted(*args, _fn=fn, _name=fn_name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, counted)
    return calls


@pytest.mark.parametrize(
    "name", ["lolcats", "lolcats-terraced", "liger", "lolcats-terraced-sink", "sliding-window"]
)
def test_window_mixers_on_triton_match_torch(name, monkeypatch):
    from zoo.kernels.triton import window_hybrid as triton_hybrid

    calls = count_calls(monkeypatch, triton_hybrid, ["window_hybrid_triton", "window_hybrid_step_triton"])
    y, grads, decoded = prefill_and_decode(name, "triton", monkeypatch)
    assert calls == {"window_hybrid_triton": 1, "window_hybrid_step_triton": 2}  # the Triton path ran
    y0, grads0, decoded0 = prefill_and_decode(name, "torch", monkeypatch)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(decoded, decoded0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
