"""The optimisation engine behind one interface: plain PyTorch (DDP when distributed) or DeepSpeed ZeRO.

The recipe only calls ``engine.model(...)``, ``engine.step(loss)``, ``save`` and ``load``;
switching ``train.deepspeed`` changes nothing else. DeepSpeed is imported here and nowhere
else: ZeRO-3's partitioned build (``partitioned_build``) and reads of partitioned weights
(``whole_parameters``, ``parameter_bytes``) go through this module too.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Iterator
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


def prepare_deepspeed_group() -> None:
    """Ready this process for DeepSpeed to join its process group: the variables torch.distributed reads, and no
    inference-only op to compile.

    A lone process (no launcher, no Ray Train) gets the variables of a world of one; without them
    DeepSpeed falls back to MPI discovery and fails on the missing mpi4py. On joining, DeepSpeed's
    CPU backend compiles a shared-memory all-reduce (about a minute of C++ on a fresh machine)
    that only its inference path calls; training's collectives go through torch.distributed, so
    the op is marked unavailable (DeepSpeed keeps that table for such edits).
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


def deepspeed_config(config: TrainConfig) -> dict:
    """The DeepSpeed config of a run: its batch, accumulation, ZeRO stage and precision."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.precision == "bf16"},
        "steps_per_print": 10**9,
    }


def partitions_weights(config: TrainConfig) -> bool:
    """Whether the run's weights are split across its ranks (ZeRO-3) rather than whole on every rank."""
    return config.deepspeed and config.zero_stage == 3


@contextmanager
def partitioned_build(config: TrainConfig) -> Iterator[None]:
    """Under ZeRO-3, every transformers model built in the block is partitioned across the ranks; elsewhere nothing.

    transformers reads DeepSpeed's config through ``HfDeepSpeedConfig`` while it lives:
    ``from_pretrained`` then builds each module inside ``deepspeed.zero.Init``, which splits
    its parameters as soon as the module exists, and copies the checkpoint's weights into the
    shards one parameter at a time, so no rank ever holds a whole LM. ``generate`` keeps the
    ranks' decoding loops in step meanwhile (``synced_gpus``), so the block should last as
    long as the model runs. Modules built outside transformers (projector, adapters) stay
    whole until the engine partitions them.
    """
    if not partitions_weights(config):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    prepare_deepspeed_group()  # zero.Init joins the process group
    plan = HfDeepSpeedConfig(deepspeed_config(config))  # noqa: F841 - transformers holds it by a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def is_partitioned(parameter: nn.Parameter) -> bool:
    return hasattr(parameter, "ds_id")


@contextmanager
def whole_parameters(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """In the block, ZeRO-3 partitioned ``parameters`` hold their whole tensors (read-only); others are left as they are."""
    partitioned = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def parameter_bytes(module: nn.Module) -> tuple[int, int]:
    """(held, whole): the bytes of ``module``'s parameters this process holds (its shards under ZeRO-3), and of all of them."""
    held = whole = 0
    for parameter in module.parameters():
        size = parameter.element_size()
        if is_partitioned(parameter):
            held += parameter.ds_tensor.numel() * size
            whole += parameter.ds_numel * size
        else:
            held += parameter.numel() * size
            whole += parameter.numel() * size
    return held, whole


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

        prepare_deepspeed_group()
        self.captioner = captioner
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        # DeepSpeed steps the scheduler inside model.step() and keeps it in its checkpoints.
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=captioner, model_parameters=trainable, optimizer=optimizer,
            lr_scheduler=lr_schedule(optimizer, config, total_steps), config=deepspeed_config(config),
        )

    def step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()

    def save(self, directory: Path, progress: dict) -> None:
        """Every rank writes its ZeRO shard of the trainable weights and their optimiser state, with the progress.

        The frozen base is left out: resuming rebuilds it from the run's config, as the first
        start did, so a checkpoint is the size of what trains, not of the model.
        """
        with frozen_left_out_of_state(self.captioner):
            self.model.save_checkpoint(str(directory), tag="engine", client_state=progress,
                                       exclude_frozen_parameters=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """ZeRO-3 keeps only a shard of each weight per rank: gather them before reading."""
        with whole_parameters(p for p in self.captioner.parameters() if p.requires_grad):
            return trainable_state(self.captioner)

    def load(self, directory: Path) -> dict:
        """The trainable weights, their optimiser state and the schedule from ``save``'s checkpoint; returns the progress.

        Not strict: the checkpoint holds no frozen weight, and the model already has the base's.
        """
        _, progress = self.model.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
        return progress


@contextmanager
def frozen_left_out_of_state(module: nn.Module) -> Iterator[None]:
    """In the block, ``module.state_dict()`` leaves out every frozen parameter, under each of its names.

    DeepSpeed's ``exclude_frozen_parameters`` drops a frozen parameter under its first name
    only: a tied alias (GPT-2's ``lm_head.weight``, the input embedding again) stayed in the
    checkpoint, the largest frozen matrix of the LM.
    """
    frozen = {name for name, parameter in module.named_parameters(remove_duplicate=False)
              if not parameter.requires_grad}

    def drop_frozen(_module, state, prefix, _metadata) -> None:
        for name in frozen:
            state.pop(prefix + name, None)

    handle = module.register_state_dict_post_hook(drop_frozen)
    try:
        yield
    finally:
        handle.remove()


def make_engine(captioner: nn.Module, trainable: list[nn.Parameter], config: TrainConfig, total_steps: int) -> Engine:
    return (DeepSpeedEngine if config.deepspeed else Engine)(captioner, trainable, config, total_steps)


def trainable_state(captioner: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapter + projector), detached and contiguous for safetensors."""
    return {name: p.detach().contiguous().cpu() for name, p in captioner.named_parameters() if p.requires_grad}
