"""Frozen-prefix reuse: each clip's vision hidden states after the layers a method leaves frozen, computed once per node.

A method that leaves the vision encoder's first L layers (and its embeddings) frozen and
unhooked (``AdapterConfig.frozen_vision_layers``) gets the same output from them for a clip in
every step, epoch and trial. Those states are computed once, stored in 16 bits under the
frame cache's discipline (content key, file lock, atomic rename; ``data/cache.py``) in
``<cache root>/prefix/<key>/``, and memory-mapped by every run that shares the base's prefix
weights, the split's frames and L; the run's captioner then starts at layer L.

Numerics: the prefix is computed in the model's weights' dtype, fp32 before the engine casts
them (on one thread on a CPU, so an entry's bytes do not depend on which run built it; the
weights' dtype enters the key), and rounded once to the storage dtype: bf16 for ``bf16`` runs,
whose activations are bf16 anyway, fp16 for ``fp32`` runs (3 more mantissa bits). Everything
after layer L is the run's own arithmetic, so reuse equals running the whole tower with that
one rounding at depth L (tests/methods/test_adapter_table.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from qstudy.config import RunConfig
from qstudy.data.cache import cache_root, publish, write_durably
from qstudy.model.captioner import Captioner
from qstudy.train.engine import cpu_threads

FORMAT_VERSION = 1
STATES_FILE = "states.bin"  # raw 16-bit values, (clips, frames, sequence, vision_hidden)
INDEX_FILE = "index.json"
STORAGE_DTYPES = {"fp32": torch.float16, "bf16": torch.bfloat16}  # train.precision -> what is stored
BUILD_CLIPS = 16  # clips per prefix forward while building: a fixed chunking, so the same bytes every time


def reuse_depth(captioner: Captioner, config: RunConfig) -> tuple[int, str]:
    """(L, why): how many leading encoder layers' outputs this run may reuse, 0 when none, and the reason.

    Raises if the method declares layers frozen that are not: a wrong declaration would
    silently train on stale states.
    """
    method, layers = config.adapter.method, captioner.dims.vision_layers
    if not config.data.reuse_frozen_prefix:
        return 0, "off (data.reuse_frozen_prefix: false)"
    depth = config.adapter.frozen_vision_layers(captioner.dims)
    if depth == 0:
        return 0, f"not applicable: {method} trains or hooks the vision encoder from its first layer"
    if not captioner.splits_vision_tower:
        return 0, f"not applicable: no prefix/suffix split for {captioner.vision.config.model_type} towers"
    _check_untouched(captioner, depth, method)
    return depth, f"{method} leaves layers 0..{depth - 1} of {layers} frozen: their states are computed once per clip"


def _check_untouched(captioner: Captioner, depth: int, method: str) -> None:
    for module in captioner.vision_prefix_modules(depth):
        for name, child in module.named_modules():
            trains = any(p.requires_grad for p in child.parameters(recurse=False))
            if trains or child._forward_hooks or child._forward_pre_hooks:
                raise RuntimeError(f"{method} declares {depth} frozen vision layers, but {type(child).__name__} "
                                   f"{name!r} in them {'trains' if trains else 'has a hook'}")


def prefix_key(captioner: Captioner, depth: int, frames_entry: str, blind: bool, storage: torch.dtype) -> str:
    """What the stored states depend on, hashed: the prefix's weights and pixel statistics, the frames, L, numerics."""
    weights = hashlib.sha256()
    for module in captioner.vision_prefix_modules(depth):
        for name, tensor in module.state_dict().items():
            weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            weights.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    for statistic in (captioner.pixel_mean, captioner.pixel_std):
        weights.update(statistic.detach().to("cpu", torch.float64).numpy().tobytes())
    content = {"format": FORMAT_VERSION, "frames": frames_entry, "blind": blind, "depth": depth,
               "weights": weights.hexdigest(), "tower": type(captioner.vision).__name__,
               "attention": captioner.vision.config._attn_implementation, "storage": str(storage),
               "device": captioner.device.type, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def _write_states(partial: Path, captioner: Captioner, frames, depth: int, storage: torch.dtype, progress: bool) -> None:
    """Every clip's states after ``depth`` layers, in chunks of ``BUILD_CLIPS`` clips, into ``partial``."""
    shape = None

    def chunks():
        nonlocal shape
        for start in tqdm(range(0, len(frames), BUILD_CLIPS), disable=not progress,
                          desc=f"computing the frozen prefix ({depth} layers) of {len(frames)} clips"):
            states = captioner.vision_prefix(frames[start:start + BUILD_CLIPS], depth).to(storage)
            if not torch.isfinite(states).all():
                raise RuntimeError(f"the frozen prefix's states overflow {storage}: set data.reuse_frozen_prefix: false")
            shape = shape or [len(frames), *states.shape[1:]]
            yield states.cpu().view(torch.int16).numpy()
        shape = shape or [0]

    was_training = captioner.training
    captioner.eval()
    try:
        with torch.no_grad(), cpu_threads(1 if captioner.device.type == "cpu" else None):
            write_durably(partial / STATES_FILE, chunks())
    finally:
        captioner.train(was_training)
    index = {"key": partial.name.removesuffix(".partial"), "depth": depth, "dtype": str(storage), "shape": shape}
    write_durably(partial / INDEX_FILE, [json.dumps(index).encode()])


def prefix_states(captioner: Captioner, frames, frames_entry: str, depth: int, config: RunConfig,
                  progress: bool = True) -> tuple[np.ndarray, torch.dtype]:
    """A split's states after ``depth`` layers, from the node's cache (computed into it first if no run has).

    ``frames`` indexes like ``recipe.MappedRows`` (uint8 tensors per clip); ``frames_entry``
    names the frame cache entry they come from. Returns a read-only int16 memory map
    (clips, frames, sequence, hidden) of the 16-bit values and the dtype they are.
    """
    storage = STORAGE_DTYPES[config.train.precision]
    root = cache_root(config.data) / "prefix"
    key = prefix_key(captioner, depth, frames_entry, config.data.blind, storage)
    publish(root, key, lambda partial: _write_states(partial, captioner, frames, depth, storage, progress))
    shape = tuple(json.loads((root / key / INDEX_FILE).read_text())["shape"])
    # numpy cannot map an empty file; a split where nothing decoded is an empty array.
    states = np.memmap(root / key / STATES_FILE, np.int16, "r", shape=shape) if shape[0] else np.zeros(shape, np.int16)
    return states, storage
