"""Precision report of gather_logprobs: each backend's error against float64, next to torch's own error in
the same dtype, on the large shapes the tests cannot afford on a CPU.

    python bench/precision.py                       # this machine's device, every backend that runs there
    python bench/precision.py --device cuda --sizes 4096x32000,1x151936 --dtypes fp32,bf16

For each (size, dtype, backend) it prints the max absolute error of the log-probs, the entropies and the
logit gradient of ``sum(g * logprob) + sum(h * entropy)`` (g, h standard normal), and, for the worst
gradient element, the reference value there, and the worst element's error over the fp32 test bound
(1e-7 + 1e-4 |reference|; above 1 fails the GPU test). The torch-in-dtype row is the plain-torch
formula run in the dtype (the test suite's 2x rule compares against it).
"""

from __future__ import annotations

import argparse
import os

import torch

from fastrlhf.ops import available_backends, gather_logprobs, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def errors(logits, labels, temperature, g, h, backend):
    """(max |Δ logprob|, max |Δ entropy|, max |Δ grad|, reference grad at the worst element, and the
    worst gradient error over the tests' elementwise fp32 bound 1e-7 + 1e-4 |reference|) vs float64."""
    x64 = logits.detach().double().cpu().requires_grad_(True)
    lp64, ent64 = reference.gather_logprobs(x64, labels.cpu(), temperature, return_entropy=True)
    ((lp64 * g.double().cpu()).sum() + (ent64 * h.double().cpu()).sum()).backward()
    x = logits.detach().clone().requires_grad_(True)
    if backend == "torch-in-dtype":  # the formula in the dtype, as a user would write it
        kept = labels != -100  # ignored rows: logprob and entropy 0, as in the reference
        logp = torch.log_softmax(x / temperature, -1)
        lp = logp.gather(-1, labels.clamp_min(0)[:, None])[:, 0] * kept
        ent = -(logp.exp() * logp).sum(-1) * kept
    else:
        lp, ent = gather_logprobs(x, labels, temperature, return_entropy=True, backend=backend)
    ((lp.float() * g).sum() + (ent.float() * h).sum()).backward()
    grad_err = (x.grad.double().cpu() - x64.grad).abs()
    worst = int(grad_err.argmax())
    over_bound = grad_err / (1e-7 + 1e-4 * x64.grad.abs())
    return (
        float((lp.detach().double().cpu() - lp64).abs().max()),
        float((ent.detach().double().cpu() - ent64).abs().max()),
        float(grad_err.max()),
        float(x64.grad.flatten()[worst]),
        float(over_bound.max()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="4096x32000,1x151936", help="ROWSxVOCAB, comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--scale", type=float, default=3.0, help="logits are scale * N(0, 1)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    infos = available_backends()
    backends = [n for n, i in infos.items() if i.available and args.device in i.devices] + ["torch-in-dtype"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; seed {seed}; temperature {args.temperature}")
    rows = []
    for size in args.sizes.split(","):
        n_rows, vocab = (int(v) for v in size.split("x"))
        for dtype_name in args.dtypes.split(","):
            logits = (torch.randn(n_rows, vocab) * args.scale).to(DTYPES[dtype_name]).to(args.device)
            labels = torch.randint(0, vocab, (n_rows,))
            labels[torch.rand(n_rows) < 0.2] = -100
            labels = labels.to(args.device)
            g, h = torch.randn(n_rows, device=args.device), torch.randn(n_rows, device=args.device)
            for backend in backends:
                lp_err, ent_err, grad_err, ref_at_worst, over_bound = errors(
                    logits, labels, args.temperature, g, h, backend
                )
                rows.append(
                    dict(
                        device=name,
                        size=size,
                        dtype=dtype_name,
                        backend=backend,
                        logprob_err=lp_err,
                        entropy_err=ent_err,
                        grad_err=grad_err,
                        grad_ref_at_worst=ref_at_worst,
                        grad_err_over_test_bound=over_bound,
                    )
                )
                print(
                    f"{size:>12s} {dtype_name:4s} {backend:15s} logprob {lp_err:.2e}  entropy {ent_err:.2e}  "
                    f"grad {grad_err:.2e} (reference there {ref_at_worst:+.2e}; "
                    f"{over_bound:.2f} x the test bound)",
                    flush=True,
                )
    if args.csv:
        from common import write_csv

        write_csv(rows, args.csv, columns=list(rows[0]))


if __name__ == "__main__":
    main()
