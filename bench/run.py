"""fastrlhf's benchmark runner: every op against eager torch, torch.compile and the peers, side by side.

    python bench/run.py                                   # every op, every size, on this machine's device
    python bench/run.py --quick                           # small sizes and few repeats: a smoke run
    python bench/run.py --ops gather_logprobs,gae --modes fwd --providers eager,trl,fastrlhf

Ops: gather_logprobs, linear_logprobs, ppo_policy_loss, kl_penalty, gae, compute_advantages,
group_advantages, ranking_loss (one spec each under ``bench/specs/``). Providers: eager torch;
``torch.compile`` of it where it compiles; every fastrlhf backend that runs on the device; peers where
installed (TRL, Liger) and the veRL / OpenRLHF loops restated here. A provider that cannot run is listed
as skipped, with the reason.

Measurement: a warm-up call, then the median and p20/p80 of repeats (``torch.utils.benchmark`` on CPU,
``triton.testing.do_bench`` on GPU), cycling through several copies of the inputs when one copy would
fit in the last-level cache. Inputs are fresh random numbers. ``--rounds R`` times every provider R
times, the order reversed every other round (a provider inherits the heap and caches the one before it
left), and reports each provider's median round. Peak extra memory is measured for real:
``max_memory_allocated`` after a reset on GPU; on CPU a fresh subprocess per case reports its peak RSS
above its own baseline. Memory-bound ops also report GB/s against the device's measured copy bandwidth.

Output: rows appended to the long-format ``bench/results/bench.csv``, one PNG per op and device under
``bench/results/plots/<device>/`` (time and memory against size; the device's latest measurement of each
point in the CSV, see plots.py), and a markdown table printed last with the ratios against eager and the
performance targets, met or missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import plots  # noqa: E402
from specs import SPECS  # noqa: E402
from specs._base import DTYPES  # noqa: E402

ALL_MODES = ("fwd", "bwd", "full")
MAX_INPUT_COPIES = 8


# ------------------------------------------------------------------------------------------ one case


def to_scalar(out) -> torch.Tensor:
    """What the backward runs on: a scalar output as is, else the sum of the (first) output."""
    if isinstance(out, tuple):
        out = out[0]
    return out if out.dim() == 0 else out.float().sum()


def grad_leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def input_copies(spec, case, device, dtype, requires_grad, seed, count) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [spec.make_inputs(case, device, dtype, requires_grad, generator) for _ in range(count)]


def copies_needed(inputs: dict, device: str) -> int:
    """Enough input copies that cycling through them overflows the last-level cache twice."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
    return max(1, min(MAX_INPUT_COPIES, math.ceil(2 * common.cache_bytes(device) / max(nbytes, 1))))


def make_step(fn, input_sets: list[dict], mode: str):
    """A no-argument callable running one ``mode`` call, on the next input copy each time."""
    position = [0]

    def next_inputs():
        position[0] = (position[0] + 1) % len(input_sets)
        return position[0]

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(input_sets[next_inputs()])

        return step
    if mode == "full":

        def step():
            inputs = input_sets[next_inputs()]
            for t in grad_leaves(inputs):
                t.grad = None
            to_scalar(fn(inputs)).backward()

        return step
    # bwd: the forward graphs are built once; each call runs one backward through a retained graph
    outputs = [to_scalar(fn(inputs)) for inputs in input_sets]

    def step():
        i = next_inputs()
        for t in grad_leaves(input_sets[i]):
            t.grad = None
        outputs[i].backward(retain_graph=True)

    return step


def time_step(step, device: str, quick: bool, wall_clock: bool = False):
    """``wall_clock``: time as the caller sees it, host included (the call-overhead cases; see time_fn)."""
    first = _seconds(step, device)
    if first > 0.2:  # slow cases: a fixed number of repeats rather than a time budget
        return common.time_fn(step, device, reps=2 if quick else 5, wall_clock=wall_clock)
    return common.time_fn(step, device, min_run_time=0.2 if quick else 1.0, wall_clock=wall_clock)


def _seconds(step, device: str) -> float:
    import time

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def find_case(spec, device: str, quick: bool, size: str):
    for case in spec.cases(device, quick):
        if case.size == size:
            return case
    raise ValueError(f"{spec.OP} has no size {size!r} on {device} (quick={quick})")


def memory_case(request: dict, answer_path: str) -> None:
    """Subprocess entry: rebuild one case with one input copy, measure one call's peak extra memory."""
    torch.set_num_threads(request["threads"])
    spec = SPECS[request["op"]]
    device = request["device"]
    case = find_case(spec, device, request["quick"], request["size"])
    provider = next(p for p in spec.providers(device) if p.name == request["provider"])
    inputs = input_copies(
        spec, case, device, DTYPES[request["dtype"]], request["mode"] != "fwd", request["seed"], 1
    )
    step = make_step(provider.fn, inputs, request["mode"])
    measure = common.measure_peak_extra_gpu if device == "cuda" else common.measure_peak_extra_cpu
    with open(answer_path, "w") as fh:
        json.dump({"peak_extra_bytes": measure(step)}, fh)


# ------------------------------------------------------------------------------------------ targets


def provider_matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "-")


# Metrics measured against a bound alone, with no baseline provider.
NO_BASELINE = ("memory_fraction", "call_us", "copy_fraction")
# Metrics where smaller is better: the bound is a ceiling.
AT_MOST = ("time_ratio", "memory_ratio", "memory_fraction", "call_us")


def evaluate_targets(results: dict, device: str, copy_bw: float, quick: bool) -> list[list[str]]:
    """One table row per target of the ops that ran: the measured value, the bound, met / MISSED.
    ``copy_bw``: the device's copy bandwidth in bytes/s, what "copy_fraction" targets divide by."""
    rows = []
    for op, spec in SPECS.items():
        for target in spec.TARGETS:
            if target.device != device:
                continue
            key = (op, target.size, target.dtype, target.mode)
            measured = results.get(key)
            label = f"{op} {target.size} {target.dtype} {target.mode}: {target.provider} vs {target.baseline}"
            if measured is None:
                continue
            candidates = {n: v for n, v in measured.items() if provider_matches(n, target.provider)}
            base = measured.get(target.baseline)
            needs_base = target.metric not in NO_BASELINE
            if not candidates or (needs_base and base is None):
                missing = target.baseline if base is None else target.provider
                rows.append(
                    [label, target.metric, f"{target.bound}", "not measured", f"{missing} did not run"]
                )
                continue
            copy_seconds = 0.0  # what a copy of the bytes this case moves takes
            if target.metric == "copy_fraction":
                case = find_case(spec, device, quick, target.size)
                copy_seconds = spec.bytes_moved(case, DTYPES[target.dtype], target.mode) / copy_bw
            harness = measured.get(HARNESS, (0.0, None))[0]
            name, value = _best(candidates, base, target, harness, copy_seconds)
            if value is None:
                rows.append([label, target.metric, f"{target.bound}", "not measured", "no memory measured"])
                continue
            at_most = target.metric in AT_MOST
            met = value <= target.bound if at_most else value >= target.bound
            verdict = "met" if met else "**MISSED**"
            rows.append(
                [
                    label,
                    target.metric,
                    ("≤ " if at_most else "≥ ") + f"{target.bound}",
                    f"{value:.3g} ({name})",
                    f"{verdict} ({target.source})",
                ]
            )
    return rows


def _best(candidates: dict, base, target, harness: float = 0.0, copy_seconds: float = 0.0):
    """The best fastrlhf backend's value for the target's metric (None when that metric is missing).
    ``harness``: the timing loop's own seconds per call; ``copy_seconds``: what a copy of the bytes the
    case moves takes at the device's copy bandwidth."""
    values = {}
    for name, (seconds, memory) in candidates.items():
        if target.metric == "speedup":
            values[name] = base[0] / seconds
        elif target.metric == "time_ratio":
            values[name] = seconds / base[0]
        elif target.metric == "memory_ratio":
            values[name] = None if memory is None or not base[1] else memory / base[1]
        elif target.metric == "call_us":  # the op's own cost: less what the timing loop costs per call
            values[name] = (seconds - harness) * 1e6
        elif target.metric == "copy_fraction":  # achieved bandwidth over copy bandwidth
            values[name] = copy_seconds / seconds
        else:
            values[name] = None if memory is None else memory / target.reference_bytes
    present = {n: v for n, v in values.items() if v is not None}
    if not present:
        return next(iter(values)), None
    pick = min if target.metric in AT_MOST else max
    name = pick(present, key=present.get)
    return name, present[name]


# ------------------------------------------------------------------------------------------ main


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", default="all", help=f"comma list of {', '.join(SPECS)}; default all")
    parser.add_argument(
        "--sizes",
        default="all",
        help="comma list of size labels as printed (e.g. N=8192,V=32000"
        " must be quoted whole; separate several with ';'); default all",
    )
    parser.add_argument("--modes", default=",".join(ALL_MODES), help="comma list of fwd, bwd, full")
    parser.add_argument(
        "--providers",
        default="all",
        help="comma list of provider names or prefixes (eager, torch.compile, trl, fastrlhf, ...)",
    )
    parser.add_argument(
        "--dtypes", default=None, help="comma list of fp32, bf16, fp16; default: per op and device"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="time every provider this many times, in alternating order, and report the median round;"
        " default 1",
    )
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "bench.csv"))
    parser.add_argument("--plots-dir", default=os.path.join(HERE, "results", "plots"))
    parser.add_argument("--seed", type=int, default=None, help="input seed; default: fresh each run")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ops = list(SPECS) if args.ops == "all" else args.ops.split(",")
    unknown = [op for op in ops if op not in SPECS]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {list(SPECS)}")
    modes = args.modes.split(",")
    if any(m not in ALL_MODES for m in modes):
        parser.error(f"--modes: {args.modes!r}; choose from {ALL_MODES}")
    if args.dtypes and any(d not in DTYPES for d in args.dtypes.split(",")):
        parser.error(f"--dtypes: {args.dtypes!r}; choose from {list(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.ops, args.modes = ops, modes
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def wanted_provider(name: str, selection: str) -> bool:
    return selection == "all" or any(provider_matches(name, p) or name == p for p in selection.split(","))


def main() -> None:
    args = parse_args()
    if args.memory_case:
        memory_case(json.loads(args.memory_case), args.answer)
        return
    device = args.device
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    copy_bw = common.copy_bandwidth(device)
    print(
        f"device: {common.device_name(device)}; torch {torch.__version__}; "
        f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; input seed {seed}",
        flush=True,
    )
    rows, table, call_table, skipped = [], [], [], []
    rows_written = 0  # rows[:rows_written] are in the CSV already
    results: dict = {}  # (op, size, dtype, mode) -> {provider: (seconds, peak bytes or None)}
    for op in args.ops:
        spec = SPECS[op]
        providers = [p for p in spec.providers(device) if wanted_provider(p.name, args.providers)]
        for p in providers:
            if p.fn is None:
                skipped.append([op, p.name, p.reason])
                print(f"{op}: skipped {p.name}: {p.reason}", flush=True)
        cases = spec.cases(device, args.quick)
        if args.sizes != "all":
            cases = [c for c in cases if c.size in args.sizes.split(";")]
        dtypes = args.dtypes.split(",") if args.dtypes else spec.DTYPES[device]
        first_mode = next((m for m in args.modes if m in spec.MODES), None)
        first_sized = next((c for c in cases if not c.call_overhead), None)
        for case in cases:
            for dtype_name in dtypes:
                for mode in (m for m in args.modes if m in spec.MODES):
                    measured = results.setdefault((op, case.size, dtype_name, mode), {})
                    active = [p for p in providers if p.fn is not None and mode in p.modes]
                    if case.call_overhead and mode == "fwd":
                        # What the timing loop itself costs per call (input cycling, no_grad, closures):
                        # a forward call's own cost is its time less this.
                        harness = statistics.median(
                            harness_seconds(spec, case, dtype_name, device, seed, args)
                            for _ in range(args.rounds)
                        )
                        measured[HARNESS] = (harness, None)
                        rows.append(
                            common.base_row(op, device)
                            | dict(provider=HARNESS, mode=mode, size=case.size, dtype=dtype_name)
                            # no scale: not a point of the op's time-against-size plot
                            | dict(scale="", metric="time", median=harness, p20=harness, p80=harness)
                            | dict(unit="s")
                        )
                    # --quick measures memory once per op (its first case and mode): each measurement is
                    # a fresh process, and the smoke run must stay short; never for the call-overhead
                    # case, whose buffers are a few bytes
                    measure_memory = (
                        not args.no_memory
                        and not case.call_overhead
                        and (not args.quick or (case is first_sized and mode == first_mode))
                    )
                    timings, memories = measure_providers(
                        spec, active, case, dtype_name, mode, device, seed, args, measure_memory, skipped
                    )
                    for provider in active:
                        if provider.name not in timings:
                            continue
                        med, p20, p80 = timings[provider.name]
                        memory = memories.get(provider.name)
                        measured[provider.name] = (med, memory)
                        base = common.base_row(op, device) | dict(
                            provider=provider.name,
                            mode=mode,
                            size=case.size,
                            dtype=dtype_name,
                            scale=case.scale,
                        )
                        rows.append(base | dict(metric="time", median=med, p20=p20, p80=p80, unit="s"))
                        if memory is not None:
                            rows.append(
                                base
                                | dict(
                                    metric="peak_extra_memory",
                                    median=memory,
                                    p20=memory,
                                    p80=memory,
                                    unit="B",
                                )
                            )
                        moved = spec.bytes_moved(case, DTYPES[dtype_name], mode)
                        if moved:
                            rows.append(
                                base
                                | dict(
                                    metric="bandwidth",
                                    median=moved / med,
                                    p20=moved / p80,
                                    p80=moved / p20,
                                    unit="B/s",
                                )
                            )
                        if args.rounds > 1:
                            timing_line(
                                spec,
                                case,
                                dtype_name,
                                mode,
                                provider.name,
                                med,
                                memory,
                                f"{med * 1e3:10.3f} ms, the median of {args.rounds} rounds",
                            )
                    if case.call_overhead:
                        call_table += call_rows(spec, case, dtype_name, mode, measured)
                    else:
                        table += table_rows(spec, case, dtype_name, mode, measured, copy_bw)
                    # Each case's rows go out as soon as they are measured: a run stopped by a time
                    # limit (a GPU lease) keeps what it measured.
                    common.write_csv(rows[rows_written:], args.csv)
                    rows_written = len(rows)
    rows.append(
        common.base_row("copy", device)
        | dict(
            provider="torch",
            mode="fwd",
            metric="bandwidth",
            size="256MiB",
            median=copy_bw,
            p20=copy_bw,
            p80=copy_bw,
            unit="B/s",
            dtype="fp32",
        )
    )
    common.write_csv(rows[rows_written:], args.csv)
    # The plots of this run's ops on this device, from the whole CSV: this run's points and the device's
    # latest earlier ones, so a partial run keeps the rest of each plot, and other machines' plots stay.
    this_run = {r["device"] for r in rows}, {r["op"] for r in rows}
    written = plots.write_plots(plots.latest_points(plots.read_rows(args.csv), *this_run), args.plots_dir)
    print(
        f"\nwrote {len(rows)} rows to {os.path.relpath(args.csv)} and {len(written)} plots under "
        f"{os.path.relpath(args.plots_dir)}"
    )
    print(f"device: {common.device_name(device)}; torch {torch.__version__}; {common.peer_versions()}\n")
    headers = [
        "op",
        "size",
        "dtype",
        "mode",
        "provider",
        "median ms",
        "speed-up vs eager",
        "peak extra MiB",
        "memory vs eager",
        "GB/s (of copy)",
    ]
    print(common.markdown_table(headers, table))
    if call_table:
        print("\nCost of a call: each op on its smallest valid input (dispatch, checks, launches):\n")
        call_headers = ["op", "size", "dtype", "mode", "provider", "median us", "less the loop", "vs eager"]
        print(common.markdown_table(call_headers, call_table))
    if skipped:
        print("\nSkipped:\n")
        print(common.markdown_table(["op", "provider", "reason"], _unique(skipped)))
    target_rows = evaluate_targets(results, device, copy_bw, args.quick)
    if target_rows:
        print("\nPerformance targets:\n")
        print(
            common.markdown_table(
                ["case", "metric", "target", "measured (best backend)", "verdict"], target_rows
            )
        )


def measure_providers(spec, active, case, dtype_name, mode, device, seed, args, measure_memory, skipped):
    """Time every provider of one (case, dtype, mode), ``args.rounds`` times in alternating order.

    Returns ({provider: (median, p20, p80)}, {provider: peak bytes}). Providers run one after another in
    one process, so each inherits the heap and caches the previous one left; alternating the order
    between rounds (forward, then reversed) gives every provider both neighbours, and the median of the
    rounds' medians is reported (p20 / p80 likewise: the median of the rounds' p20s and p80s). Memory
    is measured in the first round only (a fresh subprocess: no order to even out). A provider that
    fails is listed in ``skipped`` and not run again.
    """
    per_round: dict[str, list] = {p.name: [] for p in active}
    memories: dict[str, int] = {}
    failed: set[str] = set()
    for round_index in range(args.rounds):
        order = active if round_index % 2 == 0 else active[::-1]
        for provider in order:
            if provider.name in failed:
                continue
            outcome = run_one(
                spec,
                provider,
                case,
                dtype_name,
                mode,
                device,
                seed,
                args,
                measure_memory and round_index == 0,
            )
            if isinstance(outcome, str):
                failed.add(provider.name)
                skipped.append([spec.OP, provider.name, outcome])
                print(f"{spec.OP} {case.size} {dtype_name} {mode}: skipped {provider.name}: {outcome}")
                continue
            (med, p20, p80), memory = outcome
            per_round[provider.name].append((med, p20, p80))
            if memory is not None:
                memories[provider.name] = memory
            timing_line(
                spec,
                case,
                dtype_name,
                mode,
                provider.name,
                med,
                memory,
                f"{med * 1e3:10.3f} ms (p20 {p20 * 1e3:.3f}, p80 {p80 * 1e3:.3f})",
                "" if args.rounds == 1 else f"  [round {round_index + 1}/{args.rounds}]",
            )
    timings = {name: common.combine_rounds(rounds) for name, rounds in per_round.items() if rounds}
    return timings, memories


def timing_line(spec, case, dtype_name, mode, name, seconds, memory, timing, suffix="") -> None:
    """Print one provider's progress line: the case, ``timing`` as given, peak memory and GB/s."""
    moved = spec.bytes_moved(case, DTYPES[dtype_name], mode)
    print(
        f"{spec.OP} {case.size} {dtype_name} {mode:4s} {name:22s} {timing}"
        + ("" if memory is None else f"  peak extra {memory / 2**20:8.1f} MiB")
        + ("" if not moved else f"  {moved / seconds / 1e9:6.1f} GB/s")
        + suffix,
        flush=True,
    )


def run_one(spec, provider, case, dtype_name, mode, device, seed, args, measure_memory):
    """((median, p20, p80), peak bytes or None), or a string saying why the provider could not run."""
    dtype = DTYPES[dtype_name]
    probe = input_copies(spec, case, device, dtype, mode != "fwd", seed, 1)
    input_sets = probe + input_copies(
        spec, case, device, dtype, mode != "fwd", seed + 1, copies_needed(probe[0], device) - 1
    )
    try:
        step = make_step(provider.fn, input_sets, mode)
        timing = time_step(step, device, args.quick, wall_clock=case.call_overhead)
    except Exception as exc:  # noqa: BLE001 - a provider failing on this device is a result, not a crash
        if not provider.lazy:
            raise
        first_line = (str(exc).splitlines() or [""])[0][:160]
        return f"failed on its first call here: {type(exc).__name__}: {first_line}"
    del step, input_sets, probe
    memory = None
    if measure_memory and not (args.quick and provider.compiles):
        request = dict(
            op=spec.OP,
            provider=provider.name,
            size=case.size,
            dtype=dtype_name,
            mode=mode,
            device=device,
            threads=torch.get_num_threads(),
            quick=args.quick,
            seed=seed,
        )
        memory = common.run_in_subprocess(os.path.abspath(__file__), request)["peak_extra_bytes"]
    return timing, memory


def table_rows(spec, case, dtype_name, mode, measured, copy_bw) -> list[list[str]]:
    if not measured:
        return []
    eager_time, eager_memory = measured.get("eager", (None, None))
    out = []
    for name, (seconds, memory) in measured.items():
        moved = spec.bytes_moved(case, DTYPES[dtype_name], mode)
        out.append(
            [
                spec.OP,
                case.size,
                dtype_name,
                mode,
                name,
                f"{seconds * 1e3:.3f}",
                "" if eager_time is None else f"{eager_time / seconds:.2f}x",
                "" if memory is None else f"{memory / 2**20:.1f}",
                "" if memory is None or not eager_memory else f"{memory / eager_memory:.3f}x",
                "" if not moved else f"{moved / seconds / 1e9:.1f} ({100 * moved / seconds / copy_bw:.0f}%)",
            ]
        )
    return out


HARNESS = "timing loop alone"


def harness_seconds(spec, case, dtype_name, device, seed, args) -> float:
    """Seconds per call of the forward timing loop with an op that does nothing, on the same inputs."""
    input_sets = input_copies(spec, case, device, DTYPES[dtype_name], False, seed, 1)
    step = make_step(lambda inputs: None, input_sets, "fwd")
    return time_step(step, device, args.quick, wall_clock=True)[0]


def call_rows(spec, case, dtype_name, mode, measured) -> list[list[str]]:
    """The call-overhead case's rows: microseconds per call, the same less the timing loop's own cost
    (what the op costs), and the ratio to eager's (> 1: slower)."""
    eager_time = measured.get("eager", (None, None))[0]
    harness = measured.get(HARNESS, (None, None))[0]
    return [
        [
            spec.OP,
            case.size,
            dtype_name,
            mode,
            name,
            f"{seconds * 1e6:.1f}",
            "" if name == HARNESS or harness is None else f"{(seconds - harness) * 1e6:.1f}",
            "" if eager_time is None or name == HARNESS else f"{seconds / eager_time:.2f}x",
        ]
        for name, (seconds, _) in measured.items()
    ]


def _unique(rows):
    seen, out = set(), []
    for row in rows:
        key = tuple(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
