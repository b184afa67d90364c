"""Data parallelism on an existing engine: ``accelerate launch`` (DDP by default; FSDP / DeepSpeed ZeRO
through an accelerate config file).

A distill run started by ``accelerate launch --multi_gpu --num_processes N -m harness.cli distill ...`` (GPUs)
or ``torchrun --standalone --nproc_per_node N -m harness.cli distill ...`` (CPUs, gloo) sees
``WORLD_SIZE = N`` in its environment. Then:

- the student is wrapped by :class:`accelerate.Accelerator` (``prepare_model``: DDP, or FSDP/DeepSpeed if
  the accelerate config says so; gloo on CPU, NCCL on GPU);
- rank r takes the micro-batches ``g·N + r`` of the suite's single global batch order, so N processes with
  ``per_device_train_batch_size`` b see exactly the sequences one process would see with batch N·b;
- the loss is normalised by the **global** count of response tokens of the optimizer step (all-reduced), and
  multiplied by N because DDP averages gradients over processes: the gradient is the token mean over the
  global batch, as in one process;
- only the main process writes checkpoints, the model and ``run.json``.

With ``WORLD_SIZE`` unset everything here is a no-op and a run is an ordinary single-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    size: int = 1
    rank: int = 0
    accelerator: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        """The model as the training loop should call it (DDP-wrapped when distributed)."""
        return model if self.accelerator is None else self.accelerator.prepare_model(model)

    def unwrap(self, model):
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def sum(self, value: float, device: str) -> float:
        """Sum of a Python number over all processes."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def world(device: str = "cpu") -> World:
    """The process group this process belongs to (initialised through accelerate when WORLD_SIZE > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    from accelerate import Accelerator

    acc = Accelerator(cpu=not device.startswith("cuda"))
    return World(size=acc.num_processes, rank=acc.process_index, accelerator=acc)


def launch_prefix(num_processes: int, device: str) -> str:
    """The launcher the Snakefile puts before ``distill`` when a suite asks for several processes.

    GPUs: ``accelerate launch --multi_gpu`` (DDP; FSDP or DeepSpeed ZeRO when the accelerate config file
    — ``accelerate config``, or ``--config_file`` in ``$ACCELERATE_LAUNCH_ARGS`` — says so). CPUs: accelerate's
    own multi-CPU launcher needs MPI, so ``torchrun --standalone`` starts the processes and the
    :class:`accelerate.Accelerator` inside joins them with gloo.
    """
    import sys

    if num_processes <= 1:
        return ""
    if device == "cpu":  # the interpreter that runs Snakemake: no PATH lookup, no activated venv needed
        return f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {num_processes} -m harness.cli"
    extra = os.environ.get("ACCELERATE_LAUNCH_ARGS", "")
    return (f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes {num_processes} "
            f"--num_machines 1 {extra} -m harness.cli").replace("  ", " ")
