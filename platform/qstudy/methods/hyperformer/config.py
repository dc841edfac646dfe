"""Hyperformer (Karimi Mahabadi et al. 2021; as an arm of VL-Adapter): adapter weights from a hypernetwork.

Hyperformer++'s form: one hypernetwork per tower; for each adapter position it embeds
[task; layer id; position (after attention | after FFN)], maps that through a two-layer
task projector to a source embedding, and linear generators turn the source into the
adapter's down/up weights and biases. Only the hypernetwork trains, so its size, not the
number of layers, sets the cost. Our platform trains one task, so there is one learned task
embedding (with several tasks there would be one per task). Unlike the original we do not
generate the adapters' layer norms (our adapters have none); the towers' own LayerNorms
train with ``unfreeze_layer_norms`` as for the other residual adapters. The up generators
start at zero, so every generated adapter starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

from qstudy.methods.bottleneck.config import ResidualAdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


@dataclass
class HyperformerConfig(ResidualAdapterConfig):
    """Hypernetwork sizes: the embeddings' width and the task projector's hidden width."""

    method = "hyperformer"

    embedding_dim: int = 16
    projector_hidden: int = 32

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        if self.embedding_dim < 1 or self.projector_hidden < 1:
            raise ConfigError(f"adapter.embedding_dim, adapter.projector_hidden: {self.embedding_dim}, "
                              f"{self.projector_hidden} must be >= 1")

    def tower_params(self, hidden: int, bottleneck: int, layers: int) -> int:
        e, h = self.embedding_dim, self.projector_hidden
        embeddings = e * (1 + layers + 2)  # task, one per layer, one per position kind
        projector = 3 * e * h + h + h * e + e
        generators = (e + 1) * (2 * bottleneck * hidden + bottleneck + hidden)
        return embeddings + projector + generators
