"""Model shapes for closed-form counts, from config.json and the safetensors headers, never the weights.

The search space, the parameter budget and the sampler's feasibility check all need the
number of trainable parameters of a config before anything is built; they get it from these
shapes, and a test checks every method's closed form against the instantiated model.

A hub model's headers come over HTTP range requests (a 7B LM's weights are ~15 GB; its headers
tens of kB); a local or cached file's header is read from disk. A checkpoint with only
``pytorch_model.bin`` weights has no header: its shapes are those of the model its config.json
describes, built on torch's meta device in a child interpreter. This module never imports torch:
the method configs and the Tune side that validates spaces with it must stay torch-free
(pyproject's import contracts).
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from safetensors import safe_open

from qstudy.core.errors import ConfigError

HUB_PROBE_TIMEOUT_S = 3.0
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
META_SHAPES_TIMEOUT_S = 300  # building a 70B model on the meta device takes seconds; importing torch too
HEADER_FETCH_THREADS = 8  # a 70B model has ~30 shards: their headers come in parallel

T = TypeVar("T")


class ModelNotFound(ConfigError, FileNotFoundError):
    """A model name that is neither a local directory nor a model this process can get from the hub."""


@functools.cache
def hub_unreachable() -> str | None:
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


def _model_file(name_or_path: str, filename: str, local: Callable[[Path], T],
                remote: Callable[[str, str], T]) -> T | None:
    """``local`` of a model file on disk (a local directory's or the Hugging Face cache's), else ``remote``
    of the hub id and file name; None where the model has no such file, or the hub is out of reach
    and the cache lacks it (``_missing`` says which)."""
    directory = Path(name_or_path)
    if directory.is_dir():
        candidate = directory / filename
        return local(candidate) if candidate.exists() else None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(name_or_path, filename)
    except HFValidationError:
        raise ModelNotFound(f"{name_or_path}: no such directory, and not a Hugging Face hub id") from None
    if isinstance(cached, str):
        return local(Path(cached))
    # Offline, a file the cache lacks counts as absent: a snapshot cached without any record of
    # the files it lacks (which of model.safetensors or its index) is still read.
    if cached is not None or hub_unreachable() is not None:  # not None: the cache knows the hub lacks it
        return None
    try:
        return remote(name_or_path, filename)
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{name_or_path}: not a local directory, and no such model on the hub") from None


def _missing(name_or_path: str, what: str) -> ModelNotFound:
    """The error for a model without ``what``, saying so where only the Hugging Face cache was looked in."""
    reason = None if Path(name_or_path).is_dir() else hub_unreachable()
    if reason is None:
        return ModelNotFound(f"{name_or_path}: no {what}")
    return ModelNotFound(f"{name_or_path}: not a local directory, no {what} in the Hugging Face cache, "
                         f"and the hub is out of reach ({reason})")


def _read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _download_json(repo_id: str, filename: str) -> dict:
    from huggingface_hub import hf_hub_download

    return _read_json(hf_hub_download(repo_id, filename))


def _remote_header_shapes(repo_id: str, filename: str) -> dict[str, tuple[int, ...]]:
    """The header of a safetensors file on the hub, by range requests: the weights stay there."""
    from huggingface_hub import HfApi

    metadata = HfApi().parse_safetensors_file_metadata(repo_id, filename)
    return {key: tuple(tensor.shape) for key, tensor in metadata.tensors.items()}


def _remote_exists(repo_id: str, filename: str) -> bool:
    """Whether the hub has the file, by a HEAD request: nothing is downloaded."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo_id, filename))  # raises EntryNotFoundError for a missing file
    return True


def read_config(name_or_path: str) -> dict:
    config = _model_file(name_or_path, "config.json", _read_json, _download_json)
    if config is None:
        raise _missing(name_or_path, "config.json")
    return config


def read_weight_shapes(name_or_path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header(s), or from config.json for ``.bin`` weights.

    Looked for in transformers' order: one safetensors file, its sharded index, then ``.bin`` weights.
    """
    header = functools.partial(_model_file, name_or_path, local=safetensors_shapes, remote=_remote_header_shapes)
    single = header(SAFETENSORS_SINGLE)
    if single is not None:
        return single
    index = _model_file(name_or_path, SAFETENSORS_INDEX, _read_json, _download_json)
    if index is not None:
        shard_names = sorted(set(index["weight_map"].values()))
        with ThreadPoolExecutor(min(len(shard_names), HEADER_FETCH_THREADS)) as pool:
            shards = dict(zip(shard_names, pool.map(header, shard_names)))
        missing = [name for name, shapes in shards.items() if shapes is None]
        if missing:
            raise _missing(name_or_path, f"{', '.join(missing)} (named by {SAFETENSORS_INDEX})")
        return {key: shape for shapes in shards.values() for key, shape in shapes.items()}
    if any(_model_file(name_or_path, name, lambda _: True, _remote_exists) for name in BIN_WEIGHTS):
        return config_shapes(read_config(name_or_path), name_or_path)
    raise _missing(name_or_path, f"weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {' or '.join(BIN_WEIGHTS)})")


def config_shapes(config: dict, name_or_path: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model ``config`` describes (its ``architectures`` class), built on the
    meta device in a child interpreter: no weights, no memory, and no torch in this process (the module
    docstring says why). Tied weights count once, as in a safetensors file."""
    try:
        done = subprocess.run([sys.executable, "-c", _META_SHAPES_SCRIPT], input=json.dumps(config),
                              capture_output=True, text=True, timeout=META_SHAPES_TIMEOUT_S)
        reason = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        reason = f"no model after {META_SHAPES_TIMEOUT_S} s"
    if reason is not None:
        raise ModelNotFound(f"{name_or_path}: no safetensors weights, and no model to read the shapes from "
                            f"could be built from its config.json ({reason})")
    return {key: tuple(shape) for key, shape in json.loads(done.stdout.strip().splitlines()[-1]).items()}


# Reads a config.json mapping on stdin, prints {parameter name: shape} as the last line of stdout.
_META_SHAPES_SCRIPT = """
import json, sys
import torch, transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
config = json.load(sys.stdin)
if config.get("model_type") not in CONFIG_MAPPING:
    sys.exit(f"transformers knows no model_type {config.get('model_type')!r}")
model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
architecture = getattr(transformers, (config.get("architectures") or [""])[0], None)
with torch.device("meta"):
    model = architecture(model_config) if architecture else transformers.AutoModel.from_config(model_config)
print(json.dumps({name: list(parameter.shape) for name, parameter in model.named_parameters()}))
"""


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
    # Attention heads per vision layer (Q-Adapter's per-head gates); None where the config gives none.
    vision_heads: int | None = None
    # The projector's shape (see ModelConfig): per-frame grid side and the clip-token merger's rank.
    frame_grid: int = 2
    temporal_merger_rank: int = 0

    @classmethod
    def from_pretrained(cls, vision_encoder: str, language_model: str, num_frames: int, frame_grid: int = 2,
                        temporal_merger_rank: int = 0) -> "ModelDims":
        """From the towers' config.json and weight headers, by local path or hub id."""
        towers = {}
        for field, name in (("model.vision_encoder", vision_encoder), ("model.language_model", language_model)):
            try:
                towers[field] = read_config(name), read_weight_shapes(name)
            except ModelNotFound as error:
                raise ModelNotFound(f"{field}: {error}") from None
        (vision_config, vision_shapes), (lm_config, lm_shapes) = towers.values()
        return cls.from_configs(vision_config, lm_config, vision_tower_shapes(vision_shapes), lm_shapes,
                                num_frames, frame_grid, temporal_merger_rank)

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
            vision_heads=vision.get("num_attention_heads"),
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
