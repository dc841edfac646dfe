"""Every registered adapter on every backbone pair through the same checks: counts, freezing, training, save/reload, zero-init.

One table, one row per method and the configs where a method's variants differ in what they
build. A method registered without a row here fails ``test_every_registered_method_has_a_row``.
Each row runs on the pretrained tiny base (CLIP + GPT-2) and on random tiny towers of the other
families users bring (SigLIP: no CLS token, attention-pool head; Qwen2: Llama-style blocks,
rotary positions, grouped KV heads, tied embeddings), built once per session from config classes.
"""

from __future__ import annotations

import ast
import copy
import inspect
import itertools
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qstudy.methods import ADAPTERS, adapter_config_from_mapping
from qstudy.methods.inject import INJECTS, apply_adapter, count_parameters
from qstudy.methods.bottleneck.config import ResidualAdapterConfig
from qstudy.methods.qadapter.config import QAdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.cli import DEMO_CONFIG
from qstudy.config import RunConfig
from qstudy.data.annotations import read_clips
from qstudy.data.frames import decode_clips
from qstudy.data.synthetic import caption_vocabulary
from qstudy.model.captioner import Captioner
from qstudy.core.dims import is_norm_module
from qstudy.model.tiny import build_tiny
from qstudy.train.engine import trainable_state
from qstudy.train.prefix_cache import STORAGE_DTYPES, prefix_states, reuse_depth
from qstudy.train.recipe import MappedRows

TABLE = {
    "frozen": {"method": "frozen"},
    "full": {"method": "full"},
    "lora-vision": {"method": "lora", "target": "vision", "rank": 4},
    "lora-lm": {"method": "lora", "target": "lm", "rank": 4},
    "lora-both": {"method": "lora"},
    "qadapter-none": {"method": "qadapter", "gating": "none", "rank": 8},
    "qadapter-tanh": {"method": "qadapter", "gating": "tanh", "insertion_layers": "every:2"},
    # A layer list that every pair's tower has (the tiny SigLIP has 2 layers, CLIP 4).
    "qadapter-sigmoid": {"method": "qadapter", "gating": "sigmoid", "insertion_layers": [1]},
    "qadapter-queries_to_lm": {"method": "qadapter", "gating": "tanh", "queries_to_lm": True, "num_query_tokens": 2},
    "qadapter-side-token": {"method": "qadapter", "gating": "token", "insertion_layers": [1], "rank": 4},
    "qadapter-gated_attention-per_head": {"method": "qadapter", "placement": "gated_attention", "gating": "per_head",
                                          "num_query_tokens": 4},
    "qadapter-gated_attention-token": {"method": "qadapter", "placement": "gated_attention", "gating": "token",
                                       "insertion_layers": "all", "num_query_tokens": 2},
    "qadapter-sequence-vpt": {"method": "qadapter", "placement": "sequence", "num_query_tokens": 2},
    "qadapter-sequence-vqt": {"method": "qadapter", "placement": "sequence", "sequence_mode": "vqt",
                              "queries_to_lm": True, "insertion_layers": [0, 1], "num_query_tokens": 2},
    "bottleneck-lm": {"method": "bottleneck"},
    "bottleneck-both-single": {"method": "bottleneck", "target": "both", "sharing": "single", "reduction_factor": 8},
    "bottleneck-vision-half-norms-frozen": {"method": "bottleneck", "target": "vision", "sharing": "half",
                                            "unfreeze_layer_norms": False},
    "compacter-lm": {"method": "compacter"},
    "compacter-both-rank2": {"method": "compacter", "target": "both", "phm_rank": 2, "reduction_factor": 8},
    "hyperformer-lm": {"method": "hyperformer"},
    "hyperformer-both": {"method": "hyperformer", "target": "both", "reduction_factor": 8, "embedding_dim": 8},
    "prompt_tuning": {"method": "prompt_tuning", "prompt_length": 4},
    "prompt_tuning-mid_dim": {"method": "prompt_tuning", "mid_dim": 32},
    "ademvl": {"method": "ademvl"},
    "ademvl-one-scale-no-drop": {"method": "ademvl", "pool_strides": [1], "drop_ratio": 0.0, "vision_adapter_dim": 0},
}
# Leading vision layers each row leaves frozen and unhooked, for a tower of n layers (0: the encoder runs every step).
FROZEN_LAYERS = {
    "frozen": lambda n: n,
    "full": lambda n: 0,
    "lora-vision": lambda n: 0,
    "lora-lm": lambda n: n,
    "lora-both": lambda n: 0,
    "qadapter-none": lambda n: n - 2,  # last:2
    "qadapter-tanh": lambda n: 1,  # every:2 -> layers 1, 3, ...
    "qadapter-sigmoid": lambda n: 1,
    "qadapter-queries_to_lm": lambda n: n - 2,
    "qadapter-side-token": lambda n: 1,
    "qadapter-gated_attention-per_head": lambda n: n - 2,
    "qadapter-gated_attention-token": lambda n: 0,  # all: the first layer's attention is hooked
    "qadapter-sequence-vpt": lambda n: n - 2,
    "qadapter-sequence-vqt": lambda n: 0,
    "bottleneck-lm": lambda n: n,
    "bottleneck-both-single": lambda n: 0,
    "bottleneck-vision-half-norms-frozen": lambda n: 0,
    "compacter-lm": lambda n: n,
    "compacter-both-rank2": lambda n: 0,
    "hyperformer-lm": lambda n: n,
    "hyperformer-both": lambda n: 0,
    "prompt_tuning": lambda n: n,
    "prompt_tuning-mid_dim": lambda n: n,
    "ademvl": lambda n: 0,  # its parallel adapters sit in every vision layer
    "ademvl-one-scale-no-drop": lambda n: n - 2,  # no vision adapters; the fusion hooks the penultimate layer
}
CLIP_OF_ROW = [0, 0, 0, 1, 2, 2, 3]  # a clip-grouped batch: several caption rows read each clip
CLIPS = 4
STEPS = 4
LEARNING_RATE = 2e-3
NEW_TOKENS = 8
MERGER = "projector.temporal_merger."  # pretrained with the base, frozen with the vision tower
# (vision family, LM family); the first is the pretrained tiny base, the others random tiny towers.
PAIRS = [("clip", "gpt2"), ("clip", "qwen2"), ("siglip", "gpt2"), ("siglip", "qwen2")]


class Bench:
    """A base captioner, a fixed batch of decoded target clips, and the base model's outputs on it."""

    def __init__(self, model_config):
        preset = RunConfig.from_yaml(DEMO_CONFIG)
        self.num_frames = preset.data.num_frames
        clips = read_clips(preset.data.format, preset.data.annotations, preset.data.video_dir, "train")[:CLIPS]
        self.loaded = Captioner.from_pretrained(model_config, self.num_frames)
        base = self.build()
        decoded = decode_clips(clips, self.num_frames, base.image_size, progress=False)
        self.frames = torch.from_numpy(decoded.frames)
        self.token_ids, self.token_mask = base.tokenize([clip.captions[0] for clip in decoded.clips])
        self.base_loss, self.base_logits = self.loss_and_logits(base)
        self.base_captions = base.generate(self.frames, max_new_tokens=NEW_TOKENS)

    def build(self) -> Captioner:
        """A fresh base: a copy of the one loaded from disk (loading is most of a row's time)."""
        return copy.deepcopy(self.loaded)

    def loss_and_logits(self, captioner: Captioner) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode loss on the fixed batch and the LM's logits of that forward."""
        seen = []
        handle = captioner.lm.register_forward_hook(lambda _module, _args, output: seen.append(output.logits))
        captioner.eval()
        with torch.no_grad():
            loss = captioner(self.frames, self.token_ids, self.token_mask)
        handle.remove()
        return loss, seen[0]


@pytest.fixture(scope="session", params=PAIRS, ids=["-".join(pair) for pair in PAIRS])
def bench(request, tiny_workspace, tmp_path_factory):
    # Tiny matmuls gain nothing from intra-op threads; on a shared 2-core machine the threads'
    # waiting made these tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preset = RunConfig.from_yaml(DEMO_CONFIG)
    model = preset.model
    if request.param != PAIRS[0]:
        vision, lm = request.param
        directory = tmp_path_factory.mktemp(f"{vision}-{lm}")
        towers = build_tiny(directory / "towers", caption_vocabulary(), vision=vision, lm=lm)
        # Saved as a base, so the projector too loads the same weights into every captioner built from it.
        model = Captioner.from_pretrained(replace(towers, frame_grid=model.frame_grid,
                                                  temporal_merger_rank=model.temporal_merger_rank),
                                          preset.data.num_frames).save_base(directory / "base")
    yield Bench(model)
    torch.set_num_threads(threads)


def base_weight_trains(config, name: str, towers: set[str]) -> bool:
    """Whether a weight of the base (the towers and the projector's temporal merger) should train."""
    if config.method == "full":
        return True
    if config.method == "lora":
        return "lora_" in name and name.partition(".")[0] in towers
    if isinstance(config, ResidualAdapterConfig) and config.unfreeze_layer_norms:
        return name.partition(".")[0] in towers and is_norm_module(name.rpartition(".")[0])
    return False


def test_each_method_is_one_folder_named_once_with_its_config_and_its_inject():
    assert list(INJECTS) == list(ADAPTERS)
    for name, config in ADAPTERS.items():
        assert config.method == name
        assert (config.__module__, INJECTS[name].__module__) == (f"qstudy.methods.{name}.config",
                                                                 f"qstudy.methods.{name}.modules")


def test_shared_layers_hold_only_what_several_methods_use_and_inject_imports_each_method_by_name():
    """A reader follows a method from the registry to its folder: no import by computed name, nothing of one method shared."""
    methods = Path(inspect.getfile(INJECTS["frozen"])).parents[1]
    shared = {node.name for node in ast.parse((methods / "layers.py").read_text()).body
              if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    users = {name: set() for name in shared}
    for method in ADAPTERS:
        for path in (methods / method).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "qstudy.methods.layers":
                    for alias in node.names:
                        users.setdefault(alias.name, set()).add(method)
    assert {name: sorted(used) for name, used in users.items() if len(used) < 2} == {}
    imports = [node for node in ast.walk(ast.parse((methods / "inject.py").read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [node for node in imports if "importlib" in ast.unparse(node)]
    assert {node.module for node in imports if isinstance(node, ast.ImportFrom) and node.names[0].name == "modules"} \
        == {f"qstudy.methods.{method}" for method in ADAPTERS}


def test_every_registered_method_has_a_row():
    assert {row["method"] for row in TABLE.values()} == set(ADAPTERS)
    assert set(FROZEN_LAYERS) == set(TABLE)


@pytest.mark.parametrize("row", list(TABLE), ids=list(TABLE))
def test_adapter(row, bench, tmp_path):
    config = adapter_config_from_mapping(TABLE[row])
    torch.manual_seed(0)
    captioner = bench.build()
    trainable = apply_adapter(captioner, config)

    # Exactly the closed-form number of parameters trains, and exactly the intended ones.
    assert count_parameters(captioner)[0] == sum(p.numel() for p in trainable) == config.count_trainable(captioner.dims)
    towers = {"vision", "lm"} if getattr(config, "target", "both") == "both" else {config.target}
    for name, parameter in captioner.named_parameters():
        intended = (name.startswith(("projector.", "adapter_modules.")) and not name.startswith(MERGER)
                    or base_weight_trains(config, name, towers))
        assert parameter.requires_grad == intended, name

    # Zero-initialised methods start exactly at the base; the others visibly do not.
    loss, logits = bench.loss_and_logits(captioner)
    if config.starts_at_base:
        assert torch.equal(loss, bench.base_loss) and torch.equal(logits, bench.base_logits)
        assert captioner.generate(bench.frames, max_new_tokens=NEW_TOKENS) == bench.base_captions
    else:
        assert not torch.equal(loss, bench.base_loss)

    # A few steps on the fixed batch lower its loss.
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    captioner.train()
    for _ in range(STEPS):
        captioner(bench.frames, bench.token_ids, bench.token_mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained_loss, trained_logits = bench.loss_and_logits(captioner)
    assert trained_loss < loss

    # The saved trainable weights rebuild the same model from a fresh base.
    save_file(trainable_state(captioner), tmp_path / "adapter.safetensors")
    torch.manual_seed(1)  # a different random init for the fresh adapter modules
    fresh = bench.build()
    apply_adapter(fresh, config)
    loaded = fresh.load_state_dict(load_file(tmp_path / "adapter.safetensors"), strict=False)
    assert not loaded.unexpected_keys
    assert {name for name, p in fresh.named_parameters() if p.requires_grad} <= set(load_file(tmp_path / "adapter.safetensors"))
    reloaded_loss, reloaded_logits = bench.loss_and_logits(fresh)
    assert torch.equal(reloaded_loss, trained_loss) and torch.equal(reloaded_logits, trained_logits)
    assert fresh.generate(bench.frames, max_new_tokens=NEW_TOKENS) == captioner.generate(bench.frames, max_new_tokens=NEW_TOKENS)


def qadapter_readings() -> list[dict]:
    """Every placement x gating x sequence_mode, each field set only where the placement uses it (vqt reads out to the LM)."""
    hints = typing.get_type_hints(QAdapterConfig)
    readings = []
    for placement, gating, mode in itertools.product(*(typing.get_args(hints[name])
                                                       for name in ("placement", "gating", "sequence_mode"))):
        config = QAdapterConfig(placement=placement, gating=gating, sequence_mode=mode, queries_to_lm=mode == "vqt")
        if all(config.uses(name) or getattr(config, name) == getattr(QAdapterConfig(), name)
               for name in ("gating", "sequence_mode")):
            readings.append({**config.to_mapping(), "num_query_tokens": 2, "rank": 4,
                             "queries_to_lm": config.uses("sequence_mode") and mode == "vqt"})
    return readings


def test_every_qadapter_reading_counts_in_closed_form_and_starts_where_its_docstring_says(bench):
    """Each reading: the closed-form count is the modules', and it starts at the base exactly when it says so."""
    refused = []
    readings = qadapter_readings()
    for reading in readings:
        config = adapter_config_from_mapping(reading)
        torch.manual_seed(0)
        captioner = bench.build()
        try:
            apply_adapter(captioner, config)
        except ConfigError:
            refused.append((config.placement, config.gating))
            continue
        assert count_parameters(captioner)[0] == config.count_trainable(captioner.dims), reading
        loss, logits = bench.loss_and_logits(captioner)
        assert (torch.equal(loss, bench.base_loss) and torch.equal(logits, bench.base_logits)) == config.starts_at_base, \
            reading
    assert refused == [("side", "per_head")]
    assert len(readings) == 5 + 5 + 2  # side and gated_attention by gate, sequence by mode


def test_vqt_leaves_the_towers_tokens_as_the_base_computes_them_and_feeds_the_lm_each_layers_queries(bench):
    base, captioner = bench.build(), bench.build()
    apply_adapter(captioner, adapter_config_from_mapping({"method": "qadapter", "placement": "sequence",
                                                          "sequence_mode": "vqt", "queries_to_lm": True,
                                                          "insertion_layers": [0, 1], "num_query_tokens": 3}))
    with torch.no_grad():
        base_tokens, tokens = base.visual_tokens(bench.frames), captioner.visual_tokens(bench.frames)
    assert tokens.shape[2] == base_tokens.shape[2] + 2 * 3  # K per insertion layer per frame
    assert torch.equal(tokens[:, :, :base_tokens.shape[2]], base_tokens)


def test_ademvl_feeds_the_lm_one_visual_token_and_fuses_the_rest(bench):
    base = bench.build()
    captioner = bench.build()
    apply_adapter(captioner, adapter_config_from_mapping({"method": "ademvl"}))
    with torch.no_grad():
        base_prefix = base.encode_frames(bench.frames)
        visual_tokens = captioner.encode_frames(bench.frames)
    # The base feeds the LM each frame's pooled token first, then its other tokens, then its clip
    # token; ADEM-VL feeds the pooled tokens' average and the same clip token (its vision adapters
    # start at zero, the projector is the base's).
    assert base.projector.temporal_merger is not None
    frame_tokens, clip_token = base_prefix[:, :-1], base_prefix[:, -1:]
    assert visual_tokens.shape[1] == 2
    frames_pooled = frame_tokens.unflatten(1, (bench.num_frames, -1))[:, :, 0]
    torch.testing.assert_close(visual_tokens[:, :1], frames_pooled.mean(dim=1, keepdim=True))
    torch.testing.assert_close(visual_tokens[:, 1:], clip_token)
    grid = captioner.dims.vision_grid
    fused_tokens = captioner.encode(bench.frames)[1]["ademvl"].shape[1]
    assert fused_tokens == bench.num_frames * (grid**2 + (grid // 2) ** 2)


# Beam search runs several rows per clip: every state a method keeps per clip (Q-Adapter's query
# tokens to the LM, ADEM-VL's fused features) must follow its clip's rows. Q-Adapter's rows
# here are each new placement and gate; the gates kept from before (none, tanh, sigmoid) differ
# from these in a factor only.
BEAM_ROWS = {**{row: TABLE[row] for row in ("qadapter-queries_to_lm", "qadapter-side-token",
                                            "qadapter-gated_attention-per_head", "qadapter-gated_attention-token",
                                            "qadapter-sequence-vpt", "qadapter-sequence-vqt")},
             # Fused features strong enough to decide the words: ADEM-VL's defaults barely move a tiny LM's captions.
             "ademvl-loud": {"method": "ademvl", "scale": 1.0, "visual_scale": 1.0}}


@pytest.mark.parametrize("row", list(BEAM_ROWS), ids=list(BEAM_ROWS))
def test_beams_caption_each_clip_as_it_would_alone(row, bench):
    """Off its zero start, a method under beam search captions a batch of clips as it captions each alone."""
    torch.manual_seed(0)
    captioner = bench.build()
    apply_adapter(captioner, adapter_config_from_mapping(BEAM_ROWS[row]))
    with torch.no_grad():
        for parameter in captioner.adapter_modules.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    captioner.eval()
    # Target clips all get one caption from these bases, which would hide a row read from the wrong
    # clip; a clip, black, white and noise get two or three on the GPT-2 pairs (the random Qwen2
    # LM captions nearly anything alike).
    clip = bench.frames[0]
    clips = torch.stack([clip, torch.zeros_like(clip), torch.full_like(clip, 255),
                         torch.randint(0, 256, clip.shape, dtype=clip.dtype, generator=torch.Generator().manual_seed(0))])
    batched = captioner.generate(clips, max_new_tokens=NEW_TOKENS, num_beams=3)
    assert batched == [captioner.generate(one[None], max_new_tokens=NEW_TOKENS, num_beams=3)[0] for one in clips]


def hooks(captioner: Captioner) -> dict[str, tuple[int, int]]:
    return {name: (len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in captioner.named_modules()}


@pytest.mark.parametrize("row", list(TABLE), ids=list(TABLE))
def test_removing_an_adapter_gives_back_the_base(row, bench):
    """After ``remove_adapter`` no hook, layer or module of the method is left, and the outputs are the base's exactly."""
    config = adapter_config_from_mapping(TABLE[row])
    torch.manual_seed(0)
    captioner = bench.build()
    # HF adds inert output-capturing hooks to a tower the first time hidden states are asked of it (ADEM-VL asks).
    captioner.vision(pixel_values=torch.zeros(1, 3, captioner.image_size, captioner.image_size), output_hidden_states=True)
    base_hooks, base_modules = hooks(captioner), list(captioner.state_dict())
    apply_adapter(captioner, config)
    with torch.no_grad():  # away from any zero init, so that what the method adds shows in the outputs
        for name, parameter in captioner.named_parameters():
            if name.startswith("adapter_modules.") or "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    adds_something = config.method not in ("frozen", "full")
    assert (hooks(captioner) != base_hooks or len(captioner.adapter_modules) > 0) == adds_something
    assert (not torch.equal(bench.loss_and_logits(captioner)[0], bench.base_loss)) == adds_something

    captioner.remove_adapter(config.method)
    assert hooks(captioner) == base_hooks and list(captioner.state_dict()) == base_modules
    assert not captioner.adapters and not captioner.adapter_modules
    loss, logits = bench.loss_and_logits(captioner)
    assert torch.equal(loss, bench.base_loss) and torch.equal(logits, bench.base_logits)
    assert captioner.generate(bench.frames, max_new_tokens=NEW_TOKENS) == bench.base_captions


def loss_and_gradients(captioner: Captioner, visual, token_ids, token_mask, clip_of_row):
    """One train-mode forward and backward; the same dropout masks on every call."""
    captioner.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = captioner(visual, token_ids, token_mask, clip_of_row)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in captioner.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("row", list(TABLE), ids=list(TABLE))
def test_frozen_prefix_reuse_gives_the_loss_and_gradients_of_the_whole_tower(row, bench, tmp_path):
    """Reuse where it applies, for every method: loss and gradients as the whole tower gives them, the prefix run once.

    The stored states are rounded once to 16 bits (fp16 for an fp32 run), so the exact
    reference is the whole tower with that one rounding at depth L; the plain fp32 tower is
    also compared, to the tolerance that rounding leaves. Rows that cannot reuse say why.
    """
    config = adapter_config_from_mapping(TABLE[row])
    run = RunConfig.from_yaml(DEMO_CONFIG)
    run.adapter, run.data.cache_dir = config, str(tmp_path / "cache")
    torch.manual_seed(0)
    captioner = bench.build()
    apply_adapter(captioner, config)
    expected = FROZEN_LAYERS[row](captioner.dims.vision_layers)
    depth, why = reuse_depth(captioner, run)
    assert depth == expected, why
    if not depth:
        assert why.startswith(f"not applicable: {config.method} ")
        return

    rows = torch.tensor(CLIP_OF_ROW)
    token_ids, token_mask = bench.token_ids[rows], bench.token_mask[rows]
    states, dtype = prefix_states(captioner, MappedRows(bench.frames.numpy()), "bench", depth, run, progress=False)
    assert dtype == STORAGE_DTYPES[run.train.precision] == torch.float16
    images = []
    counter = captioner.vision.embeddings.register_forward_hook(lambda _m, args, _o: images.append(len(args[0])))
    captioner.train()

    plain_loss, plain_grads = loss_and_gradients(captioner, bench.frames, token_ids, token_mask, rows)
    rounding = captioner.encoder_layers[depth - 1].register_forward_hook(
        lambda _layer, _args, output: output.to(dtype).to(output.dtype))
    rounded_loss, rounded_grads = loss_and_gradients(captioner, bench.frames, token_ids, token_mask, rows)
    rounding.remove()
    assert images == [CLIPS * bench.num_frames] * 2  # the encoder ran once per clip, not once per caption row
    captioner.prefix_depth = depth
    reuse_loss, reuse_grads = loss_and_gradients(captioner, MappedRows(states, view=dtype)[:], token_ids, token_mask,
                                                 rows)
    assert len(images) == 2  # with reuse the prefix never ran: its states came from the cache
    counter.remove()

    assert reuse_grads.keys() == rounded_grads.keys() and reuse_grads
    torch.testing.assert_close(reuse_loss, rounded_loss, rtol=1e-6, atol=1e-7)
    for name, gradient in reuse_grads.items():
        torch.testing.assert_close(gradient, rounded_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Against the unrounded tower: fp16 keeps 11 significant bits of each state. Measured on the
    # four towers: loss within 1.6e-5, every gradient within 3.3e-4 of its norm.
    torch.testing.assert_close(reuse_loss, plain_loss, rtol=1e-4, atol=0)
    for name, gradient in reuse_grads.items():
        assert (gradient - plain_grads[name]).norm() <= 2e-3 * plain_grads[name].norm(), name
