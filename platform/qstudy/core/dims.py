"""Torch-free model shapes, read from config.json and safetensors headers, for closed-form counts.

The search space, the parameter budget and the sampler's feasibility check all need the
number of trainable parameters of a config before anything is built; they get it from these
shapes, and a test checks every method's closed form against the instantiated model.
"""

from __future__ import annotations

import functools
import json
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from qstudy.core.errors import QstudyError

HUB_PROBE_TIMEOUT_S = 3.0


class ModelNotFound(QstudyError, FileNotFoundError):
    """A model name that is neither a local directory nor a model this process can get from the hub."""


@functools.cache
def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None; asked once per process.

    Without this, a model that is not cached costs huggingface_hub's five retries with backoff
    (24 s on a machine without network) before it says anything.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{constants.ENDPOINT} cannot be reached: {error}"
    return None


def _local_or_hub_file(name_or_path: str, filename: str) -> Path | None:
    """A model file from a local directory, else from the Hugging Face Hub cache or network."""
    local = Path(name_or_path)
    if local.is_dir():
        candidate = local / filename
        return candidate if candidate.exists() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(name_or_path, filename)
    except HFValidationError:
        raise ModelNotFound(f"{name_or_path}: no such directory, and not a Hugging Face hub id") from None
    if isinstance(cached, str):
        return Path(cached)
    reason = _hub_unreachable()
    if reason is not None:
        raise ModelNotFound(f"{name_or_path}: not a local directory, not in the Hugging Face cache, "
                            f"and the hub is out of reach ({reason})")
    try:
        return Path(hf_hub_download(name_or_path, filename))
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{name_or_path}: not a local directory, and no such model on the hub") from None


def read_config(name_or_path: str) -> dict:
    path = _local_or_hub_file(name_or_path, "config.json")
    if path is None:
        raise ModelNotFound(f"{name_or_path}: no config.json")
    return json.loads(path.read_text())


def read_weight_shapes(name_or_path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header(s); no tensor data is read."""
    index = _local_or_hub_file(name_or_path, "model.safetensors.index.json")
    if index is not None:
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [_local_or_hub_file(name_or_path, shard) for shard in shard_names]
    else:
        shards = [_local_or_hub_file(name_or_path, "model.safetensors")]
    if None in shards:
        raise ModelNotFound(f"{name_or_path}: no model.safetensors")
    return {key: shape for shard in shards for key, shape in safetensors_shapes(shard).items()}


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from one safetensors file's header; no tensor data is read."""
    with safe_open(str(path), framework="numpy") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of ``shape``."""
    count = 1
    for size in shape:
        count *= size
    return count


def vision_tower_config(config: dict) -> dict:
    """A CLIP/SigLIP checkpoint holds both towers; the vision settings sit under vision_config."""
    return config.get("vision_config", config)


def vision_tower_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Keep only the vision tower's tensors of a two-tower checkpoint."""
    if any(key.startswith("text_model.") for key in shapes):
        return {key: shape for key, shape in shapes.items() if key.startswith("vision_model.")}
    return shapes


@dataclass(frozen=True)
class ModelDims:
    """The shapes that parameter counts and hyperparameter bounds depend on."""

    vision_hidden: int
    vision_layers: int
    lm_hidden: int
    lm_layers: int
    num_frames: int
    vision_shapes: dict[str, tuple[int, ...]]
    lm_shapes: dict[str, tuple[int, ...]]
    # The patch grid (ADEM-VL's multiscale features are sized by it); None where a tower lacks them.
    vision_image_size: int | None = None
    vision_patch_size: int | None = None
    # The projector's shape (see ModelConfig): per-frame grid side and the clip-token merger's rank.
    frame_grid: int = 2
    temporal_merger_rank: int = 0

    @classmethod
    def from_pretrained(cls, vision_encoder: str, language_model: str, num_frames: int, frame_grid: int = 2,
                        temporal_merger_rank: int = 0) -> "ModelDims":
        return cls.from_configs(read_config(vision_encoder), read_config(language_model),
                                vision_tower_shapes(read_weight_shapes(vision_encoder)),
                                read_weight_shapes(language_model), num_frames, frame_grid, temporal_merger_rank)

    @classmethod
    def from_configs(cls, vision_config: dict, lm_config: dict, vision_shapes: dict[str, tuple[int, ...]],
                     lm_shapes: dict[str, tuple[int, ...]], num_frames: int, frame_grid: int = 2,
                     temporal_merger_rank: int = 0) -> "ModelDims":
        """From config dicts (``config.json`` contents) and weight shapes, however they were obtained."""
        vision = vision_tower_config(vision_config)
        # GPT-2 names its widths n_embd/n_layer; Llama-family and most other LMs hidden_size/num_hidden_layers.
        return cls(
            vision_hidden=vision["hidden_size"],
            vision_layers=vision["num_hidden_layers"],
            lm_hidden=lm_config.get("hidden_size", lm_config.get("n_embd")),
            lm_layers=lm_config.get("num_hidden_layers", lm_config.get("n_layer")),
            num_frames=num_frames,
            vision_shapes=vision_shapes,
            lm_shapes=lm_shapes,
            vision_image_size=vision.get("image_size"),
            vision_patch_size=vision.get("patch_size"),
            frame_grid=frame_grid,
            temporal_merger_rank=temporal_merger_rank,
        )

    @property
    def vision_params(self) -> int:
        return sum(numel(shape) for shape in self.vision_shapes.values())

    @property
    def lm_params(self) -> int:
        return sum(numel(shape) for shape in self.lm_shapes.values())

    @property
    def vision_grid(self) -> int | None:
        """Patches per side of a frame's patch grid."""
        if self.vision_image_size is None or self.vision_patch_size is None:
            return None
        return self.vision_image_size // self.vision_patch_size

    def norm_params(self, tower: str) -> int:
        """Parameters of the normalisation layers of ``tower`` ("vision" or "lm"), by module name."""
        shapes = self.vision_shapes if tower == "vision" else self.lm_shapes
        return sum(numel(shape) for name, shape in shapes.items() if is_norm_module(name.rpartition(".")[0]))

    @property
    def base_tokens_per_frame(self) -> int:
        """The pooled token plus the frame_grid x frame_grid patch grid."""
        return 1 + self.frame_grid**2

    @property
    def projector_params(self) -> int:
        """Two-layer MLP vision->LM width plus one learned embedding per frame position (trained by every method)."""
        d_vision, d_lm = self.vision_hidden, self.lm_hidden
        return d_vision * d_lm + d_lm + d_lm * d_lm + d_lm + self.num_frames * d_lm

    @property
    def temporal_merger_params(self) -> int:
        """The clip-token merger: per-token down-projection to its rank, then a two-layer MLP (0 without one)."""
        d_vision, d_lm, rank = self.vision_hidden, self.lm_hidden, self.temporal_merger_rank
        if not rank:
            return 0
        merged_width = self.num_frames * self.base_tokens_per_frame * rank
        return d_vision * rank + rank + merged_width * d_lm + d_lm + d_lm * d_lm + d_lm

    @property
    def total_params(self) -> int:
        return self.vision_params + self.lm_params + self.projector_params + self.temporal_merger_params


def is_norm_module(name: str) -> bool:
    """Whether a dotted module name is a LayerNorm/RMSNorm one.

    Covers CLIP's layer_norm1/post_layernorm/pre_layrnorm, SigLIP's head.layernorm, GPT-2's
    ln_1/ln_f and Llama/Qwen2's input_layernorm/post_attention_layernorm/norm. Closed-form
    counts and the torch side both select norms with this
    one rule, so they cannot disagree.
    """
    leaf = name.rpartition(".")[2].lower()
    return leaf.startswith("ln") or "norm" in leaf
