"""Measurement helpers shared by the bench scripts: timing, real peak memory, CSV rows, tables.

Speed is the median (with p20/p80) of repeated runs after a warm-up: ``triton.testing.do_bench`` on GPU,
``torch.utils.benchmark`` on CPU. Peak extra memory is measured for real: ``max_memory_allocated`` on
GPU, and on CPU the peak RSS of a fresh subprocess above its own baseline (Linux ``clear_refs``).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch

CSV_COLUMNS = [
    "op",
    "provider",
    "mode",
    "metric",
    "size",
    "scale",
    "dtype",
    "median",
    "p20",
    "p80",
    "unit",
    "device",
    "date",
    "fastrlhf_version",
    "peer_versions",
]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    # The same model name hides different cores (this machine kind's "AMD EPYC" has been a Zen 3 with
    # AVX2 and a Zen 4 with AVX-512), and the kernels run a different copy on each: name the copy.
    simd = f", {kernel_capability()}"
    # torch's huge-page switch changes what every fresh CPU buffer costs (eager's several-fold more than
    # the fused kernels'), so rows measured under it name it and stay apart from the default's.
    thp = ", THP_MEM_ALLOC_ENABLE=1" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else ""
    return f"{model} ({torch.get_num_threads()} threads{simd}{thp})"


def kernel_capability() -> str:
    """The SIMD copy of the C++ CPU kernels this machine runs ("avx512", "avx2", "default"), or "no
    fastrlhf._C" when the extension is not built."""
    from fastrlhf._extension import extension

    compiled = extension()
    return compiled.cpu_capability() if compiled is not None else "no fastrlhf._C"


def peer_versions() -> str:
    versions = {}
    for name in ("trl", "liger_kernel", "triton", "transformers"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    versions["torch"] = torch.__version__
    return ";".join(f"{k}={v}" for k, v in sorted(versions.items()))


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the samples."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    cuts = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), cuts[1], cuts[7]


def combine_rounds(rounds: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """One (median, p20, p80) from several rounds' (median, p20, p80) of the same case: each the median
    of the rounds' values, so one round slowed by the machine (another process, a throttled core) moves
    none of them."""
    if not rounds:
        raise ValueError("combine_rounds needs at least one round")
    return tuple(statistics.median(values) for values in zip(*rounds, strict=True))


def time_fn(
    fn: Callable[[], object], device: str, min_run_time: float = 1.0, reps: int = 0, wall_clock: bool = False
):
    """Seconds per call as (median, p20, p80), measured after a warm-up call.

    On CUDA, ``triton.testing.do_bench``: device events around each call, the kernels' time. A call
    whose host work (checks, dispatch, launches) outlasts its kernels reads short there, since the
    events time the stream; ``wall_clock=True`` times such calls with torch's benchmark timer instead,
    which synchronises the device at each reading: the cost of a call as the caller sees it.
    """
    if device == "cuda" and not wall_clock:
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], return_mode="all")
        return tuple(v / 1e3 for v in ms)
    from torch.utils import benchmark

    fn()  # warm-up: first-touch allocation, thread pool start, lazy init
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if reps:
        measurement = timer.timeit(1)
        samples = [measurement.times[0]] + [timer.timeit(1).times[0] for _ in range(reps - 1)]
    else:
        samples = timer.blocked_autorange(min_run_time=min_run_time).times
    return quantiles(samples)


def _rss_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def measure_peak_extra_cpu(run_once: Callable[[], object]) -> int:
    """Bytes of peak RSS above the baseline while ``run_once`` runs, in this (fresh) process.

    Call after the inputs exist. A warm-up call first, so one-time allocations (thread pools, lazy
    init) are not counted; then the kernel's high-water mark is reset and the measured call runs.
    """
    import gc

    run_once()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # "5" resets the peak-RSS counter (VmHWM) of this process
    baseline = _rss_status()["VmRSS"]
    result = run_once()
    peak = _rss_status()["VmHWM"]
    del result
    return max(0, peak - baseline)


def measure_peak_extra_gpu(run_once: Callable[[], object]) -> int:
    run_once()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    result = run_once()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return max(0, peak - baseline)


def run_in_subprocess(module_file: str, case: dict, timeout: float = 900) -> dict:
    """Run ``python module_file --memory-case JSON`` in a fresh process and parse its JSON answer."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as answer:
        cmd = [sys.executable, module_file, "--memory-case", json.dumps(case), "--answer", answer.name]
        # A fixed glibc mmap threshold: every allocation above 128 KiB is its own mapping, returned to the
        # OS when freed. With the default (dynamic) threshold, blocks freed by the warm-up call stay in the
        # heap and the measured call reuses them, hiding buffers of up to 32 MiB from the RSS peak.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory case {case} failed:\n{proc.stderr[-2000:]}")
        return json.load(open(answer.name))


def write_csv(rows: list[dict], path: str, columns: list[str] | None = None) -> None:
    """Append rows to a CSV (header written when the file is new). ``columns``: the file's columns,
    default the runner's long format (``CSV_COLUMNS``); a row's missing keys are left empty.

    A file whose header lacks some of ``columns`` (written before its bench gained one) is first rewritten,
    atomically, with ``columns`` followed by the columns only it has: its rows keep every value and read
    empty in the new columns, so results measured before and after the change stay side by side in one
    file. A file that has every column already keeps its header."""
    columns = list(columns or CSV_COLUMNS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            old_columns, old_rows = list(reader.fieldnames or []), list(reader)
        extra = [c for c in old_columns if c not in columns]
        if old_columns and not set(columns) <= set(old_columns):
            columns += extra
            _rewrite_csv(path, columns, old_rows)
        elif old_columns:
            columns = old_columns
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def _rewrite_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    """Write ``rows`` under the header ``columns`` to a temporary file beside ``path``, then replace it."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".csv.tmp")
    try:
        with os.fdopen(handle, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k) or "" for k in columns})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def base_row(op: str, device: str) -> dict:
    from fastrlhf import __version__

    return {
        "op": op,
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fastrlhf_version": __version__,
        "peer_versions": peer_versions(),
    }


def policy_and_reward_dirs(
    name: str, vocab: int, hidden: int, layers: int, intermediate: int
) -> tuple[str, str]:
    """(policy dir, reward model dir) of a tiny-shaped Llama with these sizes (4 heads, 2 KV heads, the
    bundled 1024-token tokenizer), built once under ``$FASTRLHF_HOME/bench/`` and then reused. The reward
    model is the same trunk with a fresh seeded score head, in transformers' sequence-classification format.

    Both directories appear atomically (``build_tiny_model`` renames a finished build into place; the
    reward model is saved next to its final path and renamed), so an interrupted run leaves no half model.
    """
    from fastrlhf.models.reward_model import RewardModel, is_reward_model
    from fastrlhf.models.tiny import build_tiny_model, fastrlhf_home

    root = os.path.join(fastrlhf_home(), "bench", f"{name}-V{vocab}-H{hidden}-L{layers}-I{intermediate}")
    policy = build_tiny_model(
        os.path.join(root, "policy"),
        seed=0,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
    )
    reward = os.path.join(root, "reward_model")
    if not is_reward_model(reward):
        tmp = tempfile.mkdtemp(prefix=".reward_model.tmp-", dir=root)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # the fresh score head
            RewardModel.from_pretrained(policy).save_pretrained(tmp)
        try:
            os.replace(tmp, reward)
        except OSError:
            if not is_reward_model(reward):
                raise
    return policy, reward


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def copy_bandwidth(device: str, megabytes: int = 256) -> float:
    """Measured device copy bandwidth in bytes/s (read + write), the physical limit a memory-bound op is
    held against: the median of ``dst.copy_(src)`` over a buffer far larger than any cache."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_fn(lambda: dst.copy_(src), device, min_run_time=0.5)
    return 2 * src.numel() * 4 / median


def cache_bytes(device: str) -> int:
    """The last-level cache to rotate inputs past: the GPU's L2, or the CPU's largest cache (sysfs)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    largest = 32 * 2**20
    base = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(base):
        for index in os.listdir(base):
            try:
                with open(os.path.join(base, index, "size")) as fh:
                    text = fh.read().strip()
            except OSError:
                continue
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            digits = text[:-1] if text[-1:] in "KMG" else text
            if digits.isdigit():
                largest = max(largest, int(digits) * scale)
    return largest
