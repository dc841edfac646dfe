"""Bytes of one epoch's checkpoint at paper scale: DeepSpeed's full checkpoint against the trainable-only one qstudy writes.

Usage:
    python bench/checkpoint_bytes.py                  # the Q-Adapter arm of search_spaces/qadapter.yaml, its engine
    python bench/checkpoint_bytes.py --zero-stage 3

The models are CLIP ViT-B/16 + GPT-2 124M with random weights from config classes (no
download; step_cost.py's towers), saved in HF format and loaded as a trial loads them. The
arm's smallest and largest adapters (in trainable parameters, over its ``adapter.*`` choices)
train one step under the space's train settings (DeepSpeed, its ZeRO stage and precision) on
one CPU rank, then the same engine saves twice, side by side: ``save_checkpoint`` as DeepSpeed
writes it by default (frozen base included: what qstudy saved before) and ``engine.save``
(trainable weights and their optimiser state only). Bytes are the checkpoint directory's files.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # step_cost's paper-scale towers

from step_cost import build_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "qadapter.yaml"
ARM = "qadapter"


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def arm_extremes(space) -> list[tuple[str, dict]]:
    """The arm's smallest and largest adapters in trainable parameters: ``(label, {dotted key: value})``."""
    params = [param for param in space.arm(ARM).params if param.key.startswith("adapter.")]
    points = [{p.key: v for p, v in zip(params, values)} for values in itertools.product(*(p.extremes() for p in params))]
    counted = sorted(points, key=lambda values: space.run_config(ARM, values).adapter.count_trainable(space.dims))
    return [("smallest", counted[0]), ("largest", counted[-1])]


def measure(space, values: dict, zero_stage: int, work: Path) -> dict:
    """Build, train one step, save both ways; the two checkpoints' bytes and the model's counts."""
    import torch

    from qstudy.methods.inject import apply_adapter, count_parameters
    from qstudy.model.captioner import Captioner
    from qstudy.train.engine import make_engine, parameter_bytes, partitioned_build

    config = space.run_config(ARM, values)
    train = replace(config.train, zero_stage=zero_stage)
    torch.manual_seed(0)
    with partitioned_build(train):
        captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
        trainable = apply_adapter(captioner, config.adapter)
        trainable_params, total_params = count_parameters(captioner)
        engine = make_engine(captioner, trainable, train, total_steps=1)
        _, model_bytes = parameter_bytes(captioner)  # in the engine's dtype
        size = captioner.image_size
        video = torch.randint(0, 256, (1, config.data.num_frames, size, size, 3), dtype=torch.uint8)
        token_ids, token_mask = captioner.tokenize(["a man is playing a guitar on a stage"] * 2)
        engine.step(engine.model(video, token_ids, token_mask, torch.tensor([0, 0])))
        # What engine.save wrote before it left the frozen base out: DeepSpeed's default checkpoint.
        engine.model.save_checkpoint(str(work / "full"), tag="engine", client_state={"epoch": 0})
        engine.save(work / "trainable", {"epoch": 0})
    return {"values": values, "trainable": trainable_params, "total": total_params,
            "model_bytes": model_bytes, "full": directory_bytes(work / "full"),
            "trainable_only": directory_bytes(work / "trainable")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=None,
                        help="default: the space's train.zero_stage")
    args = parser.parse_args()

    from qstudy.core.dims import ModelDims
    from qstudy.study.space import load_space
    from qstudy.train.engine import prepare_deepspeed_group

    os.environ.setdefault("QSTUDY_HOME", tempfile.mkdtemp())  # the space's data paths are not read here
    prepare_deepspeed_group()
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models("paper", Path(tmp) / "models")
        dims = ModelDims.from_pretrained(models.vision_encoder, models.language_model, 8)
        space = load_space(SPACE, dims=dims)
        space.base["model"].update(vision_encoder=models.vision_encoder, language_model=models.language_model,
                                   tokenizer=models.language_model)
        train = space.run_config(ARM, {}).train
        stage = args.zero_stage or train.zero_stage
        rows = []
        for label, values in arm_extremes(space):
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                rows.append((label, measure(space, values, stage, Path(work))))

    print(f"{datetime.date.today()}: {SPACE.relative_to(REPO)}, arm {ARM}; CLIP ViT-B/16 + GPT-2 124M (random weights), "
          f"{dims.num_frames} frames; DeepSpeed ZeRO-{stage}, {train.precision}, 1 CPU rank; one epoch's checkpoint")
    print("| adapter | trainable | of total | full checkpoint MB | trainable-only MB | full / trainable-only |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows:
        values = ", ".join(f"{key.removeprefix('adapter.')}={value}" for key, value in row["values"].items())
        print(f"| {label} ({values}) | {row['trainable']:,} | {100 * row['trainable'] / row['total']:.2f}% | "
              f"{row['full'] / 1e6:.1f} | {row['trainable_only'] / 1e6:.2f} | "
              f"{row['full'] / row['trainable_only']:.0f}x |")
    print(f"The model's parameters in {train.precision}: {rows[0][1]['model_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
