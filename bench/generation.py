"""Rollout generation: fastrlhf's lean decode loop (``ops.sample``) against HF ``generate``, side by side.

    python bench/generation.py              # tiny Llama V=32000, H=256, I=512, L=2; 16 prompts x 64 tokens
    python bench/generation.py --quick      # tiny sizes, one repeat: a smoke run

Both samplers run through ``fastrlhf.inference.generate_responses`` (``sampler="fastrlhf"`` / ``"hf"``) on
the same prompts at temperature 1 with no truncation and the same EOS, in one process, alternating, after
one warm-up call each; ``--repeats`` measured calls each. Throughput is generated tokens (responses up to
and including EOS) per second; the lean loop drops finished rows, generate keeps decoding them, and both
are charged only for the tokens they return. The median of each sampler and their ratio are printed,
and rows appended to ``bench/results/generation.csv`` (``bench.csv``'s columns; metrics ``time`` in s
and ``tokens_per_s``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from fastrlhf.inference.generate import generate_responses  # noqa: E402
from fastrlhf.models.loading import ModelOptions, load_causal_lm  # noqa: E402
from fastrlhf.models.tiny import build_tiny_model, fastrlhf_home  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generation.csv")
PAD, EOS, FIRST_ID = 0, 2, 6


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="V=2048, H=64, 8 prompts, 16 tokens, 1 repeat")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.intermediate, args.prompts = 2048, 64, 128, 8
        args.prompt_tokens, args.new_tokens, args.repeats = 16, 16, 1
    return args


def build_model(args):
    name = f"generation-V{args.vocab}-H{args.hidden}-I{args.intermediate}-L{args.layers}"
    path = build_tiny_model(
        os.path.join(fastrlhf_home(), "bench", name),
        seed=0,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
    )
    return load_causal_lm(path, ModelOptions())


def run_once(lm, prompts, args, sampler: str, seed: int) -> tuple[float, int]:
    start = time.perf_counter()
    responses = generate_responses(
        lm,
        prompts,
        pad_token_id=PAD,
        eos_token_id=EOS,
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        batch_size=len(prompts),
        generator_seed=seed,
        sampler=sampler,
    )
    return time.perf_counter() - start, sum(len(r.response_ids) for r in responses)


def main() -> None:
    args = parse_args()
    lm = build_model(args)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        tuple(torch.randint(FIRST_ID, args.vocab, (args.prompt_tokens,), generator=generator).tolist())
        for _ in range(args.prompts)
    ]
    samplers = ("hf", "fastrlhf")
    for sampler in samplers:  # warm-up: thread pools, first-touch allocation, the extension's load
        run_once(lm, prompts, args, sampler, seed=0)
    seconds = {s: [] for s in samplers}
    tokens = {s: [] for s in samplers}
    for repeat in range(args.repeats):
        for sampler in samplers:
            took, count = run_once(lm, prompts, args, sampler, seed=1 + repeat)
            seconds[sampler].append(took)
            tokens[sampler].append(count)

    size = (
        f"V={args.vocab},H={args.hidden},I={args.intermediate},L={args.layers},"
        f"B={args.prompts},P={args.prompt_tokens},N={args.new_tokens}"
    )
    rate = {s: statistics.median(n / t for n, t in zip(tokens[s], seconds[s], strict=True)) for s in samplers}
    rows, table = [], []
    for sampler in samplers:
        provider = "fastrlhf-decode" if sampler == "fastrlhf" else "transformers-generate"
        median, p20, p80 = common.quantiles(seconds[sampler])
        base = common.base_row("generation", "cpu")
        rows.append(
            base
            | dict(provider=provider, mode="fwd", metric="time", size=size, median=median, p20=p20, p80=p80)
            | dict(unit="s", dtype="fp32", scale=args.prompts * args.new_tokens)
        )
        rows.append(
            base
            | dict(provider=provider, mode="fwd", metric="tokens_per_s", size=size, median=rate[sampler])
            | dict(unit="tokens/s", dtype="fp32", scale=args.prompts * args.new_tokens)
        )
        table.append(
            [
                provider,
                f"{median:.3f}",
                f"{statistics.median(tokens[sampler]):.0f}",
                f"{rate[sampler]:.0f}",
                f"{rate[sampler] / rate['hf']:.2f}x",
            ]
        )
    common.write_csv(rows, args.output)
    print(f"{size} on {common.device_name('cpu')}, {args.repeats} repeats")
    print(common.markdown_table(["sampler", "median s", "tokens", "tokens/s", "vs generate"], table))


if __name__ == "__main__":
    main()
