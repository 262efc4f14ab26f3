"""``fastrlhf.train.unwrap.unwrap_model``: the same module accelerate's unwrap gives, without importing
DeepSpeed in a single process."""

import subprocess
import sys
import textwrap

import torch
from accelerate import Accelerator
from torch import nn

from fastrlhf.train.unwrap import unwrap_model


def test_a_single_process_gets_the_module_accelerate_would_give():
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(3, 2))
    assert unwrap_model(accelerator, model) is model
    assert unwrap_model(accelerator, model) is accelerator.unwrap_model(model)
    compiled = torch.compile(nn.Linear(3, 2))  # wrapped, not run: nothing is compiled
    assert unwrap_model(accelerator, compiled) is accelerator.unwrap_model(compiled)


def test_unwrapping_in_a_single_process_does_not_import_deepspeed():
    """accelerate's own unwrap imports DeepSpeed whenever it is installed (0.5 s, 10-15 MiB resident)."""
    code = textwrap.dedent(
        """
        import sys
        from accelerate import Accelerator
        from torch import nn
        from fastrlhf.train.unwrap import unwrap_model

        accelerator = Accelerator(cpu=True)
        unwrap_model(accelerator, accelerator.prepare(nn.Linear(3, 2)))
        print("deepspeed" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
