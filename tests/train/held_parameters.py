"""One rank of a torchrun run of ``qstudy train CONFIG OUT``: trains, and writes ``OUT/rank-<r>.json``.

The file holds what the rank held when the engine took its model, by part (``captioner``,
``lm``): ``held``, the bytes of the parameters the rank has, and ``whole``, the model's. A rank that
had built the whole model shows it there, before any engine could partition it. Measured
here, not by qstudy's own code, so that the check holds whatever qstudy reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from qstudy.cli import main
from qstudy.train import recipe


def held_and_whole(module: torch.nn.Module) -> dict[str, int]:
    held = whole = 0
    for parameter in module.parameters():
        size = parameter.element_size()
        # ZeRO-3 leaves a partitioned parameter's own tensor empty; its shard is ds_tensor, its shape ds_numel.
        held += (parameter.ds_tensor.numel() if hasattr(parameter, "ds_tensor") else parameter.numel()) * size
        whole += getattr(parameter, "ds_numel", parameter.numel()) * size
    return {"held": held, "whole": whole}


def measured(make_engine, out: Path):
    def make_engine_after_measuring(captioner, *args, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        parts = {"captioner": held_and_whole(captioner), "lm": held_and_whole(captioner.lm)}
        (out / f"rank-{rank}.json").write_text(json.dumps(parts))
        return make_engine(captioner, *args, **kwargs)

    return make_engine_after_measuring


if __name__ == "__main__":
    config, out = sys.argv[1], Path(sys.argv[2])
    recipe.make_engine = measured(recipe.make_engine, out)
    sys.exit(main(["train", config]))
