"""``fastrlhf ppo`` against TRL 0.19.1's ``PPOTrainer`` (the last TRL release with PPO), side by side on one
machine: seconds per PPO step and the peak RSS of the whole run.

    python bench/vs_trl_ppo.py                        # installs TRL into its own venv on first use
    python bench/vs_trl_ppo.py --steps 8 --modes separate,shared,lora
    python bench/vs_trl_ppo.py --trl-venv /path/venv  # an existing venv with the pins below

**TRL's venv.** TRL 0.19.1 needs an older transformers than fastrlhf, so it gets a venv of its own
(default ``$FASTRLHF_HOME/bench/venv-trl-0.19.1``), made on first use with the same torch version as
this one and ``trl==0.19.1 transformers==4.53.2 accelerate<1.10 datasets<4``. It is reused while those
versions import from it.

**The config** (both sides): a Llama with V=32000, hidden 256, MLP 512, 2 layers (4 heads, 2 KV heads),
built locally (``common.policy_and_reward_dirs``) with the bundled tokenizer, and a reward model of the same
trunk with a fresh seeded score head, in transformers' sequence-classification format. 16 prompts of 64
tokens each, 64 sampled tokens at temperature 1 (no top-k or top-p), one PPO epoch over one minibatch of
16 (no gradient accumulation), torch AdamW at lr 1e-4, fp32 on the CPU, a missing-EOS penalty of 1.
Both sides get the very same prompt ids: the parent tokenises the prompts as ``fastrlhf ppo`` does
(chat template, keep the last 64 tokens) and hands the ids to TRL's dataset.

- TRL: ``PPOTrainer`` with a policy, a reference, a reward model and a value model (both from the reward
  model's directory, as TRL's example does), ``stop_token="eos"``, no sample generations, no saving.
- fastrlhf: the ``fastrlhf ppo`` CLI with ``--actor-critic MODE`` (``separate`` holds the same four models
  as TRL), its default sampler and kernels, no held-out evaluation (``--validation-fraction 0``), and
  the end-of-run save of the final model.

**Measurement.** Each run is its own process, one at a time. *Step time*: the interval between the ends
of consecutive PPO steps (TRL: a ``TrainerCallback.on_step_end`` clock; fastrlhf: the ``time`` of each
step's line in ``metrics.jsonl``, logged every step), after ``--warmup`` steps; the median and p20/p80.
*Peak RSS*: the child's ``ru_maxrss`` (``os.wait4`` in a small launcher process, so that the bench's own
memory is not counted), over the whole run: imports, model loading, every step and the end.

**Targets** (separate mode): step time ≤ 0.35x TRL's, peak RSS ≤ 0.45x TRL's.

**Output.** A markdown table with the ratios, and rows appended to ``bench/results/vs_trl_ppo.csv``
(``common.CSV_COLUMNS``; metrics ``time`` in s and ``peak_rss`` in B; provider ``trl-0.19.1`` or
``fastrlhf``; the machine in ``device``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

TRL_PINS = ("trl==0.19.1", "transformers==4.53.2", "accelerate<1.10", "datasets<4")
TRL_VERSION = "0.19.1"
TRL_TRANSFORMERS = "4.53.2"
MODES = ("separate", "shared", "lora")
TIME_BOUND = 0.35
MEMORY_BOUND = 0.45

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 32000, 256, 512, 2
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 16, 64, 64
LEARNING_RATE = 1e-4
MISSING_EOS_PENALTY = 1.0


# ------------------------------------------------------------------------------------- TRL's side
# Runs under TRL's venv: only the standard library, torch, transformers, datasets and trl are imported.


def trl_child(case: dict, answer_path: str) -> None:
    """One ``PPOTrainer.train()`` of ``case["steps"]`` updates; writes the step-end clock to the answer."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl import PPOConfig, PPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    torch.manual_seed(case["seed"])
    # The directory's tokenizer_config.json names a transformers 5 class; the tokenizer.json is portable.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(case["policy"], "tokenizer.json"),
        pad_token=case["pad_token"],
        eos_token=case["eos_token"],
        padding_side="left",
    )
    policy = AutoModelForCausalLM.from_pretrained(case["policy"])
    reference = AutoModelForCausalLM.from_pretrained(case["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(case["reward_model"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(case["reward_model"], num_labels=1)
    dataset = Dataset.from_dict({"input_ids": case["prompt_ids"]})
    batch = len(case["prompt_ids"])
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out,
            use_cpu=True,
            # TRL's configs default to bf16 mixed precision (``bf16=None`` becomes True); both sides run
            # fp32 here. Left on, TRL autocasts every matmul to bf16, which a CPU without bf16 dot
            # instructions (AVX2, Zen 3) runs in torch's scalar fallback GEMM, ~10x slower.
            bf16=False,
            fp16=False,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            seed=case["seed"],
            learning_rate=case["learning_rate"],
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=1,
            local_rollout_forward_batch_size=batch,
            total_episodes=batch * case["steps"],
            response_length=case["new_tokens"],
            temperature=1.0,
            stop_token="eos",
            missing_eos_penalty=case["missing_eos_penalty"],
            num_sample_generations=0,
            logging_steps=1,
        )
        clock = StepClock()
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            callbacks=[clock],
        )
        trainer.train()
    if trainer.accelerator.mixed_precision != "no":
        raise RuntimeError(f"TRL ran in {trainer.accelerator.mixed_precision} mixed precision, not fp32")
    versions = f"torch={torch.__version__};transformers={transformers.__version__};trl={trl.__version__}"
    with open(answer_path, "w") as fh:
        json.dump({"step_ends": clock.ends, "versions": versions}, fh)


# ------------------------------------------------------------------------------------- the parent


def trl_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def trl_venv_ready(venv: str) -> bool:
    """Whether ``venv`` imports the pinned trl and transformers."""
    if not os.path.exists(trl_python(venv)):
        return False
    probe = "import trl, transformers; print(trl.__version__, transformers.__version__)"
    proc = subprocess.run([trl_python(venv), "-c", probe], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.split() == [TRL_VERSION, TRL_TRANSFORMERS]


def ensure_trl_venv(venv: str) -> None:
    """Create TRL's venv with this process's torch version and the pins, unless it is ready."""
    import torch

    if trl_venv_ready(venv):
        return
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    steps = [
        [sys.executable, "-m", "venv", "--clear", venv],
        [trl_python(venv), "-m", "pip", "install", "-q", torch_pin],
        [trl_python(venv), "-m", "pip", "install", "-q", *TRL_PINS],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if not trl_venv_ready(venv):
        raise RuntimeError(f"{venv}: trl {TRL_VERSION} / transformers {TRL_TRANSFORMERS} do not import")


def prompt_texts(count: int, seed: int) -> list[str]:
    """``count`` prompts of shuffled generic English, each well over PROMPT_TOKENS tokens long, so that
    keeping the last PROMPT_TOKENS tokens gives every prompt exactly that length."""
    from fastrlhf.models.tiny import GENERIC_ENGLISH

    rng = random.Random(seed)
    words = " ".join(GENERIC_ENGLISH).split()
    return [" ".join(rng.choice(words) for _ in range(3 * PROMPT_TOKENS)) for _ in range(count)]


def prepare(work: str, seed: int) -> dict:
    """Models, the prompt file and the prompt ids both sides train on."""
    import common

    from fastrlhf.data.tokenize import TruncationPolicy, tokenize_prompt
    from fastrlhf.models.loading import load_tokenizer

    policy, reward = common.policy_and_reward_dirs("vs_trl_ppo", VOCAB, HIDDEN, LAYERS, INTERMEDIATE)
    texts = prompt_texts(PROMPTS, seed)
    prompts_file = os.path.join(work, "prompts.jsonl")
    with open(prompts_file, "w") as fh:
        for text in texts:
            fh.write(json.dumps({"prompt": text}) + "\n")
    tokenizer = load_tokenizer(policy)
    truncation = TruncationPolicy(PROMPT_TOKENS, 1)
    prompt_ids = [list(tokenize_prompt(tokenizer, text, truncation)) for text in texts]
    lengths = {len(ids) for ids in prompt_ids}
    if lengths != {PROMPT_TOKENS}:
        raise RuntimeError(f"prompt lengths {sorted(lengths)}, expected all {PROMPT_TOKENS}")
    return {
        "policy": policy,
        "reward_model": reward,
        "prompts_file": prompts_file,
        "prompt_ids": prompt_ids,
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
    }


# Starts a command and writes its exit code and peak RSS to argv[1]. A process's ru_maxrss also counts the
# memory image it had before its exec; a child of the bench process starts from the bench's (subprocess
# vforks, sharing it), hundreds of MiB of torch. A child of this small launcher starts from the launcher's.
_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, fh)
"""


def run_measured(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd``; returns (its peak RSS in bytes, its wall seconds). Raises on failure or timeout, with
    the tail of its output."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryDirectory() as tmp:
        answer = os.path.join(tmp, "answer.json")
        launcher = [sys.executable, "-c", _LAUNCHER, answer, *cmd]
        # A session of its own, so that a timeout kills the command with its launcher.
        proc = subprocess.Popen(
            launcher, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
        code, maxrss_kib = proc.returncode, 0
        if code == 0:
            with open(answer) as fh:
                result = json.load(fh)
            code, maxrss_kib = result["code"], result["maxrss_kib"]
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"exit {code}: {' '.join(cmd)}\n{log.read()[-4000:]}")
    return maxrss_kib * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def step_durations(step_ends: list[float], warmup: int) -> list[float]:
    """Seconds of each step after the first ``warmup`` ones, from the times the steps ended."""
    return [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:], strict=True)]


def measure_trl(setup: dict, args, work: str) -> dict:
    case = {key: setup[key] for key in ("policy", "reward_model", "prompt_ids", "pad_token", "eos_token")} | {
        "seed": args.seed,
        "steps": args.warmup + args.steps,
        "new_tokens": NEW_TOKENS,
        "learning_rate": LEARNING_RATE,
        "missing_eos_penalty": MISSING_EOS_PENALTY,
    }
    case_path, answer_path = os.path.join(work, "trl_case.json"), os.path.join(work, "trl_answer.json")
    with open(case_path, "w") as fh:
        json.dump(case, fh)
    cmd = [trl_python(args.trl_venv), os.path.abspath(__file__), "--trl-child", case_path, answer_path]
    peak, wall = run_measured(cmd, args.timeout, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    with open(answer_path) as fh:
        answer = json.load(fh)
    return {
        "durations": step_durations(answer["step_ends"], args.warmup),
        "peak_rss": peak,
        "wall": wall,
        "versions": answer["versions"],
    }


def fastrlhf_step_ends(metrics_path: str) -> list[float]:
    """The ``time`` of each training step's line in a run's metrics.jsonl (one line per step)."""
    ends = {}
    with open(metrics_path) as fh:
        for line in fh:
            record = json.loads(line)
            if "policy/loss" in record:
                ends[record["step"]] = record["time"]
    return [ends[step] for step in sorted(ends)]


def measure_fastrlhf(mode: str, setup: dict, args, work: str) -> dict:
    output = os.path.join(work, f"fastrlhf-{mode}")
    steps = args.warmup + args.steps
    cmd = [
        sys.executable, "-m", "fastrlhf", "ppo",
        "--policy", setup["policy"],
        "--reward-model", setup["reward_model"],
        "--prompts", setup["prompts_file"],
        "--validation-fraction", "0",
        "--output", output,
        "--actor-critic", mode,
        "--steps", str(steps),
        "--rollout-batch-size", str(PROMPTS),
        "--minibatch-size", str(PROMPTS),
        "--gradient-accumulation-steps", "1",
        "--ppo-epochs", "1",
        "--max-new-tokens", str(NEW_TOKENS),
        "--max-prompt-tokens", str(PROMPT_TOKENS),
        "--temperature", "1.0",
        "--learning-rate", str(LEARNING_RATE),
        "--optimizer", "adamw",
        "--missing-eos-penalty", str(MISSING_EOS_PENALTY),
        "--seed", str(args.seed),
        "--log-every", "1",
        "--save-every", str(10 * steps),
        "--report-to", "none",
    ]  # fmt: skip
    peak, wall = run_measured(cmd, args.timeout)
    ends = fastrlhf_step_ends(os.path.join(output, "metrics.jsonl"))
    if len(ends) != steps:
        raise RuntimeError(f"{output}: {len(ends)} step lines in metrics.jsonl, expected {steps}")
    return {"durations": step_durations(ends, args.warmup), "peak_rss": peak, "wall": wall}


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    import common

    return common.quantiles(samples)


def report(results: dict[str, dict]) -> str:
    import common

    trl_time = statistics.median(results["trl"]["durations"])
    trl_rss = results["trl"]["peak_rss"]
    rows = []
    for name, result in results.items():
        median, p20, p80 = quantiles(result["durations"])
        time_ratio, rss_ratio = median / trl_time, result["peak_rss"] / trl_rss
        checks = ""
        if name == "fastrlhf-separate":
            checks = (
                f"time {'ok' if time_ratio <= TIME_BOUND else 'MISSED'} (≤ {TIME_BOUND}x), "
                f"RSS {'ok' if rss_ratio <= MEMORY_BOUND else 'MISSED'} (≤ {MEMORY_BOUND}x)"
            )
        rows.append(
            [
                name,
                f"{median:.3f} ({p20:.3f}-{p80:.3f})",
                f"{time_ratio:.2f}x",
                f"{result['peak_rss'] / 2**20:.0f}",
                f"{rss_ratio:.2f}x",
                checks,
            ]
        )
    headers = ["run", "s/step (p20-p80)", "vs TRL", "peak RSS MiB", "vs TRL", "target"]
    return common.markdown_table(headers, rows)


def csv_rows(results: dict[str, dict]) -> list[dict]:
    import common

    size = (
        f"V={VOCAB},H={HIDDEN},I={INTERMEDIATE},L={LAYERS},B={PROMPTS},P={PROMPT_TOKENS},R={NEW_TOKENS},"
        "epochs=1,mb=16/16"
    )
    rows = []
    for name, result in results.items():
        provider, _, mode = name.partition("-")
        base = common.base_row("ppo_step_vs_trl", "cpu") | dict(
            provider=f"trl-{TRL_VERSION}" if provider == "trl" else provider,
            mode=mode or "separate",
            size=size,
            scale=PROMPTS * NEW_TOKENS * VOCAB,
            dtype="fp32",
        )
        if provider == "trl":
            base["peer_versions"] = result["versions"]
        median, p20, p80 = quantiles(result["durations"])
        rows.append(base | dict(metric="time", median=median, p20=p20, p80=p80, unit="s"))
        peak = result["peak_rss"]
        rows.append(base | dict(metric="peak_rss", median=peak, p20=peak, p80=peak, unit="B"))
    return rows


def parse_args(argv=None):
    from fastrlhf.models.tiny import fastrlhf_home

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="separate,shared", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=6, help="measured PPO steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the measured ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trl-venv",
        default=os.path.join(fastrlhf_home(), "bench", f"venv-trl-{TRL_VERSION}"),
        help="TRL's venv; created on first use unless it already imports the pinned versions",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "vs_trl_ppo.csv"))
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"--modes: expected a comma list of {', '.join(MODES)}, got {args.modes!r}")
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps and --warmup must be >= 1, got {args.steps} and {args.warmup}")
    args.modes = modes
    return args


def main() -> None:
    sys.path.insert(0, HERE)
    import common

    args = parse_args()
    ensure_trl_venv(args.trl_venv)
    with tempfile.TemporaryDirectory(prefix="vs_trl_ppo-") as work:
        setup = prepare(work, args.seed)
        results = {}
        print(f"TRL {TRL_VERSION}: {args.warmup} + {args.steps} steps ...", flush=True)
        results["trl"] = measure_trl(setup, args, work)
        for mode in args.modes:
            print(f"fastrlhf {mode}: {args.warmup} + {args.steps} steps ...", flush=True)
            results[f"fastrlhf-{mode}"] = measure_fastrlhf(mode, setup, args, work)
    print(f"\n{common.device_name('cpu')}; {results['trl']['versions']} against {common.peer_versions()}")
    print(report(results))
    common.write_csv(csv_rows(results), args.csv)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--trl-child":
        with open(sys.argv[2]) as case_file:
            trl_child(json.load(case_file), sys.argv[3])
    else:
        main()
