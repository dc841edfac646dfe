"""The adapters' torch modules and the hook that splices a module into a vision encoder layer.

Method configs stay torch-free (the sampler counts parameters without torch); their
``inject`` imports the modules they need from here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Gate(nn.Module):
    """Scales an adapter's update: none (1), tanh of a zero-init scalar, or per-channel sigmoid."""

    def __init__(self, kind: str, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "tanh":
            self.value = nn.Parameter(torch.zeros(1))
        elif kind == "sigmoid":
            self.value = nn.Parameter(torch.zeros(hidden))
        elif kind != "none":
            raise ValueError(f"unknown gating {kind!r}")

    def forward(self, update: torch.Tensor) -> torch.Tensor:
        if self.kind == "tanh":
            return torch.tanh(self.value) * update
        if self.kind == "sigmoid":
            return torch.sigmoid(self.value) * update
        return update


class QueryAdapter(nn.Module):
    """Q-Adapter block: K queries summarise the layer's tokens in rank r; the tokens read it back.

    tokens (B, N, D) -> down (B, N, r) -> queries attend to them: summary (B, K, r) ->
    tokens attend to the summary (B, N, r) -> up (B, N, D) -> gated residual update.
    """

    def __init__(self, hidden: int, rank: int, num_query_tokens: int, gating: str):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.queries = nn.Parameter(torch.randn(num_query_tokens, rank) * rank**-0.5)
        self.up = nn.Linear(rank, hidden)
        self.gate = Gate(gating, hidden)
        if gating != "tanh":
            # Without a zero-init gate, a zero-init up-projection makes the block start as identity.
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> (updated tokens (B, N, D), the queries' summary (B, K, r))."""
        tokens = self.down(hidden_states)
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        summary = F.scaled_dot_product_attention(queries, tokens, tokens)
        readback = F.scaled_dot_product_attention(tokens, summary, summary)
        return hidden_states + self.gate(self.up(readback)), summary

    def query_tokens(self, summary: torch.Tensor) -> torch.Tensor:
        """A forward's query summary in the encoder's width: extra visual tokens (B, K, D)."""
        return self.up(summary)


def after_layer(layer: nn.Module, module) -> torch.utils.hooks.RemovableHandle:
    """Apply ``module`` (hidden states -> hidden states) to ``layer``'s output hidden states (a tensor, or the first of a tuple)."""

    def hook(_layer, _args, output):
        if isinstance(output, tuple):
            return (module(output[0]),) + output[1:]
        return module(output)

    return layer.register_forward_hook(hook)


# Sublayer names across model families: CLIP/SigLIP/Llama call attention ``self_attn``, GPT-2 ``attn``.
ATTENTION_NAMES = ("self_attn", "attn", "attention")
FEED_FORWARD_NAMES = ("mlp", "feed_forward")


def sublayer(block: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """The child of a transformer block called one of ``names`` (its attention or feed-forward)."""
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(f"{type(block).__name__} has none of the sublayers {names}")


def beside_sublayer(layer: nn.Module, branch) -> torch.utils.hooks.RemovableHandle:
    """Add ``branch(input)`` to ``layer``'s output: a branch parallel to it on the same (normed) input."""

    def hook(_layer, args, output):
        return output + branch(args[0])

    return layer.register_forward_hook(hook)


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class BottleneckAdapters(nn.Module):
    """Houlsby adapters of one tower: ``x + up(gelu(down(x)))`` at each position, optionally shared.

    ``sharing``: none (own down/up per position), single (one adapter at every position), half
    (one shared down-projection, own up-projection per position). Up-projections start at zero.
    """

    def __init__(self, hidden: int, bottleneck: int, positions: int, sharing: str):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(hidden, bottleneck) for _ in range(positions if sharing == "none" else 1))
        self.up = nn.ModuleList(_zero_linear(bottleneck, hidden) for _ in range(1 if sharing == "single" else positions))

    def forward(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        down = self.down[position % len(self.down)]
        up = self.up[position % len(self.up)]
        return hidden_states + up(F.gelu(down(hidden_states)))


class LowRankPHM(nn.Module):
    """LPHM layer (Compacter): ``W = sum_i A_i kron (s_i t_i^T)``; the rule A is passed in (shared).

    Factors are scaled so W starts with the variance of a fan-in initialised dense layer;
    ``zero_init`` zeroes t (the up-projection's), so the layer starts at exactly zero.
    """

    def __init__(self, in_features: int, out_features: int, phm_dim: int, rank: int, zero_init: bool):
        super().__init__()
        self.left = nn.Parameter(torch.randn(phm_dim, in_features // phm_dim, rank))
        right_shape = (phm_dim, rank, out_features // phm_dim)
        self.right = nn.Parameter(torch.zeros(right_shape) if zero_init
                                  else torch.randn(right_shape) * (in_features * rank) ** -0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, inputs: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        blocks = self.left @ self.right  # (n, in/n, out/n)
        n, rows, cols = blocks.shape
        # sum_i kron(A_i, B_i)[a * rows + b, c * cols + d] = sum_i A_i[a, c] B_i[b, d]
        weight = torch.einsum("iac,ibd->abcd", rule, blocks).reshape(n * rows, n * cols)
        return inputs @ weight + self.bias


class CompacterAdapters(nn.Module):
    """Compacter adapters of one tower: LPHM down/up per position around a GELU; one shared rule A."""

    def __init__(self, hidden: int, bottleneck: int, positions: int, phm_dim: int, rank: int):
        super().__init__()
        self.rule = nn.Parameter(torch.randn(phm_dim, phm_dim, phm_dim) * phm_dim**-0.5)
        self.down = nn.ModuleList(LowRankPHM(hidden, bottleneck, phm_dim, rank, False) for _ in range(positions))
        self.up = nn.ModuleList(LowRankPHM(bottleneck, hidden, phm_dim, rank, True) for _ in range(positions))

    def forward(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        bottleneck = F.gelu(self.down[position](hidden_states, self.rule))
        return hidden_states + self.up[position](bottleneck, self.rule)


class HyperAdapters(nn.Module):
    """Hyperformer++ for one tower: a hypernetwork generates each position's adapter weights.

    Position p = 2 * layer + (0 after attention, 1 after the feed-forward block). Its source
    embedding is ``task_projector([task; layer embedding; position embedding])``; linear
    generators map it to the adapter's down/up weights and biases. The up generators start at
    zero, so every generated adapter starts as the identity.
    """

    def __init__(self, hidden: int, bottleneck: int, num_layers: int, embedding_dim: int, projector_hidden: int):
        super().__init__()
        self.hidden, self.bottleneck = hidden, bottleneck
        self.task_embedding = nn.Parameter(torch.randn(embedding_dim))
        self.layer_embedding = nn.Parameter(torch.randn(num_layers, embedding_dim))
        self.position_embedding = nn.Parameter(torch.randn(2, embedding_dim))
        self.task_projector = nn.Sequential(nn.Linear(3 * embedding_dim, projector_hidden), nn.ReLU(),
                                            nn.Linear(projector_hidden, embedding_dim))
        self.down_weight = nn.Linear(embedding_dim, bottleneck * hidden)
        self.down_bias = nn.Linear(embedding_dim, bottleneck)
        # Generated down weights of about a fan-in initialised layer's scale.
        nn.init.normal_(self.down_weight.weight, std=(embedding_dim * hidden) ** -0.5)
        nn.init.zeros_(self.down_weight.bias)
        self.up_weight = _zero_linear(embedding_dim, hidden * bottleneck)
        self.up_bias = _zero_linear(embedding_dim, hidden)

    def forward(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        layer, kind = divmod(position, 2)
        source = self.task_projector(torch.cat([self.task_embedding, self.layer_embedding[layer],
                                                self.position_embedding[kind]]))
        down = self.down_weight(source).view(self.bottleneck, self.hidden)
        up = self.up_weight(source).view(self.hidden, self.bottleneck)
        bottleneck = F.gelu(F.linear(hidden_states, down, self.down_bias(source)))
        return hidden_states + F.linear(bottleneck, up, self.up_bias(source))


class PromptEncoder(nn.Module):
    """Prompt tuning: learnable vectors prepended to the LM's input, optionally through an MLP.

    With ``mid_dim`` the prompts are ``Linear(mid_dim -> hidden)(tanh(Linear(hidden -> mid_dim)(P)))``,
    VL-Adapter's reparametrisation (it steadies training); without, P itself is the prompt.
    """

    def __init__(self, prompt_length: int, hidden: int, mid_dim: int | None, init_std: float):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(prompt_length, hidden) * init_std)
        self.reparametrisation = (nn.Sequential(nn.Linear(hidden, mid_dim), nn.Tanh(), nn.Linear(mid_dim, hidden))
                                  if mid_dim else None)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.prompts if self.reparametrisation is None else self.reparametrisation(self.prompts)
        prompts = prompts.to(inputs.dtype).expand(inputs.shape[0], -1, -1)
        ones = torch.ones(mask.shape[0], prompts.shape[1], dtype=mask.dtype, device=mask.device)
        return torch.cat([prompts, inputs], dim=1), torch.cat([ones, mask], dim=1)


class ParallelAdapter(nn.Module):
    """ADEM-VL's vision-side adapter: ``scale * fc2(dropout(gelu(fc1(x))))`` beside a block's MLP; fc2 starts at zero."""

    def __init__(self, hidden: int, dim: int, scale: float, dropout: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(hidden, dim, bias=False)
        self.fc2 = nn.Linear(dim, hidden, bias=False)
        nn.init.zeros_(self.fc2.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.dropout(F.gelu(self.fc1(hidden_states))))


class MultiscaleFusion(nn.Module):
    """ADEM-VL's parameter-free cross-attention from the LM's tokens onto multiscale visual features.

    ``features`` turns a frame batch's penultimate-layer tokens into V (batch, frames * tokens,
    lm_hidden): the patch grid and its average-pooled coarser grids, concatenated, through a
    SiLU MLP, times ``visual_scale``. ``forward(x, V)`` returns ``scale * A @ (V + e2)`` with
    ``A = silu(x) @ silu(V + e1)^T``, each text token's lowest ``drop_ratio`` share of scores
    set to zero. e1 and e2 are learned per visual token position (frame and grid cell).
    """

    def __init__(self, vision_hidden: int, lm_hidden: int, grid: int, pool_strides: list[int], num_frames: int,
                 projection_hidden: int, scale: float, visual_scale: float, drop_ratio: float):
        super().__init__()
        self.grid, self.pool_strides, self.num_frames = grid, pool_strides, num_frames
        self.scale, self.visual_scale, self.drop_ratio = scale, visual_scale, drop_ratio
        self.visual_projection = nn.Sequential(nn.Linear(vision_hidden, projection_hidden), nn.SiLU(),
                                               nn.Linear(projection_hidden, lm_hidden))
        for linear in (self.visual_projection[0], self.visual_projection[2]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        tokens = num_frames * sum((grid // stride) ** 2 for stride in pool_strides)
        self.key_embedding = nn.Parameter(torch.randn(tokens, lm_hidden) * 0.02)  # e1
        self.value_embedding = nn.Parameter(torch.zeros(tokens, lm_hidden))  # e2

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch * frames, tokens, vision_hidden), already normed -> V (batch, frames * tokens, lm_hidden)."""
        patches = hidden_states[:, -self.grid**2:]  # CLIP puts its CLS first; SigLIP has none
        grid = patches.transpose(1, 2).unflatten(2, (self.grid, self.grid))
        scales = [grid if stride == 1 else F.avg_pool2d(grid, stride) for stride in self.pool_strides]
        multiscale = torch.cat([scale.flatten(2) for scale in scales], dim=2).transpose(1, 2)
        visual = self.visual_projection(multiscale) * self.visual_scale
        return visual.reshape(-1, self.num_frames * visual.shape[1], visual.shape[2])

    def forward(self, normed: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Text tokens (rows, tokens, lm_hidden) and each row's V (rows, visual tokens, lm_hidden) -> the update."""
        if visual.shape[0] != normed.shape[0]:
            raise ValueError(f"fusion: {normed.shape[0]} text rows but V for {visual.shape[0]}")
        scores = F.silu(normed) @ F.silu(visual + self.key_embedding).transpose(1, 2)
        drop = int(self.drop_ratio * scores.shape[-1])
        if drop > 0:
            threshold = scores.kthvalue(drop + 1, dim=-1, keepdim=True).values
            scores = scores * (scores >= threshold)
        return self.scale * (scores @ (visual + self.value_embedding))
