"""The teacher in a lean decoding loop, beside the teacher through transformers' forward and `lola` through
zoo's lean step, in one process: how much of the linearized model's lead at batch 1 is the loop, and how
much the constant state.

    python docs/scripts/lean_teacher.py [--contexts 1024 8192] [--tokens 32] [--out FILE.json]

The teacher's cache is filled by a real prefill of C random tokens. Three teacher loops: transformers'
forward (a DynamicCache); `zoo.lean_decode.decode_step` (which runs a kept softmax layer through
transformers' attention module, so only the norms and the MLP are lean); and `lean_softmax_step` below, the
lean step's loop with a softmax attention of its own (keys and values written into preallocated buffers,
SDPA over them; checked against transformers' logits at the first step). `lola` (registry options)
prefills min(C, 512) tokens: its state is constant. Greedy steps, one token, batch 1, timed as a whole.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import zoo
from zoo import lean_decode
from zoo.cache import CACHE_ARG, ZooCache
from zoo.kernels.decode_glue import rms_norm, rotate_heads_, silu_mul_
from zoo.teacher import resolve_teacher_path


class LeanTeacher:
    """The teacher's decoding in the lean step's loop: its keys and values copied from a prefill's cache
    into buffers with room for `room` more tokens; `step(token)` -> logits [1, 1, vocab]."""

    def __init__(self, model, cache, room: int):
        self.model, self.pos = model, cache.get_seq_length()
        self.keys, self.values = [], []
        for layer in cache.layers:
            B, Hkv, C, D = layer.keys.shape
            for store, have in ((self.keys, layer.keys), (self.values, layer.values)):
                buffer = have.new_empty(B, Hkv, C + room, D)
                buffer[:, :, :C] = have
                store.append(buffer)

    def step(self, token):
        inner, pos = self.model.model, self.pos
        x = F.embedding(token.view(1), inner.embed_tokens.weight)
        cos, sin = (t.view(1, -1).contiguous() for t in inner.rotary_emb(x, torch.tensor([[pos]])))
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            D = attn.head_dim
            h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q = rotate_heads_(F.linear(h, attn.q_proj.weight), cos, sin)
            self.keys[i][0, :, pos] = rotate_heads_(F.linear(h, attn.k_proj.weight), cos, sin).view(-1, D)
            self.values[i][0, :, pos] = F.linear(h, attn.v_proj.weight).view(-1, D)
            K, V = self.keys[i][:, :, : pos + 1], self.values[i][:, :, : pos + 1]
            y = F.scaled_dot_product_attention(q.view(1, -1, 1, D), K, V, enable_gqa=True)
            x.addmm_(y.reshape(1, -1), attn.o_proj.weight.t())
            norm = layer.post_attention_layernorm
            h = rms_norm(x, norm.weight, norm.variance_epsilon)
            gate = silu_mul_(F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight))
            x.addmm_(gate, mlp.down_proj.weight.t())
        self.pos += 1
        x = rms_norm(x, inner.norm.weight, inner.norm.variance_epsilon)
        return F.linear(x, self.model.lm_head.weight).view(1, 1, -1)


def decode(model, token, cache, steps: int, lean) -> float:
    """tokens/s of `steps` greedy steps (after one untimed) through the lean step (lean=True), a
    LeanTeacher (lean="softmax") or transformers' forward."""
    own = LeanTeacher(model, cache, steps + 1) if lean == "softmax" else None

    def step(token):
        if own is not None:
            return own.step(token)[:, -1:].argmax(-1)
        if lean:
            out = lean_decode.decode_step(model, token, cache)
            assert out is not None, "the lean step stepped aside"
        else:
            with lean_decode.off():
                out = model(input_ids=token, use_cache=True, **{CACHE_ARG: cache})
        return out.logits[:, -1:].argmax(-1)

    token = step(token)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    path = resolve_teacher_path("smollm2-135m")
    teacher = zoo.load_teacher(path, torch.float32, "cpu")[0].eval()
    lola = zoo.linearize(zoo.load_teacher(path, torch.float32, "cpu")[0], "lola").eval()
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            ids = torch.randint(
                teacher.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)
            )
            row = {"context": context}
            cache = ZooCache()
            out = teacher(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache})
            token = out.logits[:, -1:].argmax(-1)
            own = LeanTeacher(teacher, cache, 1).step(token)
            with lean_decode.off():
                expected = teacher(input_ids=token, use_cache=True, **{CACHE_ARG: cache}).logits
            row["lean softmax step: max |logit difference| at the first step"] = float(
                (own - expected).abs().max()
            )
            for name, model, prefill, lean in (
                ("teacher, transformers' forward", teacher, context, False),
                ("teacher, zoo's lean step (attention modules kept)", teacher, context, True),
                ("teacher, a lean softmax step", teacher, context, "softmax"),
                ("lola, zoo's lean step", lola, min(context, 512), True),
            ):
                cache = ZooCache()
                out = model(
                    input_ids=ids[:, :prefill], use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache}
                )
                row[name] = decode(model, out.logits[:, -1:].argmax(-1), cache, args.tokens, lean)
                print(f"C={context:<6} {name:<50} {row[name]:6.2f} tok/s", flush=True)
            rows.append(row)
    result = {
        "command": "python docs/scripts/lean_teacher.py "
        + " ".join([f"--contexts {' '.join(map(str, args.contexts))}", f"--tokens {args.tokens}"]),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
