"""A trained trial's model rebuilt from its run config and its adapter weights, exactly as it was after training.

The one loader of trained weights: ``qstudy caption`` reads an exported directory through it,
``qstudy evaluate`` a trial's MLflow artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qstudy.config import RunConfig
from qstudy.core.errors import QstudyError

if TYPE_CHECKING:
    from qstudy.model.captioner import Captioner


class WeightsMismatch(QstudyError):
    """Trained weights that are not a readable safetensors file, or do not fit the model of their run config."""


def load_trained(config: RunConfig, weights_path: Path) -> "Captioner":
    """The base of ``config`` with its adapter and the trained weights in ``weights_path``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qstudy.methods.inject import apply_adapter
    from qstudy.model.captioner import Captioner
    from qstudy.train.device import precision_dtype, select_device

    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    apply_adapter(captioner, config.adapter)
    # The trial trained (and so captioned) in its precision; bf16 weights in an fp32 model would not match.
    captioner.to(precision_dtype(config.train.precision))
    try:
        weights = load_file(weights_path)
    except (OSError, SafetensorError) as error:
        raise WeightsMismatch(f"{weights_path}: not a readable safetensors file ({error})") from None
    trainable = {name for name, parameter in captioner.named_parameters() if parameter.requires_grad}
    if set(weights) != trainable:
        missing, unexpected = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise WeightsMismatch(f"{weights_path} does not fit {config.adapter.method}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = dict(captioner.named_parameters())
    wrong = [name for name, tensor in weights.items() if tensor.shape != shapes[name].shape]
    if wrong:
        name = wrong[0]
        raise WeightsMismatch(f"{weights_path} does not fit its config.yaml: {name} is {tuple(weights[name].shape)} "
                              f"in the file, {tuple(shapes[name].shape)} in the model")
    captioner.load_state_dict(weights, strict=False)
    return captioner.to(select_device()).eval()
