"""The new methods' building blocks do what their papers say: Kronecker sums, adaptive fusion, sharing, one CLS token."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from qstudy.methods import adapter_config_from_mapping
from qstudy.methods.ademvl.modules import MultiscaleFusion
from qstudy.methods.bottleneck.modules import BottleneckAdapters
from qstudy.methods.compacter.modules import LowRankPHM
from qstudy.methods.qadapter.modules import Gate, PromptAttention, ReadOutQueries
from qstudy.core.errors import ConfigError
from qstudy.core.dims import is_norm_module
from shapes import tiny_dims


def test_lphm_weight_is_a_sum_of_kronecker_products():
    torch.manual_seed(0)
    layer = LowRankPHM(12, 8, phm_dim=4, rank=2, zero_init=False)
    rule = torch.randn(4, 4, 4)
    blocks = layer.left @ layer.right
    weight = sum(torch.kron(rule[i], blocks[i]) for i in range(4))
    inputs = torch.randn(3, 12)
    torch.testing.assert_close(layer(inputs, rule), inputs @ weight + layer.bias)


def test_lphm_up_projection_starts_at_zero_but_still_learns():
    layer = LowRankPHM(8, 12, phm_dim=4, rank=1, zero_init=True)
    rule = torch.randn(4, 4, 4)
    output = layer(torch.randn(3, 8), rule)
    assert torch.equal(output, torch.zeros_like(output))
    output.sum().backward()
    assert layer.right.grad.abs().sum() > 0


@pytest.mark.parametrize(("sharing", "downs", "ups"), [("none", 6, 6), ("single", 1, 1), ("half", 1, 6)])
def test_bottleneck_sharing_reuses_the_projections(sharing, downs, ups):
    adapters = BottleneckAdapters(hidden=16, bottleneck=4, positions=6, sharing=sharing)
    assert (len(adapters.down), len(adapters.up)) == (downs, ups)
    for up in adapters.up:
        torch.nn.init.normal_(up.weight)
    inputs = torch.randn(2, 16)
    outputs = [adapters(inputs, position) for position in range(6)]
    assert torch.equal(outputs[0], outputs[5]) == (sharing == "single")


def fusion(drop_ratio: float) -> MultiscaleFusion:
    torch.manual_seed(0)
    module = MultiscaleFusion(vision_hidden=8, lm_hidden=6, grid=4, pool_strides=[1, 2], num_frames=2,
                              projection_hidden=5, scale=0.1, visual_scale=1.0, drop_ratio=drop_ratio)
    torch.nn.init.normal_(module.value_embedding)
    return module


def test_fusion_reads_the_patch_grid_and_its_pooled_grid_of_every_frame():
    module = fusion(0.0)
    visual = module.features(torch.randn(3 * 2, 1 + 16, 8))  # 3 clips x 2 frames, CLS + 4x4 patches
    assert visual.shape == (3, 2 * (16 + 4), 6)


def test_adaptive_fusion_drops_each_tokens_lowest_scores():
    module = fusion(0.25)
    visual = module.features(torch.randn(2, 1 + 16, 8))
    text = torch.randn(1, 5, 6)
    scores = F.silu(text) @ F.silu(visual + module.key_embedding).transpose(1, 2)  # (1, 5, 40)
    kept = scores.argsort(dim=-1)[..., 10:]  # 25% of 40 visual tokens dropped per text token
    mask = torch.zeros_like(scores).scatter(-1, kept, 1.0)
    expected = 0.1 * (scores * mask) @ (visual + module.value_embedding)
    torch.testing.assert_close(module(text, visual), expected)
    assert not torch.allclose(module(text, visual), 0.1 * scores @ (visual + module.value_embedding))


def test_fusion_refuses_features_of_other_rows():
    """Each text row needs its own V: the caller selects and repeats them (captions per clip, beams)."""
    module = fusion(0.1)
    visual = module.features(torch.randn(2 * 2, 17, 8))  # 2 clips
    with pytest.raises(ValueError, match="6 text rows but V for 2"):
        module(torch.randn(6, 1, 6), visual)


@pytest.mark.parametrize(("mapping", "field"), [
    ({"method": "bottleneck", "reduction_factor": 256}, "adapter.reduction_factor"),
    ({"method": "bottleneck", "sharing": "all"}, "adapter.sharing"),
    ({"method": "compacter", "phm_dim": 3}, "adapter.phm_dim"),
    ({"method": "compacter", "target": "vision", "reduction_factor": 32}, "adapter.phm_dim"),  # bottleneck 2
    ({"method": "hyperformer", "embedding_dim": 0}, "adapter.embedding_dim"),
    ({"method": "prompt_tuning", "prompt_length": 0}, "adapter.prompt_length"),
    ({"method": "prompt_tuning", "mid_dim": 0}, "adapter.mid_dim"),
    ({"method": "ademvl", "pool_strides": [3]}, "adapter.pool_strides"),
    ({"method": "ademvl", "drop_ratio": 1.0}, "adapter.drop_ratio"),
    ({"method": "ademvl", "vision_adapter_dim": -1}, "adapter.vision_adapter_dim"),
    ({"method": "qadapter", "gating": "per_head"}, "adapter.gating"),  # placement side has no heads
    ({"method": "qadapter", "placement": "gated_attention", "queries_to_lm": True}, "adapter.queries_to_lm"),
    ({"method": "qadapter", "placement": "sideways"}, "adapter.placement"),
    ({"method": "qadapter", "placement": "sequence", "sequence_mode": "vqt"}, "adapter.queries_to_lm"),
])
def test_bad_hyperparameters_fail_naming_the_field(mapping, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        adapter_config_from_mapping(mapping).validate(tiny_dims())


def test_ademvl_closed_form_counts_the_per_frame_visual_embeddings():
    config = adapter_config_from_mapping({"method": "ademvl", "vision_adapter_dim": 0, "pool_strides": [1, 2]})
    tiny = tiny_dims()  # CLIP 64 wide, 32 px frames in 8 px patches (a 4x4 grid, 2x2 pooled); GPT-2 128 wide
    projection = 64 * 128 + 128 + 128 * 128 + 128
    assert config.extra_trainable(tiny) == projection + 2 * tiny.num_frames * (16 + 4) * 128


@pytest.mark.parametrize(("name", "is_norm"), [
    ("encoder.layers.0.layer_norm1", True), ("pre_layrnorm", True), ("post_layernorm", True),
    ("transformer.h.1.ln_2", True), ("transformer.ln_f", True), ("model.layers.3.input_layernorm", True),
    ("model.norm", True), ("transformer.h.0.attn.c_attn", False), ("encoder.layers.0.mlp.fc1", False),
])
def test_norm_modules_are_found_by_name_across_families(name, is_norm):
    assert is_norm_module(name) == is_norm


def test_gated_attention_adds_each_heads_attention_over_the_prompts_through_the_frozen_projections():
    """LLaMA-Adapter's zero-init attention, written out per head: softmax(q_h k_h^T / sqrt(d)) v_h over the prompts alone."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    torch.manual_seed(0)
    attention = CLIPAttention(CLIPVisionConfig(hidden_size=16, num_attention_heads=4))
    block = PromptAttention(16, 4, num_prompts=3, gating="per_head")
    tokens = torch.randn(2, 5, 16)
    assert torch.equal(block(tokens, attention), torch.zeros(2, 5, 16))  # zero-init gates: the base's attention
    with torch.no_grad():
        block.gate.value.copy_(torch.tensor([[1.0], [0.0], [-2.0], [0.5]]))
    expected = torch.zeros(2, 5, 16)
    for head, gate in enumerate([1.0, 0.0, -2.0, 0.5]):
        rows = slice(4 * head, 4 * head + 4)
        q = F.linear(tokens, attention.q_proj.weight[rows], attention.q_proj.bias[rows])
        k = F.linear(block.prompts, attention.k_proj.weight[rows], attention.k_proj.bias[rows])
        v = F.linear(block.prompts, attention.v_proj.weight[rows], attention.v_proj.bias[rows])
        expected += gate * torch.softmax(q @ k.T / 2.0, dim=-1) @ v @ attention.out_proj.weight[:, rows].T
    torch.testing.assert_close(block(tokens, attention), expected)


def test_the_token_gate_reads_each_tokens_input():
    gate = Gate("token", 4)
    update, inputs = torch.ones(1, 2, 4), torch.tensor([[[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]])
    assert torch.equal(gate(update, inputs), torch.full((1, 2, 4), 0.5))  # zero-init: one half everywhere
    with torch.no_grad():
        gate.value.weight[0, 0] = 3.0
    torch.testing.assert_close(gate(update, inputs)[0, :, 0], torch.sigmoid(torch.tensor([3.0, -3.0])))


def test_vqt_queries_are_the_layers_outputs_for_them_with_keys_and_values_from_the_original_tokens_alone():
    """VQT written as a mask: the layer's own forward on [tokens; queries], no row attending to a query."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4)
    config._attn_implementation = "eager"
    layer = CLIPEncoderLayer(config).eval()
    queries = ReadOutQueries(16, num_queries=3)
    tokens = torch.randn(2, 5, 16)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 5:] = float("-inf")
    joint = layer(torch.cat([tokens, queries.queries.expand(2, -1, -1)], dim=1), mask)
    joint = joint[0] if isinstance(joint, tuple) else joint
    torch.testing.assert_close(queries(tokens, layer), joint[:, 5:])
