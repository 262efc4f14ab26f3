"""fastrlhf.train.metrics and fastrlhf.train.plots: metrics.jsonl, summary.json and the PNG curves."""

import json
import struct

import numpy as np
import pytest
import torch

from fastrlhf.train.metrics import MetricsLogger, global_metrics, read_metrics, write_summary
from fastrlhf.train.plots import plot_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()


def test_each_log_is_one_flushed_json_line(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, **{"train/loss": 2.5, "lr": 1e-4, "tokens": 512})
    # flushed at once: readable while the logger is still open
    assert [json.loads(line) for line in lines(tmp_path)] == [
        {"step": 1, "time": pytest.approx(0.0, abs=5.0), "train/loss": 2.5, "lr": 1e-4, "tokens": 512}
    ]
    logger.log(2, **{"train/loss": torch.tensor(1.25), "acc": np.float32(0.5), "n": np.int64(3)})
    logger.log(3, loss=torch.tensor([0.75], dtype=torch.bfloat16), count=torch.tensor(7))
    logger.close()

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "time": records[1]["time"], "train/loss": 1.25, "acc": 0.5, "n": 3.0}
    assert all(type(records[1][k]) is float for k in ("train/loss", "acc", "n"))  # tensors/numpy -> float
    assert records[2]["loss"] == 0.75 and records[2]["count"] == 7.0
    times = [r["time"] for r in records]
    assert times == sorted(times) and all(t >= 0 for t in times)


def test_nonfinite_values_become_null_and_are_named(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, loss=float("nan"), grad_norm=torch.tensor(float("inf")), kl=-np.inf, lr=0.1)
    (line,) = lines(tmp_path)
    assert "NaN" not in line and "Infinity" not in line
    record = json.loads(line)  # strict JSON
    assert record["loss"] is None and record["grad_norm"] is None and record["kl"] is None
    assert record["lr"] == 0.1
    assert record["nonfinite"] == {"loss": "nan", "grad_norm": "inf", "kl": "-inf"}


def test_finite_lines_have_no_nonfinite_field(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, loss=1.0)
    assert "nonfinite" not in json.loads(lines(tmp_path)[0])


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"step": 1.0}, ValueError, "reserved"),
        ({"nonfinite": 1.0}, ValueError, "reserved"),
        ({"loss": torch.ones(2)}, ValueError, "metric 'loss': expected one value, got 2"),
        ({"name": "sft"}, TypeError, "metric 'name': expected a number, got str"),
    ],
)
def test_bad_metrics_are_rejected(tmp_path, metrics, error, match):
    with MetricsLogger(tmp_path) as logger, pytest.raises(error, match=match):
        logger.log(1, **metrics)


def test_resume_drops_lines_after_the_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 8):
            logger.log(step, loss=1.0 / step)
    before = lines(tmp_path)
    last_kept_time = json.loads(before[3])["time"]

    with MetricsLogger(tmp_path, resume_from_step=4) as resumed:
        assert lines(tmp_path) == before[:4]  # kept lines unchanged, byte for byte
        resumed.log(5, loss=0.5)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # no duplicated steps
    assert records[-1]["time"] >= last_kept_time  # the time axis continues


def test_resume_skips_a_line_cut_by_a_crash(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, loss=1.0)
        logger.log(2, loss=0.5)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "lo')  # the process died mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    with MetricsLogger(tmp_path, resume_from_step=2) as resumed:
        resumed.log(3, loss=0.25)
    assert [json.loads(line)["step"] for line in lines(tmp_path)] == [1, 2, 3]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: bad metrics line"):
        read_metrics(path)


def test_fresh_run_starts_an_empty_file_and_resume_without_file_works(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "time": 1.0}\n', encoding="utf-8")
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, loss=1.0)
    assert [json.loads(line)["step"] for line in lines(tmp_path)] == [1]

    with MetricsLogger(tmp_path / "new", resume_from_step=5) as resumed:
        resumed.log(6, loss=1.0)
    assert len(lines(tmp_path / "new")) == 1


def test_disabled_logger_touches_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, resume_from_step=3)
    logger.log(1, loss=1.0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_write_summary_is_strict_json(tmp_path):
    path = write_summary(
        tmp_path,
        {
            "final_loss": torch.tensor(0.5),
            "acc": np.float64(0.75),
            "steps": 10,
            "diverged": float("nan"),
            "model": tmp_path / "model",
            "eval": {"loss": [1.0, np.float32(0.5)]},
            "ok": True,
            "note": None,
        },
    )
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "final_loss": 0.5,
        "acc": 0.75,
        "steps": 10,
        "diverged": None,
        "model": str(tmp_path / "model"),
        "eval": {"loss": [1.0, 0.5]},
        "ok": True,
        "note": None,
    }
    with pytest.raises(TypeError, match=r"summary\['bad'\]: expected a number, got object"):
        write_summary(tmp_path, {"bad": object()})


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_plots_one_png_per_group_with_data(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 41):
            logger.log(step, **{"train/loss": 2.0 / step, "lr": 1e-4 * (1 - step / 80)})
            if step % 10 == 0:
                logger.log(step, **{"eval/loss": 2.5 / step})
        logger.log(41, **{"train/loss": float("nan")})

    out = tmp_path / "plots"
    written = plot_metrics(
        tmp_path / "metrics.jsonl",
        out,
        {"loss": ["train/loss", "eval/loss"], "lr": ["lr"], "reward": ["ppo/reward"]},
    )
    assert written == [out / "loss.png", out / "lr.png"]  # "reward" has no data: skipped
    for path in written:
        (width, height), size = png_size(path)
        assert (width, height) == (700, 400)
        assert size > 10_000  # axes, curves and text, not an empty canvas
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "lr.png"]  # no temp files


def test_plot_group_names_become_safe_file_names(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, **{"ppo/kl": 0.1})
    (path,) = plot_metrics(tmp_path / "metrics.jsonl", tmp_path, {"ppo/kl per token": ["ppo/kl"]})
    assert path == tmp_path / "ppo_kl_per_token.png"
    png_size(path)


def test_group_with_only_nonfinite_values_is_skipped(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, loss=float("nan"))
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path, {"loss": ["loss"]}) == []


def test_report_to_tensorboard_writes_the_logged_metrics_as_events(tmp_path):
    """``--report-to tensorboard`` hands every logged metric to TensorBoard: the event files under the run
    directory hold a scalar per step, equal to the metrics.jsonl line of that step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trainer_runs import run_sft

    run = tmp_path / "sft"
    run_sft(run, max_steps=3, log_every=1, report_to="tensorboard")
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {run}"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = [m for m in read_metrics(run / "metrics.jsonl") if "train/loss" in m]
    assert len(logged) == 3
    scalars = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    for line in logged:
        assert scalars[line["step"]] == pytest.approx(line["train/loss"], rel=1e-6)


class _TwoProcesses:
    """An accelerator stand-in whose gather returns this process's row and another process's."""

    num_processes = 2
    device = "cpu"

    def __init__(self, other: dict):
        self.other = other

    def gather(self, mine):
        theirs = torch.tensor([[float(v) for v in self.other.values()]], dtype=mine.dtype)
        return torch.cat([mine, theirs])


def test_global_metrics_average_take_the_max_or_sum_as_asked():
    mine = {"score/mean": torch.tensor(0.25), "gap_max": 0.1, "tokens_per_s": 100.0, "grad_norm": None}
    theirs = {"score/mean": 0.75, "gap_max": 0.3, "tokens_per_s": 50.0}
    merged = global_metrics(_TwoProcesses(theirs), mine, maximum=("gap_max",), total=("tokens_per_s",))
    assert merged == {"score/mean": 0.5, "gap_max": 0.3, "tokens_per_s": 150.0, "grad_norm": None}
    single = type("One", (), {"num_processes": 1})()
    assert global_metrics(single, mine) is mine
