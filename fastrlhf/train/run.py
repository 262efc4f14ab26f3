"""What every training run does around its loop: the run directory, accelerate, logging, checkpoints.

The loops in ``sft.py`` and ``rm.py`` stay readable because the bookkeeping lives here, once:
- the run directory and its resolved ``config.yaml``
- the ``Accelerator`` (devices, DDP, mixed precision, gradient accumulation, trackers)
- ``metrics.jsonl`` and the tqdm bar, atomic checkpoints and ``--resume``
- the final HF model, ``summary.json`` and the plots
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from fastrlhf.errors import InputError
from fastrlhf.models.tiny import RUN_MODEL_DIR
from fastrlhf.train.arguments import RunArguments
from fastrlhf.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_modules,
    save_checkpoint,
)
from fastrlhf.train.config import save_resolved_config
from fastrlhf.train.guards import NonFiniteGuard, check_finite_parameters, clip_and_check
from fastrlhf.train.io import fsync_dir
from fastrlhf.train.lock import RunDirectoryLock
from fastrlhf.train.metrics import MetricsLogger, write_summary
from fastrlhf.train.sharding import (
    enable_fsdp2_on_cpu,
    gathered_copy,
    meta_replica,
    return_free_heap_to_the_os,
)
from fastrlhf.train.signals import RunInterrupted, StopOnSignals
from fastrlhf.train.unwrap import unwrap_model
from fastrlhf.train.zero import configure_deepspeed, enable_deepspeed_on_cpu, whole_model_construction

log = logging.getLogger(__name__)

FINAL_MODEL_DIR = RUN_MODEL_DIR


def quiet_libraries() -> None:
    """Silence per-call progress bars and load reports of transformers (they drown the run's own bar)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class TrainingRun:
    """One run directory and the accelerator that trains in it."""

    def __init__(self, args: RunArguments):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        quiet_libraries()
        self.args = args
        trackers = [t for t in args.report_to.split(",") if t and t != "none"]
        self.run_dir = Path(args.output)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=trackers or None,
            project_dir=str(self.run_dir),
            # Without CUDA, cpu=True is what makes accelerate form a gloo process group when launched
            # with several processes (`accelerate launch --multi_gpu --num_processes 2` on a CPU machine).
            cpu=not torch.cuda.is_available(),
        )
        enable_fsdp2_on_cpu(self.accelerator)
        enable_deepspeed_on_cpu(self.accelerator)
        set_seed(args.seed)
        # Taken before anything in the directory is read or written: a second run fails here, at once.
        self.lock = RunDirectoryLock(self.run_dir) if self.is_main else None
        self.resume_from = self._check_run_dir()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(args, self.run_dir)
        self.accelerator.wait_for_everyone()
        if trackers:
            self.accelerator.init_trackers(self.run_dir.name)
        self.start_time = time.perf_counter()
        self.start_memory_mib = resident_memory_mib() if self.device.type == "cpu" else 0.0
        self.metrics: MetricsLogger | None = None
        self.progress = None
        self.guard = NonFiniteGuard(self.accelerator, args.max_nonfinite_steps)
        self._replicas: dict[int, torch.nn.Module] = {}  # id(prepared model) -> meta_replica, under FSDP
        self.memory: dict[str, list[float]] = {}  # memory_per_process() at the final save

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _check_run_dir(self) -> Path | None:
        checkpoint = latest_checkpoint(self.run_dir) if self.run_dir.exists() else None
        if self.args.resume:
            if checkpoint is None:
                raise InputError(f"resume: {self.run_dir} holds no checkpoint to resume from")
            return checkpoint
        if checkpoint is not None or (self.run_dir / "summary.json").exists():
            raise InputError(
                f"output: {self.run_dir} already holds a run; pass --resume to continue it, "
                "or choose a new directory"
            )
        return None

    # ---- state -----------------------------------------------------------------------------------

    def restore(self, modules: dict | None = None) -> dict:
        """Load the checkpoint chosen at start (``--resume``); returns its trainer state, or {} when fresh.
        ``modules``: ``{name: object}`` that ``checkpoint(modules=...)`` saves (``WeightEMA``)."""
        if self.resume_from is None:
            state = {}
        else:
            state = load_checkpoint(self.accelerator, self.resume_from)
            load_checkpoint_modules(self.resume_from, modules or {})
            self.guard.load_state(state.get("nonfinite", {}))
            log.info("resumed from %s at step %d", self.resume_from, state.get("step", 0))
        self.metrics = MetricsLogger(
            self.run_dir, enabled=self.is_main, resume_from_step=state.get("step") if state else None
        )
        return state

    def checkpoint(self, step: int, trainer_state: dict, model=None, modules: dict | None = None) -> None:
        """Write a resumable checkpoint; ``model``, when given, is checked for non-finite weights first;
        ``modules`` (``{file name: nn.Module}``, e.g. an EMA) are saved as safetensors."""
        if model is not None:
            check_finite_parameters(model, f"checkpoint at step {step}", self.accelerator)
        save_checkpoint(
            self.accelerator,
            self.run_dir,
            step,
            {"step": step, **trainer_state, "nonfinite": self.guard.state()},
            keep_last=self.args.keep_checkpoints,
            modules=modules,
        )

    def stop_requested(self, stop: StopOnSignals) -> bool:
        """Whether a signal asked the run to stop, on any process (all processes agree, so they stop at
        the same step and write the same checkpoint together)."""
        flag = torch.tensor([0.0 if stop.signum is None else float(stop.signum)], device=self.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        if float(flag) and stop.signum is None:
            stop.signum = int(flag)
        return bool(float(flag))

    def interrupted(self, stop: StopOnSignals, step: int):
        """Raise ``RunInterrupted`` once the checkpoint of ``step`` is on disk."""
        self.accelerator.wait_for_everyone()
        if self.progress is not None:
            self.progress.close()
        raise RunInterrupted(stop.signum, step, latest_checkpoint(self.run_dir))

    # ---- logging ---------------------------------------------------------------------------------

    def start_progress(self, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.progress = tqdm(
            total=total, initial=initial, desc=desc, disable=not self.is_main, dynamic_ncols=True
        )

    def log(self, step: int, metrics: dict, bar: tuple[str, ...] | dict[str, str] = ()) -> None:
        """Append ``metrics`` to metrics.jsonl (main process), the trackers, and the bar's postfix.

        ``bar``: the metric keys to show (labelled by their last path part), or ``{label: key}``. A None
        value is a metric this step did not measure, and is left out.
        """
        values = {
            k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items() if v is not None
        }
        self.metrics.log(step, **values)
        if self.accelerator.trackers:
            self.accelerator.log(values, step=step)
        if self.progress is not None and bar:
            labels = bar if isinstance(bar, dict) else {k.split("/")[-1]: k for k in bar}
            self.progress.set_postfix(
                {label: f"{values[k]:.4g}" for label, k in labels.items() if k in values}, refresh=False
            )

    def window_means(self, window: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``train/<key>``: each micro-batch stat of the logging window, averaged over the window and then
        over the processes, so a logged training loss is the global batch's (each process's micro-batches
        weigh the same, as their gradients do), not the main process's alone."""
        keys = list(window[0])
        means = torch.stack([torch.stack([w[k] for w in window]).float().mean() for k in keys])
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means.to(self.device), reduction="mean").cpu()
        return {f"train/{k}": value for k, value in zip(keys, means, strict=True)}

    def reduce_mean(self, total: torch.Tensor, count: torch.Tensor) -> float:
        """The global mean of per-process sums ``total / count`` over all processes."""
        stacked = torch.stack([total.detach().double(), count.detach().double()]).to(self.device)
        summed = self.accelerator.reduce(stacked, reduction="sum")
        return float(summed[0] / summed[1]) if float(summed[1]) > 0 else math.nan

    # ---- the loop --------------------------------------------------------------------------------

    def fit(
        self,
        model,
        optimizer,
        scheduler,
        train_loader,
        train_sampler,
        loss_fn,
        evaluate,
        total_steps: int,
        bar: tuple[str, ...],
        desc: str,
    ) -> tuple[int, dict, dict]:
        """The optimisation loop shared by the SFT and reward-model trainers.

        ``loss_fn(batch) -> (loss, stats)``: the micro-batch loss to minimise and a dict of detached scalar
        tensors to average into the ``train/*`` metrics (an ``"items"`` entry counts throughput).
        ``evaluate() -> dict`` of ``eval/*`` metrics. Runs ``--epochs`` (or ``--max-steps``) from the
        checkpoint chosen at start; evaluates and checkpoints per ``--eval-every`` / ``--save-every``, or
        at each epoch end. Returns ``(steps, first_eval, last_eval)``.
        """
        args, accelerator = self.args, self.accelerator
        state = self.restore()
        step, epoch, batches_done = (
            state.get("step", 0),
            state.get("epoch", 0),
            state.get("batches_in_epoch", 0),
        )
        first_eval = state.get("first_eval") or evaluate()
        if not state:
            self.log(0, first_eval)
        last_eval = dict(state.get("last_eval") or first_eval)
        self.start_progress(total_steps, step, desc)
        window, items, window_start = [], 0.0, time.perf_counter()
        losses: list[torch.Tensor] = []  # the micro-batch losses of the optimizer step in progress
        evaluated_at = saved_at = step

        def checkpoint(epoch_now: int, batches_now: int) -> None:
            nonlocal saved_at
            saved_at = step
            self.checkpoint(
                step,
                {
                    "epoch": epoch_now,
                    "batches_in_epoch": batches_now,
                    "first_eval": first_eval,
                    "last_eval": last_eval,
                },
                model=unwrap_model(accelerator, model),
            )

        with StopOnSignals() as stop:
            while epoch < args.epochs and step < total_steps:
                if hasattr(train_sampler, "set_epoch"):
                    train_sampler.set_epoch(epoch)
                # A resumed epoch skips the batches it already trained on (the sampler order is seeded
                # per epoch).
                loader = train_loader
                if batches_done:
                    loader = accelerator.skip_first_batches(train_loader, batches_done)
                for batch in loader:
                    with accelerator.accumulate(model):
                        loss, stats = loss_fn(batch)
                        accelerator.backward(loss)
                        losses.append(loss.detach())
                        grad_norm = None
                        if accelerator.sync_gradients:
                            finite, grad_norm = clip_and_check(
                                accelerator, model, args.max_grad_norm, self.guard, step + 1, losses
                            )
                            losses = []
                            if finite:
                                optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    batches_done += 1
                    items += float(stats.pop("items", 0))
                    window.append({"loss": loss.detach(), **stats})
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    self.progress.update(1)
                    if step % args.log_every == 0:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        metrics = self.window_means(window)
                        metrics.update(
                            {
                                "lr": scheduler.get_last_lr()[0],
                                "epoch": epoch + batches_done / max(len(train_loader), 1),
                                "train/items_per_s": items * accelerator.num_processes / elapsed,
                            }
                        )
                        if grad_norm is not None:
                            metrics["train/grad_norm"] = grad_norm
                        metrics["train/skipped_nonfinite_steps"] = self.guard.skipped
                        self.log(step, metrics, bar)
                        window, items, window_start = [], 0.0, time.perf_counter()
                    if args.eval_every and step % args.eval_every == 0:
                        last_eval, evaluated_at = evaluate(), step
                        self.log(step, last_eval, bar)
                    if args.save_every and step % args.save_every == 0:
                        checkpoint(epoch, batches_done)
                    if self.stop_requested(stop):
                        if saved_at != step:
                            checkpoint(epoch, batches_done)
                        self.interrupted(stop, step)
                    if step >= total_steps:
                        break
                else:
                    epoch, batches_done = epoch + 1, 0
                    if not args.eval_every:
                        last_eval, evaluated_at = evaluate(), step
                        self.log(step, last_eval, bar)
                    if not args.save_every:
                        checkpoint(epoch, 0)
                    continue
                break  # --max-steps reached inside an epoch

        # --max-steps (or the last step landing inside an epoch) skips the epoch-end bookkeeping above.
        if evaluated_at != step:
            last_eval = evaluate()
            self.log(step, last_eval, bar)
        if saved_at != step:
            checkpoint(epoch, batches_done)
        return step, first_eval, last_eval

    def optimizer(self, model):
        """The configured optimizer over ``model``'s trainable parameters (no decay on biases and norms)."""
        from fastrlhf.train.optim import build_optimizer, param_groups

        args = self.args
        return build_optimizer(
            param_groups(model, args.weight_decay),
            args.optimizer,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
        )

    def prepare(self, model, train_loader):
        """Optimizer, schedule and accelerate's wrapping for an epoch-based run.

        Returns ``(model, optimizer, scheduler, train_loader, total_steps)``, the first four prepared.
        """
        optimizer = self.optimizer(model)
        total_steps = self.total_steps(train_loader)
        scheduler = self.scheduler(optimizer, total_steps)
        model, optimizer, train_loader, scheduler = self.prepare_models(
            model, optimizer, train_loader, scheduler
        )
        return model, optimizer, scheduler, train_loader, total_steps

    def prepare_models(self, model, *others, leave_out: tuple = (), micro_batch_size: int | None = None):
        """``accelerator.prepare(model, *others)``; under FSDP or ZeRO-3 it first keeps a meta-device
        replica of ``model`` (``leave_out``: submodules the replica needs not hold, e.g. a frozen reference
        kept outside the prepared parameters), so that ``save_model`` can gather it later. Under DeepSpeed
        the micro-batch per process (default ``--batch-size``) and ``--max-grad-norm`` go into its config."""
        micro_batch_size = micro_batch_size or self.args.batch_size
        configure_deepspeed(self.accelerator, micro_batch_size, self.args.max_grad_norm)
        replica = meta_replica(model, leave_out) if self.shards_models else None
        prepared = self.accelerator.prepare(model, *others)
        if replica is not None:
            self._replicas[id(prepared[0] if others else prepared)] = replica
        return prepared

    @property
    def shards_models(self) -> bool:
        """Whether ``prepare`` shards the parameters (FSDP, ZeRO-3), so that saving a model must gather it
        first. (ZeRO-1/2 shard only gradients and optimizer state: every process holds whole weights.)"""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED:
            return self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return kind == DistributedType.FSDP

    def scheduler(self, optimizer, total_steps: int):
        """Cosine decay to ``--final-lr-fraction`` over ``total_steps`` optimizer steps, after the warmup.

        accelerate's prepared scheduler advances once per process at every optimizer step (unless
        ``split_batches``), so the schedule is laid out in those units.
        """
        from fastrlhf.train.optim import build_scheduler

        n = self.accelerator.num_processes
        return build_scheduler(
            optimizer, total_steps * n, self.args.warmup_steps * n, self.args.final_lr_fraction
        )

    def total_steps(self, train_loader) -> int:
        """Optimizer steps of the run: per-process batches / accumulation x epochs, capped by --max-steps."""
        per_epoch = math.ceil(
            len(train_loader) / self.accelerator.num_processes / self.args.gradient_accumulation_steps
        )
        total = per_epoch * self.args.epochs
        return min(total, self.args.max_steps) if self.args.max_steps else total

    # ---- the end ---------------------------------------------------------------------------------

    def save_model(self, model, tokenizer, save_fn=None, part=None) -> Path:
        """Write the final HF model into ``<output>/model`` atomically (a temp dir renamed into place).

        ``save_fn(unwrapped, directory)`` writes a custom model (the reward model); by default the
        unwrapped model's ``save_pretrained``, with LoRA adapters merged so the result loads anywhere.
        ``part(unwrapped)``, when given, picks the submodule to write (PPO's policy out of its
        actor-critic). Every process must call it.
        """
        final = self.run_dir / FINAL_MODEL_DIR
        # Read here, while the processes still meet at barriers after it: a gloo collective as the
        # run's last step, just before the process group is destroyed, once left a process hanging.
        self.memory = self.memory_per_process()
        self.accelerator.wait_for_everyone()
        unwrapped = unwrap_model(self.accelerator, model)
        replica = self._replicas.get(id(model))
        if replica is not None:  # sharded (FSDP): gathered once, into a plain module on the main process
            unwrapped = gathered_copy(unwrapped, replica, self.accelerator)
        if self.is_main:
            return_free_heap_to_the_os()
            with whole_model_construction(self.accelerator):
                self._write_final_model(part(unwrapped) if part else unwrapped, tokenizer, final, save_fn)
        self.accelerator.wait_for_everyone()
        return final

    def _write_final_model(self, unwrapped, tokenizer, final: Path, save_fn) -> None:
        """Main process: check, then write into a temp dir and rename it into place."""
        check_finite_parameters(unwrapped, "the final model")
        tmp = self.run_dir / f".{FINAL_MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # The tokenizer first: a custom save_fn may replace it (a reward model gives it its own pad).
        tokenizer.save_pretrained(tmp)
        (save_fn or save_causal_lm)(unwrapped, tmp)
        old = self.run_dir / f".{FINAL_MODEL_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.run_dir)
        shutil.rmtree(old, ignore_errors=True)

    def memory_per_process(self) -> dict[str, list[float]]:
        """Every process's peak memory so far (MiB; ``save_model`` takes it before the final save, and the
        summary reports that) and, on CPU, its resident set when the run started
        (torch and the libraries, before any model): what a sharding engine saves shows in the difference.
        Collective: every process must call it."""
        mine = torch.tensor([peak_memory_mib(self.device), self.start_memory_mib], dtype=torch.float64)
        every = self.accelerator.gather(mine.to(self.device).reshape(1, 2)).cpu().reshape(-1, 2)
        return {
            "peak_memory_mib_per_process": [round(float(x), 1) for x in every[:, 0]],
            "start_memory_mib_per_process": [round(float(x), 1) for x in every[:, 1]],
        }

    def finish(self, summary: dict, plot_groups: dict[str, list[str]]) -> dict:
        summary = {
            "seconds": round(time.perf_counter() - self.start_time, 2),
            "processes": self.accelerator.num_processes,
            "distributed_type": self.accelerator.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU, FSDP
            "device": str(self.device),
            **self.memory,
            **summary,
        }
        if self.progress is not None:
            self.progress.close()
        # The trained models and their optimizer state are saved: let them go before the plots allocate,
        # or the process's peak memory grows by what plotting takes on top of them (~45 MiB measured).
        # The trainer drops its own references before calling this.
        self.accelerator.free_memory()
        if self.is_main:
            write_summary(self.run_dir, summary)
            if self.args.plots:
                # Imported here: matplotlib takes 1-2 s to import, which a run without plots never pays.
                from fastrlhf.train.plots import plot_metrics

                plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir, plot_groups)
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
        return summary


def resident_memory_mib() -> float:
    """This process's resident set size now (MiB); 0 where /proc is missing (not Linux)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_causal_lm(model, directory: Path) -> None:
    """``save_pretrained`` of the HF causal LM inside ``model`` (a ``CausalLMPolicy`` or a bare LM)."""
    lm = getattr(model, "lm", model)
    if hasattr(lm, "merge_and_unload"):
        import copy

        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(directory)
