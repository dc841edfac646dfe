"""The video captioner: vision tower -> per-frame tokens -> projector -> causal language model.

Each frame goes through the vision tower on its own; its pooled token (CLIP's CLS after the
final norm, SigLIP's attention-pool output, or the patches' mean for a tower without a
head), plus any tokens an adapter adds, is projected to the LM's width with a learned
frame-position embedding; optionally one clip token merged from all frames follows them. These tokens form a prefix the LM conditions on; training is
next-token loss on the caption only, decoding is greedy (or beam search). Everything loads
through ``from_pretrained(name_or_path)``.

A training batch may hold several captions of one clip: the vision side then runs once per
clip and each caption row reads its clip's prefix. With ``prefix_depth`` set, the vision input
is a clip's hidden states after the tower's first ``prefix_depth`` layers (computed once by
``vision_prefix`` and stored), and only the remaining layers run.

Adapters come on through ``add_adapter`` as an ``Extension`` (``model/extension.py``): their
hooks, modules and the callbacks the forward calls; ``remove_adapter`` takes one off again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from qstudy.core.errors import ConfigError
from qstudy.config import ModelConfig
from qstudy.core.dims import ModelDims
from qstudy.model.extension import Extension, VisionOutput

# CLIP's pixel statistics; SigLIP and most towers ship their own in the image processor.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Towers whose forward ``vision_prefix`` and ``_vision_suffix`` split in two, by config model_type:
# whether the embeddings are normed before the first layer (CLIP's pre_layrnorm), and how the
# last layer's output becomes (last_hidden_state, pooled) as the tower's own forward makes them.
_SPLIT_TOWERS = {
    "clip_vision_model": (True, lambda tower, hidden: (hidden, tower.post_layernorm(hidden[:, 0]))),
    "siglip_vision_model": (False, lambda tower, hidden: _siglip_end(tower, tower.post_layernorm(hidden))),
}


def _siglip_end(tower, last_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return last_hidden, tower.head(last_hidden) if tower.use_head else None


class Projector(nn.Module):
    """Vision width -> LM width (two-layer MLP, as in LLaVA) plus a frame-position embedding.

    With ``temporal_merger_rank`` > 0 it also makes one clip token from all frames at once:
    every frame's base tokens (pooled + grid) down-projected to that rank, concatenated in frame
    order, through a two-layer MLP. Motion is a difference between frames; per-frame tokens that
    the LM attends to separately carry it only weakly, and a small LM does not learn to read it
    from them; one token that sees the frames side by side does.
    """

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dims.vision_hidden, dims.lm_hidden), nn.GELU(),
                                 nn.Linear(dims.lm_hidden, dims.lm_hidden))
        self.frame_embedding = nn.Parameter(torch.zeros(dims.num_frames, dims.lm_hidden))
        self.base_tokens_per_frame = dims.base_tokens_per_frame
        self.temporal_merger = None
        if dims.temporal_merger_rank:
            rank = dims.temporal_merger_rank
            self.temporal_merger = nn.ModuleDict({
                "down": nn.Linear(dims.vision_hidden, rank),
                "mlp": nn.Sequential(nn.Linear(dims.num_frames * self.base_tokens_per_frame * rank, dims.lm_hidden),
                                     nn.GELU(), nn.Linear(dims.lm_hidden, dims.lm_hidden)),
            })

    def forward(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, frames, tokens, vision_hidden) -> (batch, frames * tokens, lm_hidden)."""
        projected = self.mlp(frame_tokens) + self.frame_embedding[None, :, None, :]
        return projected.flatten(1, 2)

    def clip_token(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, frames, tokens, vision_hidden) -> (batch, 1, lm_hidden) from the frames' base tokens.

        Tokens an adapter appends per frame are left out, so the merger's input width, and
        the base's trained weights, fit every method.
        """
        base_tokens = frame_tokens[:, :, : self.base_tokens_per_frame]
        merged = self.temporal_merger["mlp"](self.temporal_merger["down"](base_tokens).flatten(1))
        return merged[:, None, :]


def loading_options(config: ModelConfig) -> dict:
    """What every ``from_pretrained`` of a tower gets: the attention kernel, and Hub kernels only when asked.

    transformers >= 5.25 turns Hub kernels on by default and swaps in layers fetched from the
    Hub at run time (on CUDA), differently in train and eval mode: code no lock pins and an
    offline cluster cannot fetch. qstudy decides, not the installed transformers.
    """
    return {"attn_implementation": config.attn_implementation, "use_kernels": config.hub_kernels}


def load_vision_tower(config: ModelConfig) -> nn.Module:
    """A vision tower with ``.encoder.layers``, from a vision-only or a two-tower checkpoint."""
    model = AutoModel.from_pretrained(config.vision_encoder, **loading_options(config))
    if config.gradient_checkpointing:  # on the loaded model: a two-tower checkpoint's vision_model is no PreTrainedModel
        enable_checkpointing(model)
    return getattr(model, "vision_model", model)


def enable_checkpointing(model) -> None:
    """HF activation checkpointing of every layer of ``model``, non-reentrant."""
    # With the base frozen, a layer's inputs need no grad: reentrant checkpointing would then
    # cut the graph there, and the adapters inside the layer would get no gradients.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def image_normalization(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pixel mean/std from the checkpoint's image processor, else CLIP's."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name_or_path)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, ImportError):
        return _CLIP_MEAN, _CLIP_STD


class Captioner(nn.Module):
    """Vision tower + projector + causal LM, with adapters added and removed by name (``model/extension.py``)."""

    def __init__(self, vision: nn.Module, lm: nn.Module, tokenizer, dims: ModelDims, max_caption_tokens: int,
                 pixel_mean=_CLIP_MEAN, pixel_std=_CLIP_STD):
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        self.dims = dims
        self.max_caption_tokens = max_caption_tokens
        self.projector = Projector(dims)
        # The adapters' modules, all of them, so that saving "what trains" is one state_dict.
        self.adapter_modules = nn.ModuleDict()
        self.adapters: dict[str, Extension] = {}
        # Set when a run reuses the frozen prefix (train/recipe.py): the vision input is then the states
        # after this many layers.
        self.prefix_depth: int | None = None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, config: ModelConfig, num_frames: int) -> "Captioner":
        """Load both towers (and a pretrained projector if given) by hub name or local path."""
        dims = ModelDims.from_pretrained(config.vision_encoder, config.language_model, num_frames,
                                         frame_grid=config.frame_grid, temporal_merger_rank=config.temporal_merger_rank)
        mean, std = image_normalization(config.vision_encoder)
        lm = AutoModelForCausalLM.from_pretrained(config.language_model, **loading_options(config))
        if config.gradient_checkpointing:
            enable_checkpointing(lm)
        captioner = cls(
            vision=load_vision_tower(config),
            lm=lm,
            tokenizer=AutoTokenizer.from_pretrained(config.tokenizer or config.language_model),
            dims=dims,
            max_caption_tokens=config.max_caption_tokens,
            pixel_mean=mean,
            pixel_std=std,
        )
        if config.projector:
            state = load_file(config.projector)
            expected = {key: tuple(value.shape) for key, value in captioner.projector.state_dict().items()}
            found = {key: tuple(value.shape) for key, value in state.items()}
            if found["frame_embedding"] != expected["frame_embedding"]:
                raise ConfigError(f"model.projector: {config.projector} was trained for "
                                  f"{found['frame_embedding'][0]} frames, data.num_frames is {num_frames}")
            if found != expected:
                trained_rank = found.get("temporal_merger.down.weight", (0,))[0]
                raise ConfigError(
                    f"model.temporal_merger_rank / model.frame_grid: {config.projector} was trained with "
                    f"temporal_merger_rank {trained_rank}; the config asks for temporal_merger_rank "
                    f"{config.temporal_merger_rank} and frame_grid {config.frame_grid}, which give other shapes"
                )
            captioner.projector.load_state_dict(state)
        return captioner

    def save_base(self, directory: str | Path) -> ModelConfig:
        """Save as a reusable base: HF-format towers, tokenizer and projector weights."""
        directory = Path(directory)
        self.vision.save_pretrained(directory / "vision")
        self.lm.save_pretrained(directory / "lm")
        self.tokenizer.save_pretrained(directory / "lm")
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, directory / "projector.safetensors")
        return ModelConfig(
            vision_encoder=str(directory / "vision"),
            language_model=str(directory / "lm"),
            projector=str(directory / "projector.safetensors"),
            max_caption_tokens=self.max_caption_tokens,
            attn_implementation=self.vision.config._attn_implementation,
            frame_grid=self.dims.frame_grid,
            temporal_merger_rank=self.dims.temporal_merger_rank,
        )

    def add_adapter(self, name: str, extension: Extension) -> None:
        """Keep ``extension`` under ``name`` and register its modules; its hooks are already in place."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already on this captioner")
        taken = set(extension.modules) & set(self.adapter_modules)
        if taken:
            raise ValueError(f"adapter {name!r}: modules {sorted(taken)} are another adapter's")
        for key, module in extension.modules.items():
            self.adapter_modules[key] = module
        self.adapters[name] = extension

    def remove_adapter(self, name: str) -> Extension:
        """Undo everything adapter ``name`` added (hooks, replaced layers, modules, callbacks); return its record."""
        extension = self.adapters.pop(name)
        for handle in reversed(extension.handles):
            handle.remove()
        for key in extension.modules:
            del self.adapter_modules[key]
        return extension

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.vision.encoder.layers

    @property
    def lm_blocks(self) -> nn.ModuleList:
        """The LM's transformer blocks: GPT-2's ``transformer.h``, Llama-style ``model.layers``."""
        base = self.lm.base_model
        return base.h if hasattr(base, "h") else base.layers

    @property
    def device(self) -> torch.device:
        """Where the weights are, read from a buffer: ZeRO-3 leaves buffers whole while it shards parameters."""
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def splits_vision_tower(self) -> bool:
        """Whether ``vision_prefix`` knows this tower family's forward (frozen-prefix reuse needs it)."""
        return self.vision.config.model_type in _SPLIT_TOWERS

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (batch, frames, H, W, 3) -> normalised pixels (batch * frames, 3, H, W) in the model's dtype."""
        # uint8 crosses to the device: a quarter of the bytes of the float pixels made from it there.
        pixels = frames.to(self.device).flatten(0, 1).permute(0, 3, 1, 2).float().div(255)
        return ((pixels - self.pixel_mean) / self.pixel_std).to(self.projector.frame_embedding.dtype)

    def vision_prefix_modules(self, depth: int) -> list[nn.Module]:
        """What ``vision_prefix`` runs: the embeddings, their norm where the tower has one, the first ``depth`` layers."""
        normed_embeddings, _ = _SPLIT_TOWERS[self.vision.config.model_type]
        norm = [self.vision.pre_layrnorm] if normed_embeddings else []
        return [self.vision.embeddings, *norm, *self.encoder_layers[:depth]]

    def vision_prefix(self, frames: torch.Tensor, depth: int) -> torch.Tensor:
        """uint8 frames (batch, frames, H, W, 3) -> hidden states after the tower's first ``depth`` layers.

        (batch, frames, sequence, vision_hidden): what the tower's own forward holds at that
        depth, which ``visual_tokens`` continues from when ``prefix_depth`` is ``depth``.
        """
        batch, num_frames = frames.shape[:2]
        normed_embeddings, _ = _SPLIT_TOWERS[self.vision.config.model_type]
        hidden = self.vision.embeddings(self._pixels(frames))
        if normed_embeddings:
            hidden = self.vision.pre_layrnorm(hidden)
        for layer in self.encoder_layers[:depth]:
            hidden = layer(hidden, None)  # vision towers attend without a mask
        return hidden.unflatten(0, (batch, num_frames))

    def _vision_suffix(self, states: torch.Tensor, keep: set[int]) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """Stored states (batch, frames, sequence, hidden) -> the tower's (last_hidden_state, pooled, hidden_states).

        ``hidden_states`` as the tower's ``output_hidden_states`` gives them, holding the
        indices in ``keep`` at or after ``prefix_depth`` (the earlier ones never ran here).
        """
        if min(keep, default=self.prefix_depth) < self.prefix_depth:
            raise ValueError(f"an adapter reads vision hidden states {sorted(keep)}; the reused prefix ends at "
                             f"{self.prefix_depth}")
        hidden = states.to(self.device).flatten(0, 1).to(self.projector.frame_embedding.dtype)
        kept = [None] * (len(self.encoder_layers) + 1)
        for index, layer in enumerate(self.encoder_layers[self.prefix_depth:], start=self.prefix_depth):
            if index in keep:
                kept[index] = hidden
            hidden = layer(hidden, None)
        if len(self.encoder_layers) in keep:
            kept[-1] = hidden
        _, end = _SPLIT_TOWERS[self.vision.config.model_type]
        return *end(self.vision, hidden), kept

    def _vision_pass(self, visual: torch.Tensor) -> VisionOutput:
        """Vision input (see ``visual_tokens``) -> the tower's outputs per frame, with the hidden states adapters read."""
        states = len(self.encoder_layers) + 1
        keep = {index % states for extension in self.adapters.values() for index in extension.hidden_states}
        if visual.dtype == torch.uint8:
            asked = {"output_hidden_states": sorted(keep)} if keep else {}
            output = self.vision(pixel_values=self._pixels(visual), **asked)
            last_hidden, pooled = output.last_hidden_state, output.pooler_output
            hidden_states = output.hidden_states if keep else [None] * states
        elif self.prefix_depth is None:
            raise ValueError(f"vision input of dtype {visual.dtype}: frames are uint8; states need prefix_depth set")
        else:
            last_hidden, pooled, hidden_states = self._vision_suffix(visual, keep)
        if pooled is None:  # a SigLIP tower shipped without its attention-pool head, as VLMs often take it
            pooled = last_hidden.mean(dim=1)
        return VisionOutput(last_hidden, pooled, tuple(hidden_states))

    def _frame_tokens(self, vision: VisionOutput, num_frames: int) -> torch.Tensor:
        """A vision pass -> the tokens per frame (batch, frames, tokens, vision_hidden): the base's, then the adapters'."""
        tokens = [vision.pooled[:, None, :]] + self._grid_tokens(vision.last_hidden_state)
        tokens += [extension.frame_tokens(vision) for extension in self.adapters.values() if extension.frame_tokens]
        return torch.cat(tokens, dim=1).unflatten(0, (-1, num_frames))

    def visual_tokens(self, visual: torch.Tensor) -> torch.Tensor:
        """Vision input -> the vision side's tokens (batch, frames, tokens, vision_hidden).

        ``visual`` is uint8 frames (batch, frames, H, W, 3), or, with ``prefix_depth`` set,
        the states ``vision_prefix`` gave at that depth (any float dtype; they are cast).
        """
        return self._frame_tokens(self._vision_pass(visual), visual.shape[1])

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Vision input of a batch of clips -> (visual prefix, each adapter's per-clip state for the LM)."""
        vision = self._vision_pass(frames)
        frame_tokens = self._frame_tokens(vision, frames.shape[1])
        prefix = self.projector(frame_tokens)
        for extension in self.adapters.values():
            if extension.prefix:
                prefix = extension.prefix(prefix)
        if self.projector.temporal_merger is not None:
            prefix = torch.cat([prefix, self.projector.clip_token(frame_tokens)], dim=1)
        clip_states = {name: extension.clip_state(vision) for name, extension in self.adapters.items()
                       if extension.clip_state}
        return prefix, clip_states

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Vision input (see ``visual_tokens``) of a batch of clips -> visual prefix (batch, prefix_len, lm_hidden)."""
        return self.encode(frames)[0]

    def _condition(self, clip_states: dict[str, torch.Tensor], rows: torch.Tensor | None = None,
                   repeats: int = 1) -> None:
        """Hand each adapter its per-clip state for the LM's rows: row i reads clip ``rows[i]``, each clip ``repeats`` rows."""
        for name, state in clip_states.items():
            if rows is not None:
                state = state[rows]
            self.adapters[name].condition(state.repeat_interleave(repeats, dim=0) if repeats > 1 else state)

    def _grid_tokens(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """The patch tokens average-pooled to ``frame_grid`` x ``frame_grid`` (none when it is 0)."""
        if not self.dims.frame_grid:
            return []
        side = self.image_size // self.vision.config.patch_size
        patches = hidden[:, -side * side:]  # CLIP puts a CLS token first; SigLIP has none
        grid = patches.transpose(1, 2).reshape(hidden.shape[0], -1, side, side)
        pooled = nn.functional.adaptive_avg_pool2d(grid, self.dims.frame_grid)
        return [pooled.flatten(2).transpose(1, 2)]

    def _lm_inputs(self, prefix: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor):
        embeddings = self.lm.get_input_embeddings()(token_ids)
        inputs = torch.cat([prefix, embeddings], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=token_mask.dtype, device=prefix.device), token_mask], 1)
        for extension in self.adapters.values():
            if extension.lm_inputs:
                inputs, mask = extension.lm_inputs(inputs, mask)
        return inputs, mask

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (ids, mask) as ``BOS caption EOS``, padded on the right."""
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        rows = [[bos] + tok.encode(c, add_special_tokens=False)[: self.max_caption_tokens] + [tok.eos_token_id]
                for c in captions]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def forward(self, frames: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor,
                clip_of_row: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss over caption tokens (the visual prefix is never a target).

        ``clip_of_row[i]`` is the clip (index into ``frames``) caption row i describes: each
        clip's vision side runs once however many of its captions the batch holds, and its
        prefix's gradients sum over them. None: one caption per clip, in order.
        """
        prefix, clip_states = self.encode(frames)
        if clip_of_row is not None:
            clip_of_row = clip_of_row.to(self.device)
            prefix = prefix[clip_of_row]
        self._condition(clip_states, clip_of_row)
        token_ids, token_mask = token_ids.to(self.device), token_mask.to(self.device)
        inputs, mask = self._lm_inputs(prefix, token_ids, token_mask)
        logits = self.lm(inputs_embeds=inputs, attention_mask=mask).logits
        caption_len = token_ids.shape[1]
        # Position i predicts token i + 1: the last caption_len - 1 logits before the end.
        caption_logits = logits[:, -caption_len:-1, :]
        targets = token_ids[:, 1:].masked_fill(token_mask[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(caption_logits.float().reshape(-1, caption_logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, frames: torch.Tensor, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        """Greedy (or beam) captions for a batch of clips."""
        prefix, clip_states = self.encode(frames)
        # Beam search runs num_beams rows per clip, each clip's beams side by side (HF repeats its inputs so).
        self._condition(clip_states, repeats=num_beams)
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        start = torch.full((frames.shape[0], 1), bos, dtype=torch.long, device=prefix.device)
        inputs, mask = self._lm_inputs(prefix, start, torch.ones_like(start))
        output = self.lm.generate(
            inputs_embeds=inputs,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return [text.strip() for text in tok.batch_decode(output, skip_special_tokens=True)]

