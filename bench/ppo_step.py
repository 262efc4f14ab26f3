"""One whole PPO step, fused ops against ``FASTRLHF_BACKEND=torch``, for each actor/critic mode.

    python bench/ppo_step.py                                # separate, shared, lora x fused, torch; V=32000
    python bench/ppo_step.py --quick                        # tiny sizes, one measured step: a smoke run
    python bench/ppo_step.py --modes shared --backends fused,torch --steps 5

**The step** is the loop body of ``fastrlhf/train/ppo.py``, put together from the trainer's own functions
(no PPO formula is restated here):

1. rollout: ``collect_rollout`` samples ``--new-tokens`` tokens for ``--prompts`` random prompts of
   ``--prompt-tokens`` tokens with ``--sampler`` (``fastrlhf``: the trainer's default, a KV-cache decode
   loop over ``ops.sample``; ``hf``: HF ``generate``; temperature 1, no top-k), then scores them with the
   frozen reward model. The time is split into *generation* (the sampler alone) and *scoring*
   (padding and the reward model's forward);
2. experience: ``make_experience`` (old and reference log-probs through ``ops.linear_logprobs``,
   values, the normalised score) and ``ops.compute_advantages``;
3. update: ``--ppo-epochs`` passes of minibatches of ``--minibatch`` rows, each ``--minibatch /
   --micro-batch`` calls of ``backward_micro_batch`` (``ops.linear_ppo_policy_loss`` + the value loss),
   gradient clipping, and one optimizer step. The optimizer is torch's ``AdamW`` by default
   (``--optimizer adamw8bit`` for the trainer's default), built by ``fastrlhf.train.optim``.

Hyper-parameters not set here (clip range, β, GAE, value clip, ...) are ``PPOConfig``'s defaults.

**The model** is ``tiny`` (a Llama: hidden 128, 4 layers) with a 32000-token vocabulary, built once under
``$FASTRLHF_HOME/bench/``, next to a reward model made of the same trunk and a fresh seeded head. The
reward model is loaded frozen in every mode and scores every rollout, and in ``separate`` mode the critic
starts from it, so ``separate`` holds the paper's four models (policy, reference, critic, reward model).
No text is involved: the bundled tokenizer has 1024 tokens, not 32000, so prompts are random token ids
and the responses are never decoded (``NoTextTokenizer``).

**Backends.** ``fused`` leaves each op on ``auto`` (the C++ kernels on CPU); ``torch`` runs the child
process with ``FASTRLHF_BACKEND=torch``, so every op runs its plain-torch reference. For
``linear_logprobs`` and ``linear_ppo_policy_loss`` that is the eager ``hidden @ W.T -> log_softmax``
composition holding the whole ``[N, V]`` logits. The backend that ran is checked in the child and
written into the provider name (``fused-cpp``).

**Measurement.** Every (mode, backend) pair runs in two fresh subprocesses, so no pair inherits another's
heap. *Time*: the default allocator; one warm-up step (first-touch allocation, thread pools, the
optimizer state), then ``--steps`` measured steps. The median and p20/p80 of the whole step are reported,
with the median of each phase. *Memory*: ``common.run_in_subprocess`` (a fixed glibc mmap threshold, so
freed buffers go back to the OS and cannot hide the next peak); a warm-up step, then one measured step
(``common.measure_peak_extra_cpu``). The child reports the measured step's peak RSS (VmHWM after a reset)
and that peak above its RSS just before the step, the models and optimizer state being resident.
``memory_report()`` gives the parameter bytes per role.

**Targets** (the whole step, fused against the torch backend, and the weights each mode holds): on
CPU with V=32000, fused/torch ≤ 0.8 for the step time and ≤ 0.6 for the peak RSS; ``lora`` holds one
copy of the base weights; ``shared`` holds a whole model less than ``separate``. A markdown table with
the ratios and the verdicts is printed last.

**Output.** Rows appended to the long-format ``bench/results/ppo_step.csv`` (``bench.csv``'s columns;
metrics ``time``, ``time_generation``, ``time_scoring``, ``time_experience``, ``time_update`` in s,
``peak_rss`` and ``peak_extra_memory`` in B, ``param_bytes_<role>`` in B), and a PNG of the time split
and peak memory under ``bench/results/plots/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

# An actor/critic memory mode, or one of them with a critic-free estimator (GRPO over k = CRITIC_FREE_K
# samples of a quarter of the prompts: the same rollout rows, no critic or value head).
MODES = ("separate", "shared", "lora", "separate-grpo", "shared-grpo", "lora-grpo")
CRITIC_FREE_K = 4


def mode_parts(mode: str) -> tuple[str, str, int]:
    """``(actor_critic, advantage_estimator, samples_per_prompt)`` of a bench mode."""
    actor_critic, _, estimator = mode.partition("-")
    return actor_critic, estimator or "gae", CRITIC_FREE_K if estimator else 1


# bench name -> FASTRLHF_BACKEND value of the child process
BACKENDS = {"fused": "auto", "torch": "torch"}
PHASES = ("generation", "scoring", "experience", "update")
TIME_RATIO_BOUND = 0.8
MEMORY_RATIO_BOUND = 0.6
TARGET_SOURCE = "PPO step targets for CPU at V=32000"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one step does. ``QUICK`` and ``FULL`` hold the defaults; flags override single fields."""

    vocab: int
    hidden: int
    layers: int
    prompts: int
    prompt_tokens: int
    new_tokens: int
    minibatch: int
    micro_batch: int
    ppo_epochs: int
    steps: int
    warmup: int = 1

    def label(self) -> str:
        return (
            f"V={self.vocab},H={self.hidden},L={self.layers},B={self.prompts},P={self.prompt_tokens},"
            f"R={self.new_tokens},epochs={self.ppo_epochs},mb={self.minibatch}/{self.micro_batch}"
        )

    def scale(self) -> int:
        """Elements of one rollout's response logits (B x R x V): what the torch backend materialises."""
        return self.prompts * self.new_tokens * self.vocab


FULL = Sizes(
    vocab=32000,
    hidden=128,
    layers=4,
    prompts=32,
    prompt_tokens=16,
    new_tokens=64,
    minibatch=16,
    micro_batch=16,
    ppo_epochs=2,
    steps=3,
)
QUICK = Sizes(
    vocab=4096,
    hidden=128,
    layers=2,
    prompts=8,
    prompt_tokens=8,
    new_tokens=8,
    minibatch=4,
    micro_batch=4,
    ppo_epochs=1,
    steps=1,
)


# ------------------------------------------------------------------------------------------ models


def model_dirs(sizes: Sizes) -> tuple[str, str]:
    """(policy dir, reward model dir) of the bench's model, built once and then reused. The tiny's shape
    scaled to the hidden size: 4 heads, 2 KV heads, an MLP 2.75x wide (352 at 128)."""
    return common.policy_and_reward_dirs(
        "ppo_step", sizes.vocab, sizes.hidden, sizes.layers, sizes.hidden * 11 // 4
    )


def checkpoint_bytes(model_dir: str) -> int:
    """Bytes of the tensors in a model directory's safetensors files: one copy of its weights."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    piece = fh.get_slice(key)
                    numel = 1
                    for dim in piece.get_shape():
                        numel *= dim
                    total += numel * {"F32": 4, "BF16": 2, "F16": 2}.get(piece.get_dtype(), 4)
    return total


class NoTextTokenizer:
    """The part of a tokenizer ``collect_rollout`` uses, without text.

    The bench's model has 32000 token ids and no tokenizer of that size, and the score comes from the
    reward model on token ids, so responses are never decoded: ``decode`` returns "". The trainer's
    decode (a few ms per rollout) is therefore not in the measured step.
    """

    def __init__(self, pad_token_id: int, eos_token_id: int):
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


# ------------------------------------------------------------------------------------------ the step


class PPOStep:
    """Models, optimizer and one PPO step of ``mode``, as ``train_ppo`` sets them up. Left out: PPO-ptx
    and the EMA (both off by default in the trainer), and the LR schedule and the metrics (negligible)."""

    def __init__(self, case: dict):
        import torch
        from accelerate import Accelerator

        from fastrlhf.train.ppo import PPOConfig, build_ppo_models
        from fastrlhf.train.rewards import ScoreNormalizer

        sizes = Sizes(**case["sizes"])
        self.sizes = sizes
        torch.manual_seed(case["seed"])
        self.prompt_generator = torch.Generator().manual_seed(case["seed"] + 1)
        actor_critic, estimator, k = mode_parts(case["mode"])
        self.config = PPOConfig(
            output="unused: the bench writes no run directory",
            policy=case["policy"],
            reward_model=case["reward_model"],
            actor_critic=actor_critic,
            advantage_estimator=estimator,
            samples_per_prompt=k,
            rollout_batch_size=max(1, sizes.prompts // k),
            minibatch_size=sizes.minibatch,
            gradient_accumulation_steps=sizes.minibatch // sizes.micro_batch,
            ppo_epochs=sizes.ppo_epochs,
            max_new_tokens=sizes.new_tokens,
            max_prompt_tokens=sizes.prompt_tokens,
            optimizer=case["optimizer"],
            sampler=case.get("sampler", "fastrlhf"),
            lora_r=case["lora_r"] if actor_critic == "lora" else 0,
        )
        # The trainer's own device choice: the GPU when there is one (step_device), else the CPU.
        self.accelerator = Accelerator(cpu=step_device() == "cpu")
        self.device = self.accelerator.device
        # The trainer's own setup: models, optimizer (the schedule is built but never stepped here).
        models = build_ppo_models(self.config, self.accelerator)
        self.reward_model = models.reward_model
        self.memory = dict(models.parameter_bytes)
        self.memory["adapters"] = sum(
            p.numel() * p.element_size() for n, p in models.unwrapped.named_parameters() if "lora_" in n
        )
        self.model, self.optimizer, self.unwrapped = models.model, models.optimizer, models.unwrapped
        self.normalizer = ScoreNormalizer(self.config.reward_norm)
        lm_config = self.unwrapped.config
        self.tokenizer = NoTextTokenizer(lm_config.pad_token_id, lm_config.eos_token_id)

    def prompts(self) -> list[tuple[int, ...]]:
        """Fresh random prompts each step (ids 6 and up: no special tokens), all of one length."""
        import torch

        ids = torch.randint(
            6,
            self.sizes.vocab,
            (self.config.rollout_batch_size, self.sizes.prompt_tokens),
            generator=self.prompt_generator,
        )
        return [tuple(row) for row in ids.tolist()]

    def __call__(self) -> dict:
        """One PPO step; returns its seconds, whole and per phase."""

        from fastrlhf.train.experience import make_experience
        from fastrlhf.train.rollout import collect_rollout
        from fastrlhf.train.update import ppo_update

        config, device = self.config, self.device
        prompt_ids = self.prompts()
        start = time.perf_counter()
        rollout = collect_rollout(
            self.unwrapped.generation_model(),
            self.reward_model,
            None,
            self.tokenizer,
            prompt_ids,
            [""] * len(prompt_ids),
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            batch_size=config.rollout_batch_size,
            samples_per_prompt=config.samples_per_prompt,
            device=device,
            sampler=config.sampler,
        )
        rolled_out = time.perf_counter()
        self.normalizer.update(rollout.scores)
        experience = make_experience(self.unwrapped, rollout, config, config.kl_coef, self.normalizer)
        experienced = time.perf_counter()
        # The trainer's own update (no ptx stream, no EMA, no LR schedule in the bench).
        ppo_update(
            self.model, self.accelerator, self.optimizer, None, rollout, experience, config, config.kl_coef
        )
        end = time.perf_counter()
        return {
            "step": end - start,
            "generation": rollout.generation_seconds,
            "scoring": rolled_out - start - rollout.generation_seconds,
            "experience": experienced - rolled_out,
            "update": end - experienced,
            "response_tokens": int(rollout.mask.sum()),
        }


def linear_op_backend() -> str:
    """The backend ``ops.linear_logprobs`` resolves to in this process (FASTRLHF_BACKEND applied)."""
    import torch

    from fastrlhf.ops._backend import resolve_backend

    return resolve_backend("auto", torch.device(step_device()))


def step_device() -> str:
    """Where the step runs: the trainer's accelerator picks the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def child(case: dict, answer_path: str) -> None:
    """Subprocess entry: build the step, then time it (``kind == "time"``) or measure its peak RSS."""
    step = PPOStep(case)
    answer = {"backend": linear_op_backend(), "memory_report": step.memory}
    if case["kind"] == "time":
        for _ in range(step.sizes.warmup):
            step()
        answer["steps"] = [step() for _ in range(step.sizes.steps)]
    else:
        extra = common.measure_peak_extra_cpu(step)  # a warm-up step, then the measured one
        answer["peak_rss"] = common._rss_status()["VmHWM"]
        answer["peak_extra"] = extra
    with open(answer_path, "w") as fh:
        json.dump(answer, fh)


# ------------------------------------------------------------------------------------------ parent


@contextlib.contextmanager
def backend_env(value: str):
    """``FASTRLHF_BACKEND=value`` in this process's environment, which the children inherit."""
    previous = os.environ.get("FASTRLHF_BACKEND")
    os.environ["FASTRLHF_BACKEND"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FASTRLHF_BACKEND", None)
        else:
            os.environ["FASTRLHF_BACKEND"] = previous


def run_timing_child(case: dict, timeout: float) -> dict:
    """Like ``common.run_in_subprocess`` but with glibc's default allocator: the fixed mmap threshold that
    makes the RSS peak honest also makes every large buffer page-fault afresh, which would bias the time."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as answer:
        # The flag is common.run_in_subprocess's name for a child's case; the case's "kind" says what to do.
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-case", json.dumps(case)]
        proc = subprocess.run(
            cmd + ["--answer", answer.name], capture_output=True, text=True, timeout=timeout, env=env
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"timing case {case['mode']}/{case['bench_backend']} failed:\n{proc.stderr[-3000:]}"
            )
        return json.load(open(answer.name))


def measure(mode: str, backend: str, sizes: Sizes, args, dirs) -> dict:
    """Both children of one (mode, backend) pair; their answers merged."""
    case = {
        "mode": mode,
        "bench_backend": backend,
        "sizes": dataclasses.asdict(sizes),
        "policy": dirs[0],
        "reward_model": dirs[1],
        "optimizer": args.optimizer,
        "sampler": args.sampler,
        "lora_r": args.lora_r,
        "seed": args.seed,
    }
    with backend_env(BACKENDS[backend]):
        timed = run_timing_child(case | {"kind": "time"}, args.timeout)
        memory = (
            None
            if args.no_memory
            else common.run_in_subprocess(
                os.path.abspath(__file__), case | {"kind": "memory"}, timeout=args.timeout
            )
        )
    result = {"backend": timed["backend"], "memory_report": timed["memory_report"]}
    for key in ("step", *PHASES):
        result[key] = common.quantiles([s[key] for s in timed["steps"]])
    result["response_tokens"] = timed["steps"][-1]["response_tokens"]
    if memory is not None:
        if memory["backend"] != timed["backend"]:
            raise RuntimeError(
                f"{mode}/{backend}: the children resolved {timed['backend']} and {memory['backend']}"
            )
        result["peak_rss"], result["peak_extra"] = memory["peak_rss"], memory["peak_extra"]
    return result


def csv_rows(mode: str, backend: str, result: dict, sizes: Sizes) -> list[dict]:
    base = common.base_row("ppo_step", step_device()) | dict(
        provider=f"{backend}-{result['backend']}",
        mode=mode,
        size=sizes.label(),
        scale=sizes.scale(),
        dtype="fp32",
    )
    rows = []
    for key in ("step", *PHASES):
        median, p20, p80 = result[key]
        metric = "time" if key == "step" else f"time_{key}"
        rows.append(base | dict(metric=metric, median=median, p20=p20, p80=p80, unit="s"))
    for key, metric in (("peak_rss", "peak_rss"), ("peak_extra", "peak_extra_memory")):
        if key in result:
            value = result[key]
            rows.append(base | dict(metric=metric, median=value, p20=value, p80=value, unit="B"))
    for role, value in result["memory_report"].items():
        rows.append(base | dict(metric=f"param_bytes_{role}", median=value, p20=value, p80=value, unit="B"))
    return rows


def mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def ratio(a, b) -> float | None:
    return None if a is None or b is None or not b else a / b


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def verdict(value: float | None, bound: float, at_most: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value <= bound if at_most else value >= bound
    return "met" if met else "**MISSED**"


def report(results: dict, sizes: Sizes, policy_bytes: int) -> str:
    """The markdown tables: measurements, fused/torch ratios, targets."""
    out = []
    headers = ["mode", "backend", "step s (p20–p80)"] + [f"{p} s" for p in PHASES]
    headers += ["peak RSS MiB", "peak extra MiB"]
    table = []
    for (mode, backend), r in results.items():
        median, p20, p80 = r["step"]
        table.append(
            [mode, f"{backend} ({r['backend']})", f"{median:.3f} ({p20:.3f}–{p80:.3f})"]
            + [f"{r[p][0]:.3f}" for p in PHASES]
            + [mib(r.get("peak_rss")), mib(r.get("peak_extra"))]
        )
    out.append(f"PPO step, {sizes.label()} (median of {sizes.steps} steps after {sizes.warmup} warm-up):\n")
    out.append(common.markdown_table(headers, table))

    ratios, targets = [], []
    for mode in MODES:
        fused, torch_ = results.get((mode, "fused")), results.get((mode, "torch"))
        if fused is None or torch_ is None:
            continue
        time_ratio = ratio(fused["step"][0], torch_["step"][0])
        train_ratio = ratio(
            fused["experience"][0] + fused["update"][0], torch_["experience"][0] + torch_["update"][0]
        )
        rss_ratio = ratio(fused.get("peak_rss"), torch_.get("peak_rss"))
        extra_ratio = ratio(fused.get("peak_extra"), torch_.get("peak_extra"))
        ratios.append(
            [
                mode,
                fmt(time_ratio),
                fmt(train_ratio),
                fmt(ratio(fused["generation"][0], torch_["generation"][0])),
            ]
            + [fmt(rss_ratio), fmt(extra_ratio)]
        )
        targets.append(
            [f"{mode}: step time, fused / torch", f"≤ {TIME_RATIO_BOUND}", fmt(time_ratio)]
            + [f"{verdict(time_ratio, TIME_RATIO_BOUND)} ({TARGET_SOURCE})"]
        )
        targets.append(
            [f"{mode}: peak RSS, fused / torch", f"≤ {MEMORY_RATIO_BOUND}", fmt(rss_ratio)]
            + [f"{verdict(rss_ratio, MEMORY_RATIO_BOUND)} ({TARGET_SOURCE}; peak extra: {fmt(extra_ratio)})"]
        )
    if ratios:
        out.append("\nfused / torch (below 1: fused is faster or smaller):\n")
        out.append(
            common.markdown_table(
                [
                    "mode",
                    "step time",
                    "experience + update time",
                    "generation time",
                    "peak RSS",
                    "peak extra",
                ],
                ratios,
            )
        )

    reports = {mode: r["memory_report"] for (mode, _), r in results.items()}
    params = []
    for mode, rep in reports.items():
        held = rep["policy"] + rep["reference"] + rep["critic"]
        params.append(
            [mode]
            + [
                mib(rep[k])
                for k in ("policy", "reference", "critic", "reward_model", "adapters", "trainable")
            ]
            + [mib(held), mib(held + rep["reward_model"])]
        )
    if params:
        out.append(
            "\nParameter bytes per role, MiB (memory_report(); one policy checkpoint = "
            f"{mib(policy_bytes)} MiB):\n"
        )
        out.append(
            common.markdown_table(
                ["mode", "policy", "reference", "critic", "reward model", "adapters", "trainable"]
                + ["actor-critic total", "with reward model"],
                params,
            )
        )
    if "lora" in reports:
        rep = reports["lora"]
        copies = (rep["policy"] + rep["reference"] - rep["adapters"]) / policy_bytes
        targets.append(
            ["lora: copies of the base weights held (MiB / checkpoint)", "= 1", f"{copies:.3f}"]
            + [f"{'met' if abs(copies - 1) < 1e-3 else '**MISSED**'} ({TARGET_SOURCE})"]
        )
    if "separate" in reports and "shared" in reports:
        sep, sha = reports["separate"], reports["shared"]
        saved = (sep["policy"] + sep["reference"] + sep["critic"]) - (
            sha["policy"] + sha["reference"] + sha["critic"]
        )
        # "a whole model": the separate critic (the reward model's trunk), less the value head both keep
        whole = sep["critic"]
        targets.append(
            [
                "shared: parameter bytes saved against separate / separate's critic",
                "≥ 0.99",
                f"{saved / whole:.4f} ({mib(saved)} of {mib(whole)} MiB)",
                f"{verdict(saved / whole, 0.99, at_most=False)} ({TARGET_SOURCE})",
            ]
        )
    if targets:
        out.append("\nTargets:\n")
        out.append(common.markdown_table(["target", "bound", "measured", "verdict"], targets))
    return "\n".join(out)


def write_plot(results: dict, sizes: Sizes, path: str) -> str | None:
    """Stacked time split and peak RSS per (mode, backend); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"plot skipped: matplotlib not importable ({exc})")
        return None
    labels = [f"{mode}\n{backend}" for mode, backend in results]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(results)
    for phase in PHASES:
        values = [r[phase][0] for r in results.values()]
        ax_time.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_time.set_ylabel("median seconds per step")
    ax_time.set_title("time split", fontsize=9)
    ax_time.legend(fontsize=7, ncols=2, loc="upper left")
    if all("peak_rss" in r for r in results.values()):
        extra = [r["peak_extra"] / 2**20 for r in results.values()]
        base = [(r["peak_rss"] - r["peak_extra"]) / 2**20 for r in results.values()]
        ax_mem.bar(labels, base, label="RSS before the step")
        ax_mem.bar(labels, extra, bottom=base, label="peak extra in the step")
        ax_mem.legend(fontsize=7, loc="upper left")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title("peak RSS of the step", fontsize=9)
    for ax in (ax_time, ax_mem):
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # headroom: the legend sits above the tallest bar
    fig.suptitle(f"PPO step on {common.device_name(step_device())}: {sizes.label()}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--modes",
        default="separate,shared,lora",
        help=f"comma list of {', '.join(MODES)} (-grpo: critic-free, k={CRITIC_FREE_K})",
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma list of fused, torch")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one measured step: a smoke run")
    size_help = {
        "steps": "measured steps per (mode, backend), after the warm-up",
        "warmup": "warm-up steps before the measured ones",
        "prompts": "prompts per rollout",
        "prompt_tokens": "tokens per prompt",
        "new_tokens": "response tokens sampled per prompt",
        "vocab": "vocabulary size",
        "hidden": "hidden size",
        "layers": "decoder layers",
        "minibatch": "rollout rows per optimizer step",
        "micro_batch": "rows per forward/backward (a divisor of --minibatch)",
        "ppo_epochs": "passes over each rollout",
    }
    for field, text in size_help.items():
        parser.add_argument(
            "--" + field.replace("_", "-"),
            type=int,
            default=None,
            help=f"{text} (default {getattr(FULL, field)}; --quick: {getattr(QUICK, field)})",
        )
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    parser.add_argument(
        "--sampler",
        default="fastrlhf",
        choices=("fastrlhf", "hf"),
        help="rollout sampler (PPOConfig.sampler)",
    )
    parser.add_argument("--lora-r", type=int, default=16, help="adapter rank in lora mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "ppo_step.csv"))
    parser.add_argument("--plot", default=os.path.join(HERE, "results", "plots", "ppo_step.png"))
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        return args
    args.modes = args.modes.split(",")
    args.backends = args.backends.split(",")
    if any(m not in MODES for m in args.modes):
        parser.error(f"--modes: {args.modes}; choose from {MODES}")
    if any(b not in BACKENDS for b in args.backends):
        parser.error(f"--backends: {args.backends}; choose from {tuple(BACKENDS)}")
    defaults = QUICK if args.quick else FULL
    overrides = {f: getattr(args, f) for f in size_help if getattr(args, f) is not None}
    sizes = dataclasses.replace(defaults, **overrides)
    if sizes.minibatch % sizes.micro_batch:
        parser.error(f"--micro-batch {sizes.micro_batch} must divide --minibatch {sizes.minibatch}")
    if sizes.warmup < 0 or any(v < 1 for k, v in dataclasses.asdict(sizes).items() if k != "warmup"):
        parser.error(f"sizes must be >= 1 (--warmup >= 0): {sizes}")
    args.sizes = sizes
    return args


def main() -> None:
    args = parse_args()
    if args.memory_case:
        child(json.loads(args.memory_case), args.answer)
        return
    sizes = args.sizes
    import torch

    load = os.getloadavg()
    print(
        f"device: {common.device_name(step_device())}; torch {torch.__version__}; "
        "load average before the run "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    dirs = model_dirs(sizes)
    policy_bytes = checkpoint_bytes(dirs[0])
    print(f"models: {dirs[0]} ({mib(policy_bytes)} MiB), {dirs[1]}", flush=True)
    results, rows = {}, []
    for mode in args.modes:
        for backend in args.backends:
            result = measure(mode, backend, sizes, args, dirs)
            results[(mode, backend)] = result
            rows += csv_rows(mode, backend, result, sizes)
            split = ", ".join(f"{p} {result[p][0]:.3f}" for p in PHASES)
            print(
                f"{mode:8s} {backend:5s} ({result['backend']}): step {result['step'][0]:.3f} s ({split})"
                + (
                    f"; peak RSS {mib(result['peak_rss'])} MiB, extra {mib(result['peak_extra'])} MiB"
                    if "peak_rss" in result
                    else ""
                ),
                flush=True,
            )
    common.write_csv(rows, args.csv)
    plot = write_plot(results, sizes, args.plot) if args.plot else None
    print(
        f"\nwrote {len(rows)} rows to {os.path.relpath(args.csv)}"
        + (f" and {os.path.relpath(plot)}" if plot else "")
    )
    load = os.getloadavg()
    print(f"load average after the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {common.peer_versions()}\n")
    print(report(results, sizes, policy_bytes))


if __name__ == "__main__":
    main()
