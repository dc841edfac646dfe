"""The two floors any adapter must clear on a dataset: *blind* (caption prior only) and *frozen* (projector only).

A method that cannot beat the blind floor is not using the video at all: it is full
fine-tuning with every frame blanked, so all it can learn is which captions are likely. The
frozen floor trains only the projector on the pretrained base: an adapter inside the vision
encoder earns its parameters only if it beats that.
"""

from __future__ import annotations

import copy

from qstudy.config import RunConfig

FLOORS = ("blind", "frozen")


def floor_config(config: RunConfig, floor: str) -> RunConfig:
    """``config`` with its adapter replaced by the named floor's (same data, training and seed)."""
    if floor not in FLOORS:
        raise ValueError(f"unknown floor {floor!r} (one of {FLOORS})")
    data = copy.deepcopy(config.to_dict())
    data["adapter"] = {"method": "full" if floor == "blind" else "frozen"}
    data["data"]["blind"] = floor == "blind"
    return RunConfig.from_dict(data)
