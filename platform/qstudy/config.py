"""YAML run configs validated into typed dataclasses at the edge; inner code never sees dicts.

Every error names the offending key with its dotted path (``train.learning_rate``) and is
raised before any model is built. This module imports no torch, so search-space
validation and the Tune driver can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qstudy.core.errors import ConfigError, Problems
from qstudy.core.paths import check_path_component, expand_path, qstudy_home
from qstudy.core.validate import check_at_least, from_mapping, load_yaml, to_mapping
from qstudy.methods import Adapter


@dataclass
class DataConfig:
    """Where the clips and captions are, and how frames are sampled from them."""

    # msrvtt: a JSON with "videos" (each with its "split") and "sentences", as MSR-VTT's
    # train_val_videodatainfo.json (splits "train" and "validate") or one file with every split.
    # msvd: the corpus CSV (English rows) or "<video_id> <caption>" lines (AllVideoDescriptions.txt),
    # split by <split>.txt / <split>_list.txt beside it, else by MSVD's standard 1200/100/670 order.
    annotations: str
    video_dir: str  # every split's <video_id>.<ext>: MSR-VTT's TrainValVideo and TestVideo files together
    format: Literal["msrvtt", "msvd"] = "msrvtt"
    train_split: str = "train"
    val_split: str = "validate"  # MSR-VTT's name, and that of MSVD's default split
    test_split: str = "test"
    # Where test_split is read when it is not in data.annotations: MSR-VTT's test_videodatainfo.json.
    test_annotations: str | None = None
    num_frames: int = 8
    image_size: int | None = None  # None: the vision encoder's own input size
    max_val_clips: int | None = None
    blind: bool = False  # blank every frame: the caption-prior floor
    # How a frame becomes the encoder's square: keep the aspect and cut the centre (as CLIP was
    # trained), or squash the whole frame.
    resize: Literal["shorter_side_center_crop", "squash"] = "shorter_side_center_crop"
    # Decoded frames are memory-mapped from here, shared by every run on the node (data/cache.py);
    # None: $QSTUDY_HOME/cache, made absolute when the config is read so all trials agree.
    cache_dir: str | None = None
    decode_workers: int | None = None  # processes decoding a cold cache; None: every core this process may use
    # A training batch is a set of clips (train.batch_size of them): the encoder runs once per clip
    # and the LM trains on its captions. "pairs": every (clip, caption) pair is its own example.
    batching: Literal["clips", "pairs"] = "clips"
    # Captions of each clip an epoch trains on, drawn afresh every epoch; None: all of them.
    captions_per_clip: int | None = None
    # Compute the hidden states after the encoder layers a method leaves frozen once per clip,
    # and reuse them in every epoch and trial (train/prefix_cache.py), stored in 16 bits.
    reuse_frozen_prefix: bool = True

    def __post_init__(self):
        problems = Problems()
        with problems.check():
            check_at_least("data", self, num_frames=1, image_size=1, max_val_clips=1, decode_workers=1,
                           captions_per_clip=1)
        for name in ("train_split", "val_split", "test_split"):  # MSVD reads <split>.txt beside the annotations
            with problems.check():
                check_path_component(getattr(self, name), f"data.{name}")
        for name, unset in (("cache_dir", "$QSTUDY_HOME/cache"), ("test_annotations", "no test file")):
            if getattr(self, name) == "":
                problems.add(f"data.{name}: empty path (leave it out for {unset})")
        problems.raise_any()


@dataclass
class ModelConfig:
    """The base captioner: a vision tower and a causal LM, by hub name or local path."""

    vision_encoder: str
    language_model: str
    tokenizer: str | None = None  # default: the language model's own
    projector: str | None = None  # a pretrained projector.safetensors (the cached base has one)
    max_caption_tokens: int = 24
    # "eager" is fastest for the tiny preset on CPU; None lets transformers pick (sdpa).
    attn_implementation: str | None = None
    # Each frame reaches the LM as its pooled token plus its patch tokens average-pooled to a
    # frame_grid x frame_grid grid (as video LLMs pool patches): where things are, and what is
    # where, survive. 0 keeps the pooled token only.
    frame_grid: int = 2
    # > 0: the projector also feeds the LM one clip token merged from all frames' tokens (each
    # down-projected to this rank), so motion across frames is one token's job. Must match the
    # projector a base was trained with; 0: per-frame tokens only.
    temporal_merger_rank: int = 0
    # Recompute each vision and LM layer's activations in the backward instead of keeping them:
    # memory for time, for models whose activations do not fit.
    gradient_checkpointing: bool = False
    # transformers' Hub kernels: layers fetched from the Hugging Face Hub at run time replace
    # some of the model's own on CUDA (RMSNorm, activations). Off: the locked stack's code runs.
    hub_kernels: bool = False

    def __post_init__(self):
        check_at_least("model", self, frame_grid=0, temporal_merger_rank=0, max_caption_tokens=1)


@dataclass
class TrainConfig:
    """Optimisation settings; ``deepspeed`` switches the engine, nothing else changes."""

    epochs: int = 3
    batch_size: int = 16  # per rank and micro-batch: clips (data.batching "clips") or (clip, caption) pairs
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_steps_per_epoch: int | None = None
    seed: int = 0
    deepspeed: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    # Warm-up over this share of the run's steps, then the LR stays ("constant") or decays to 0 ("cosine").
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_ratio: float = 0.05
    log_every: int = 50
    # One optimiser step per this many micro-batches of batch_size (per rank), loss scaled by its
    # inverse: the effective batch of a larger LM that fits only in smaller pieces.
    gradient_accumulation_steps: int = 1

    def __post_init__(self):
        problems = Problems()
        with problems.check():
            check_at_least("train", self, epochs=1, batch_size=1, weight_decay=0, max_steps_per_epoch=1, log_every=1,
                           gradient_accumulation_steps=1)
        if not self.learning_rate > 0:
            problems.add(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            problems.add(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        problems.raise_any()


@dataclass
class EvalConfig:
    """Decoding and scoring settings for the per-epoch validation pass."""

    max_new_tokens: int = 20
    num_beams: int = 1
    batch_size: int = 64
    meteor: bool = True  # METEOR runs a JVM of its own; every metric needs Java (the PTB tokenizer)

    def __post_init__(self):
        check_at_least("eval", self, max_new_tokens=1, num_beams=1, batch_size=1)


@dataclass
class RunConfig:
    """One fine-tuning run: what ``qstudy train CONFIG.yaml`` reads."""

    data: DataConfig
    model: ModelConfig
    adapter: Adapter  # the registered config its ``method`` key names
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/latest"

    @classmethod
    def from_dict(cls, data: dict, base_dir: Path | None = None) -> "RunConfig":
        """Validate a mapping; relative data and model paths resolve against ``base_dir``."""
        config = from_mapping(cls, data)
        if base_dir is not None:
            config.resolve_paths(base_dir)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            return cls.from_dict(load_yaml(path), base_dir=path.parent)
        except ConfigError as error:
            raise error.prefixed(f"{path}: ") from None

    def resolve_paths(self, base_dir: Path) -> None:
        """Make relative local paths absolute. Model fields may be hub names: those stay as they are."""

        def resolve(value: str | None, may_be_hub_name: bool) -> str | None:
            if value is None:
                return None
            value = expand_path(value)
            candidate = base_dir / value
            if Path(value).is_absolute() or (may_be_hub_name and not candidate.exists() and not value.startswith(".")):
                return value
            return str(candidate.resolve())

        self.data.annotations = resolve(self.data.annotations, may_be_hub_name=False)
        self.data.video_dir = resolve(self.data.video_dir, may_be_hub_name=False)
        self.data.test_annotations = resolve(self.data.test_annotations, may_be_hub_name=False)
        self.data.cache_dir = resolve(self.data.cache_dir or str(qstudy_home() / "cache"), may_be_hub_name=False)
        for name in ("vision_encoder", "language_model", "tokenizer", "projector"):
            setattr(self.model, name, resolve(getattr(self.model, name), may_be_hub_name=True))

    def to_dict(self) -> dict:
        return to_mapping(self)
