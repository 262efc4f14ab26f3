"""Benchmark the sequence-level RLHF ops side by side: GAE, per-token KL and the K-wise ranking loss.

    python bench/bench_rlhf_ops.py            # the sizes of the kernel issue
    python bench/bench_rlhf_ops.py --quick    # small sizes, a smoke run

Providers, each in the same run:
    gae            trl-loop (TRL/OpenRLHF's reverse loop over time, vectorised over the batch),
                   verl-loop (veRL's mask-carry loop), fastrlhf-<backend>
    kl_penalty k3  eager (veRL's low_var_kl written in torch ops), fastrlhf-<backend>; forward+backward
    ranking_loss   eager (the [N, K, K] pair expansion with logsigmoid), fastrlhf-<backend>; fwd+bwd
Time is the median (p20, p80) of repeats after a warm-up. Appends to ``bench/results/rlhf_ops.csv`` and
prints a markdown table last, with each row's speed-up against the first (baseline) provider.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastrlhf.ops import available_backends, gae, kl_penalty, ranking_loss, reference  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GAMMA, LAM = 1.0, 0.95


# ------------------------------------------------------------------------------------------ peers' loops


def trl_gae_loop(rewards, values, mask):
    """TRL / OpenRLHF: reverse loop over time, vectorised over the batch (right padding assumed)."""
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    last = 0
    reversed_adv = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last = delta + GAMMA * LAM * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def verl_gae_loop(rewards, values, mask):
    """veRL: the mask-carry loop (next value and running advantage carried over masked steps)."""
    next_values = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        step = delta + GAMMA * LAM * last
        m = mask[:, t]
        next_values = values[:, t] * m + (1 - m) * next_values
        last = step * m + (1 - m) * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def eager_k3(logp, ref, mask):
    """veRL's low_var_kl in torch ops: ratio = exp(ref - logp); kl = ratio - (ref - logp) - 1."""
    log_ratio = ref - logp
    return (torch.exp(log_ratio) - log_ratio - 1) * mask


def eager_ranking(rewards, ranks, mask):
    return reference.ranking_loss(rewards, ranks, mask).loss


# ------------------------------------------------------------------------------------------ cases


def kernel_backends(device: str) -> list[str]:
    infos = available_backends()
    names = []
    for name in ("cpp", "cuda", "triton"):
        info = infos[name]
        if info.available and device in info.devices and not (name == "triton" and device == "cpu"):
            names.append(name)
    return names


def gae_cases(device, quick):
    sizes = [(64, 512)] if quick else [(64, 512), (64, 2048), (64, 8192)]
    for batch, length in sizes:
        rewards = torch.randn(batch, length, device=device)
        values = torch.randn(batch, length, device=device)
        lengths = torch.randint(length // 2, length + 1, (batch,), device=device)
        mask = (torch.arange(length, device=device)[None] < lengths[:, None]).float()
        providers = {
            "trl-loop": lambda r=rewards, v=values, m=mask: trl_gae_loop(r, v, m),
            "verl-loop": lambda r=rewards, v=values, m=mask: verl_gae_loop(r, v, m),
        }
        for b in kernel_backends(device):
            providers[f"fastrlhf-{b}"] = lambda r=rewards, v=values, m=mask, b=b: gae(
                r, v, m, GAMMA, LAM, backend=b
            )
        yield "gae", f"B={batch},T={length}", "fwd", providers


def _kl_providers(batch, length, device):
    logp = (-torch.rand(batch, length, device=device) * 5).requires_grad_(True)
    ref = (-torch.rand(batch, length, device=device) * 5).requires_grad_(True)
    mask = torch.rand(batch, length, device=device) > 0.1  # bool, as a trainer's action mask is
    grad = torch.randn(batch, length, device=device)

    def full(fn):
        def step():
            logp.grad = ref.grad = None
            fn().backward(grad)

        return step

    providers = {"eager": full(lambda: eager_k3(logp, ref, mask))}
    for b in kernel_backends(device):
        providers[f"fastrlhf-{b}"] = full(lambda b=b: kl_penalty(logp, ref, mask, "k3", backend=b))
    return providers


def kl_cases(device, quick):
    sizes = [(64, 2048)] if quick else [(64, 2048), (256, 8192)]
    for batch, length in sizes:
        yield "kl_penalty_k3", f"B={batch},T={length}", "full", _kl_providers(batch, length, device)


def ranking_cases(device, quick):
    n, k = (64, 9) if quick else (512, 9)
    rewards = torch.randn(n, k, device=device, requires_grad=True)
    ranks = torch.stack([torch.randperm(k) + 1 for _ in range(n)]).to(device)
    mask = torch.ones(n, k, dtype=torch.bool, device=device)

    def full(fn):
        def step():
            rewards.grad = None
            fn().backward()

        return step

    providers = {"eager": full(lambda: eager_ranking(rewards, ranks, mask))}
    for b in kernel_backends(device):
        providers[f"fastrlhf-{b}"] = full(lambda b=b: ranking_loss(rewards, ranks, mask, backend=b).loss)
    yield "ranking_loss", f"N={n},K={k}", "full", providers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ops", default="gae,kl_penalty,ranking_loss")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "rlhf_ops.csv"))
    args = parser.parse_args()
    torch.manual_seed(0)
    wanted = args.ops.split(",")
    makers = {"gae": gae_cases, "kl_penalty": kl_cases, "ranking_loss": ranking_cases}
    rows, table = [], []
    for op_name in wanted:
        for op, size, mode, providers in makers[op_name](args.device, args.quick):
            baseline_name, baseline_time = None, None
            for name, step in providers.items():
                med, p20, p80 = common.time_fn(step, args.device, min_run_time=0.3 if args.quick else 2.0)
                baseline_name = baseline_name or name
                baseline_time = baseline_time or med
                row = common.base_row(op, args.device) | dict(
                    provider=name, mode=mode, size=size, dtype="fp32"
                )
                rows.append(row | dict(metric="time", median=med, p20=p20, p80=p80, unit="s"))
                print(
                    f"{op} {size} {mode} {name:16s} {med * 1e3:10.3f} ms "
                    f"(p20 {p20 * 1e3:.3f}, p80 {p80 * 1e3:.3f})",
                    flush=True,
                )
                table.append(
                    [
                        op,
                        size,
                        mode,
                        name,
                        f"{med * 1e3:.3f}",
                        f"{baseline_time / med:.1f}x vs {baseline_name}",
                    ]
                )
    common.write_csv(rows, args.csv)
    print(f"\nwrote {len(rows)} rows to {os.path.relpath(args.csv)}")
    print(f"device: {common.device_name(args.device)}; torch {torch.__version__}\n")
    print(common.markdown_table(["op", "size", "mode", "provider", "median ms", "speed-up"], table))


if __name__ == "__main__":
    main()
