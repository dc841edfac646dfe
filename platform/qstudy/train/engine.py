"""The optimisation engine behind one interface: plain PyTorch (DDP when distributed) or DeepSpeed ZeRO.

The recipe only calls ``engine.model(...)``, ``engine.step(loss)``, ``save`` and ``load``;
switching ``train.deepspeed`` changes nothing else. DeepSpeed is imported here and nowhere
else.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qstudy.config import TrainConfig
from qstudy.train.device import precision_dtype


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group_env() -> None:
    """A lone process (no launcher, no Ray Train) still needs the variables torch.distributed reads.

    Without them DeepSpeed falls back to MPI discovery and fails on the missing mpi4py.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))


def join_process_group() -> None:
    """Join the launcher's process group (torchrun sets WORLD_SIZE > 1) if nothing has yet.

    Ray Train joins it before the recipe starts; under torchrun DeepSpeed would only inside
    ``initialize``, after the recipe has counted the epoch's steps for the LR schedule with a
    world of one.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op CPU threads (None: leave torch's setting), then restore it.

    The thread count changes how CPU reductions are split, and so the last bits of every
    result: a run that states it can be repeated exactly on the same machine.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Linear warm-up over ``warmup_ratio`` of the run, then constant or cosine decay to zero at its end.

    Decay matters for what a run reports: at a constant rate the last epoch's score swings
    with the last few steps, and comparing arms by it compares that noise.
    """
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup_steps = int(config.warmup_ratio * total_steps)
    if config.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup_steps)


class Engine:
    """Plain PyTorch AdamW (with the run's LR schedule) over the trainable parameters; DDP across processes.

    ``total_steps`` counts optimiser steps: one per ``gradient_accumulation_steps`` calls of ``step``.
    """

    def __init__(self, captioner: nn.Module, trainable: list[nn.Parameter], config: TrainConfig, total_steps: int):
        self.captioner = captioner
        self.accumulation = config.gradient_accumulation_steps
        self.micro_steps = 0
        captioner.to(precision_dtype(config.precision))
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, config, total_steps)
        if world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(captioner)
        else:
            self.model = captioner

    def step(self, loss: torch.Tensor) -> None:
        """Backward one micro-batch's mean loss; the optimiser steps on every ``accumulation``-th.

        Scaled by 1/N, N micro-batches' gradients add up to the mean over their union, as one
        batch N times the size would give.
        """
        (loss / self.accumulation).backward()
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path, progress: dict) -> None:
        """Trainable weights (safetensors) + optimiser state + progress; rank 0 writes."""
        directory.mkdir(parents=True, exist_ok=True)
        if rank() == 0:
            save_file(self.trainable_state(), directory / "trainable.safetensors")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")
            (directory / "progress.json").write_text(json.dumps(progress))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.captioner)

    def load(self, directory: Path) -> dict:
        self.captioner.load_state_dict(load_file(directory / "trainable.safetensors"), strict=False)
        state = torch.load(directory / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return json.loads((directory / "progress.json").read_text())


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage from the config) with a torch AdamW, so no fused op needs compiling."""

    def __init__(self, captioner: nn.Module, trainable: list[nn.Parameter], config: TrainConfig, total_steps: int):
        import deepspeed

        ensure_process_group_env()
        self.captioner = captioner
        ds_config = {
            "train_micro_batch_size_per_gpu": config.batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": config.precision == "bf16"},
            "steps_per_print": 10**9,
        }
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        # DeepSpeed steps the scheduler inside model.step() and keeps it in its checkpoints.
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=captioner, model_parameters=trainable, optimizer=optimizer,
            lr_scheduler=lr_schedule(optimizer, config, total_steps), config=ds_config,
        )

    def step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()

    def save(self, directory: Path, progress: dict) -> None:
        """Every rank writes its ZeRO shard; rank 0 adds the progress file."""
        self.model.save_checkpoint(str(directory), tag="engine", client_state=progress)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """ZeRO-3 keeps only a shard of each weight per rank: gather them before reading."""
        import deepspeed

        trainable = [p for p in self.captioner.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.model.zero_optimization_stage() == 3):
            return trainable_state(self.captioner)

    def load(self, directory: Path) -> dict:
        _, progress = self.model.load_checkpoint(str(directory), tag="engine")
        return progress


def make_engine(captioner: nn.Module, trainable: list[nn.Parameter], config: TrainConfig, total_steps: int) -> Engine:
    return (DeepSpeedEngine if config.deepspeed else Engine)(captioner, trainable, config, total_steps)


def trainable_state(captioner: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapter + projector), detached and contiguous for safetensors."""
    return {name: p.detach().contiguous().cpu() for name, p in captioner.named_parameters() if p.requires_grad}
