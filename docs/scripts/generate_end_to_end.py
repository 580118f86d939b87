"""Batch-1 greedy decoding through `model.generate`, end to end, for the teacher and a linearized model
(untrained: speed does not depend on the weights), in one process:

    python docs/scripts/generate_end_to_end.py [--mixer lola] [--contexts 1024 8192] [--tokens 32]

For each context C: a prompt of C random tokens and one `generate` call of 2 + N new tokens, with a
streamer that notes the time of each token generate hands it; the decode rate is N over the time from the
second new token to the last (the first comes out of the prefill, the second's step is a warm-up). The
teacher runs as transformers gives it (its default DynamicCache); the linearized model as zoo gives it
(a ZooCache, the lean step and the C steps where they apply).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.generation.streamers import BaseStreamer

import zoo
from zoo.teacher import resolve_teacher_path


class Clock(BaseStreamer):
    """Notes when generate hands out each new token (the prompt's put is not one)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def decode_rate(model, prompt, tokens: int) -> float:
    clock = Clock()
    n = tokens + 2
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
    assert len(clock.times) == n, len(clock.times)
    return tokens / (clock.times[-1] - clock.times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixer", default="lola")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    path = resolve_teacher_path("smollm2-135m")
    models = {
        "teacher": zoo.load_teacher(path, torch.float32, "cpu")[0].eval(),
        args.mixer: zoo.linearize(zoo.load_teacher(path, torch.float32, "cpu")[0], args.mixer).eval(),
    }
    for model in models.values():
        model.generation_config.eos_token_id = None  # random prompts: always the full count
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            prompt = torch.randint(1000, 40000, (1, context), generator=torch.Generator().manual_seed(0))
            row = {"context": context}
            for name, model in models.items():
                row[name] = decode_rate(model, prompt, args.tokens)
                print(f"C={context:<6} {name:<10} {row[name]:6.2f} tok/s", flush=True)
            row["ratio"] = row[args.mixer] / row["teacher"]
            print(f"C={context:<6} {args.mixer} / teacher = {row['ratio']:.2f}x", flush=True)
            rows.append(row)
    if args.out:
        command = f"python docs/scripts/generate_end_to_end.py --mixer {args.mixer} --contexts "
        command += " ".join(map(str, args.contexts)) + f" --tokens {args.tokens}"
        result = {"command": command, "threads": torch.get_num_threads(), "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
