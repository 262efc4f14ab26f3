"""Each compiled op's bad-input error, by each route into it, each in its own process: which calls raise
the ValueError that names the argument, and which crash.

On an H200 a ``gather_logprobs`` call with labels of the wrong shape killed its process with SIGSEGV on
the ``cuda`` backend, where the same call raises ValueError on the ``cpp`` backend. A call reaches the
TORCH_LIBRARY op by three routes, and this script tries each one alone, so a crash names its route:

- ``wrapper``: ``fastrlhf.ops.<op>(..., backend=<the compiled backend>)``, what users call;
- ``direct``: ``fastrlhf._C.<op>(...)``, the typed entry the wrapper calls in eager mode (pybind11,
  with the GIL released);
- ``torch.ops``: ``torch.ops.fastrlhf.<op>(...)``, the dispatcher's Python entry (what torch.compile
  calls).

A crashed child's stderr holds Python's faulthandler trace and torch's C++ stack traces of the fatal
signal; the script prints it under the table.

    python bench/error_paths.py                       # every case on the GPU (the CPU without one)
    python bench/error_paths.py --device cpu --cases gather_labels_shape
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

import common

ROUTES = ("wrapper", "direct", "torch.ops")


def _cases(device: str) -> dict[str, tuple[str, tuple, str]]:
    """name -> (op, the TORCH_LIBRARY op's positional arguments, the argument the error must name)."""
    import torch

    def rand(*shape):
        return torch.randn(*shape, device=device)

    return {
        # shape checks: the C++ op refuses before any kernel runs
        "gather_labels_shape": (
            "gather_logprobs",
            (rand(3, 11), torch.zeros(5, dtype=torch.long, device=device), 1.0, -100, False, False),
            "labels",
        ),
        "kl_ref_shape": ("kl_penalty", (rand(3, 11), rand(3, 13), None, "k3", None, "none"), "ref_logprobs"),
        "gae_values_shape": (
            "gae",
            (rand(3, 11), rand(3, 13), torch.ones(3, 11, device=device), 1.0, 0.95),
            "mask",
        ),
        # value checks: on a GPU these read the data back (a synchronising reduction) before refusing
        "gae_mask_values": (
            "gae",
            (rand(3, 11), rand(3, 11), torch.full((3, 11), 2.0, device=device), 1.0, 0.95),
            "mask",
        ),
        "ranking_no_pairs": (
            "ranking_loss",
            (
                rand(4, 3),
                torch.ones(4, 3, dtype=torch.long, device=device),
                torch.tensor([[True, False, False]] * 4, device=device),
                0.0,
            ),
            "mask",
        ),
    }


# The wrapper's signature, per op: the TORCH_LIBRARY op's positional arguments -> (args, kwargs).
WRAPPER_ARGS = {
    "gather_logprobs": lambda a: (
        (a[0], a[1]),
        dict(temperature=a[2], ignore_index=a[3], return_entropy=a[4], inplace_backward=a[5]),
    ),
    "kl_penalty": lambda a: ((a[0], a[1], a[2], a[3]), dict(clamp=a[4], reduction=a[5])),
    "gae": lambda a: (a, {}),
    "ranking_loss": lambda a: ((a[0], a[1], a[2]), dict(margin=a[3])),
}


def run_child(case: str, route: str, device: str) -> int:
    """Makes one call; prints its outcome. Exit 0: ValueError naming the argument; 3: no error or
    another error (both printed). A crash ends the process by its signal."""
    import faulthandler

    import torch

    faulthandler.enable()
    torch._C._set_print_stack_traces_on_fatal_signal(True)  # the C++ frames of a crash, not only Python's
    import fastrlhf.ops as ops
    from fastrlhf._extension import extension

    compiled = extension()  # loading it registers torch.ops.fastrlhf.*
    op, args, names = _cases(device)[case]
    if route == "wrapper":
        positional, keywords = WRAPPER_ARGS[op](args)
        call = lambda: getattr(ops, op)(*positional, **keywords, backend="cpp" if device == "cpu" else "cuda")  # noqa: E731
    elif route == "direct":
        call = lambda: getattr(compiled, op)(*args)  # noqa: E731
    else:
        call = lambda: getattr(torch.ops.fastrlhf, op)(*args)  # noqa: E731
    try:
        call()
        if device == "cuda":
            torch.cuda.synchronize()
    except ValueError as error:
        message = str(error).splitlines()[0]
        if names in message:
            print(f"ValueError: {message}")
            return 0
        print(f"ValueError not naming {names!r}: {message}")
        return 3
    except Exception as error:  # reported, not raised: the table shows what each route gave
        print(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return 3
    print("no error")
    return 3


def outcome(returncode: int, stdout: str) -> str:
    if returncode < 0:
        return f"crashed ({signal.Signals(-returncode).name})"
    first = stdout.strip().splitlines()[-1] if stdout.strip() else f"exit {returncode}"
    return ("raised " if returncode == 0 else "WRONG: ") + first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--cases", default=None, help="comma list of case names (default: every case)")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma list of {', '.join(ROUTES)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per child")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "ROUTE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(run_child(*args.child))

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = list(_cases("cpu")) if args.cases is None else args.cases.split(",")
    routes = args.routes.split(",")
    unknown = [n for n in names if n not in _cases("cpu")] + [r for r in routes if r not in ROUTES]
    if unknown:
        parser.error(f"unknown case or route: {', '.join(unknown)}")
    print(f"device: {common.device_name(device)}; torch {torch.__version__}")
    print("\n| case | route | outcome |\n|---|---|---|")
    crashes, failures = [], 0
    for case in names:
        for route in routes:
            child = subprocess.run(
                [sys.executable, __file__, "--child", case, route, device],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            result = outcome(child.returncode, child.stdout)
            print(f"| {case} | {route} | {result} |", flush=True)
            failures += child.returncode != 0
            if child.returncode < 0:
                crashes.append((case, route, child.stderr))
    for case, route, stderr in crashes:
        print(f"\n--- {case} by {route}: the crashed child's stderr (last 150 lines)")
        print("\n".join(stderr.splitlines()[-150:]))
    print(f"\n{failures} of {len(names) * len(routes)} calls did not raise the expected ValueError")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
