"""The suite's training budgets (:class:`TrainConfig`), in a module without torch so that loading a suite
(every pipeline step does) imports no torch; :mod:`harness.distill` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Budgets shared by every recipe of a suite (HF Trainer names where one exists)."""

    max_steps: int = 200
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_length: int = 64
    max_prompt_tokens: int = 48
    chunk_size: int | None = None
    kernel: str = "auto"  # loss kernels: auto (Triton on CUDA, PyTorch elsewhere) | triton | torch
    max_new_tokens: int | None = None  # sampling budget of the modes that generate (None: up to max_length)
    teacher_prefix_mb: int = 1024  # memory for a frozen teacher's prompt keys/values (harness.teacher_prefix; 0: off)
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints (0: only at the end)
    log_every: int = 10
    report_to: str = "none"  # "tensorboard": live curves under <run dir>/tensorboard (HF Trainer's convention)
    device: str = "cpu"
