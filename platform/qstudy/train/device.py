"""Where and in what this process computes: its device (Ray Train's, the GPU Ray assigned, or the local one), dtype and autocast.

Every path that builds a captioner (the recipe on any worker, ``qstudy caption``) asks
:func:`select_device` once and moves the model there; the captioner moves its inputs to
wherever its weights are.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch


def worker_device() -> torch.device:
    """Ray Train's device on a Train worker, the GPU Ray gave this actor (an in-actor trial), else the local one.

    Outside Ray, the local device is ``cuda:LOCAL_RANK`` when CUDA is there (torchrun ranks,
    ``qstudy train`` on a GPU box: where DeepSpeed would put the model anyway), else the CPU.
    """
    ray = sys.modules.get("ray")  # a plain run never imported Ray; importing it costs seconds
    if ray is not None and ray.is_initialized():
        import ray.train.torch
        from ray.train.v2._internal.util import _in_ray_train_worker  # the check Ray guards get_device with

        if _in_ray_train_worker():
            return ray.train.torch.get_device()
        gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        if not gpu_ids:
            return torch.device("cpu")
        # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPUs; CUDA numbers what it can see from 0.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        return torch.device("cuda", visible.index(gpu_ids[0]) if gpu_ids[0] in visible else int(gpu_ids[0]))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def select_device() -> torch.device:
    """:func:`worker_device`, made torch's current CUDA device so DeepSpeed and NCCL use the same one."""
    device = worker_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def peak_memory_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` of ``device`` in MiB; None where torch keeps no such count."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak_rss() -> None:
    """Start this process's peak resident memory over from its present size (Linux; elsewhere, or where the
    kernel refuses, it keeps counting from the process's start): a reused Ray actor ran other trials before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MiB since it started or :func:`reset_peak_rss`; None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # train.precision -> the model's weights


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a model trains (and so captions) in for ``train.precision``."""
    return PRECISION_DTYPES[precision]


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on a GPU for ``precision: bf16`` (softmax, norms and the loss stay fp32); nothing elsewhere."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=precision_dtype(precision))
    return nullcontext()
