"""Linear probes on the vision side's output: what the frozen base's readers lose on the target domain, and what Q-Adapter restores.

Usage:
    python bench/encoder_probe.py                    # trains the tiny preset's Q-Adapter run (seed 0) first
    python bench/encoder_probe.py --base-seed 1      # the same on the base built with seed 1
    python bench/encoder_probe.py --adapted RUN_DIR  # probes a finished run's output directory instead

Logistic-regression probes, one per attribute, scored on val clips, over two feature sets
that are both what the LM is given:
- ``frames``: every frame's tokens (pooled + grid), all frames side by side: what the
  trainable projector maps, token by token, into the LM;
- ``clip``: the frozen temporal merger's clip token: the only place where frames meet
  before the LM, frozen in every method but full fine-tuning.
Two questions per model: *is it there* (probe fitted on the same model's target train
clips) and *is it where the base reads it* (probe fitted on the base's source train clips,
as every frozen reader downstream of the encoder was). Needs the tiny workspace
($QSTUDY_HOME; `qstudy demo` or `qstudy base` prepares it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

PROBE_SEED = 0


def features(captioner, frames) -> dict[str, np.ndarray]:
    """Both feature sets for a stack of uint8 clips, in batches."""
    import torch

    out: dict[str, list[np.ndarray]] = {"frames": [], "clip": []}
    with torch.no_grad():
        for start in range(0, len(frames), 64):
            tokens = captioner.visual_tokens(frames[start:start + 64])
            out["frames"].append(tokens.flatten(1).numpy())
            out["clip"].append(captioner.projector.clip_token(tokens)[:, 0].numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def probe_accuracy(train_x, train_y, val_x, val_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=PROBE_SEED))
    return float(probe.fit(train_x, train_y).score(val_x, val_y))


def labels(annotations: Path, clips) -> dict[str, list[str]]:
    from qstudy.data.synthetic import ATTRIBUTES

    videos = {video["video_id"]: video for video in json.loads(Path(annotations).read_text())["videos"]}
    return {attribute: [videos[clip.video_id][attribute] for clip in clips] for attribute in ATTRIBUTES}


def split_features(captioner, data, split: str) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """(features by set, labels by attribute) of one split."""
    from qstudy.train.recipe import load_split

    decoded = load_split(data, split, captioner.image_size, progress=False)
    return features(captioner, decoded.frames), labels(data.annotations, decoded.clips)


def probe_rows(fit: tuple, score: tuple) -> dict[str, dict[str, float]]:
    """{feature set: {attribute: accuracy}} of probes fitted on ``fit`` and scored on ``score``."""
    (fit_x, fit_y), (score_x, score_y) = fit, score
    return {kind: {attribute: probe_accuracy(fit_x[kind], fit_y[attribute], score_x[kind], score_y[attribute])
                   for attribute in fit_y}
            for kind in fit_x}


def main() -> None:
    import dataclasses

    import torch

    from qstudy.cli import DEMO_CONFIG, tiny_base_dir
    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.config import RunConfig
    from qstudy.export import load_trained
    from qstudy.train.pretrain import BaseSpec, pretrain_base
    from qstudy.model.captioner import Captioner
    from qstudy.train.recipe import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapted", type=Path, help="output directory of a finished Q-Adapter run")
    parser.add_argument("--base-seed", type=int, default=0, help="the tiny base of this seed (built if missing)")
    args = parser.parse_args()
    quiet_weight_loading()
    torch.set_num_threads(1)

    config = RunConfig.from_yaml(DEMO_CONFIG)
    base_dir = tiny_base_dir(args.base_seed)
    built = pretrain_base(base_dir, BaseSpec(seed=args.base_seed))
    config.model.vision_encoder, config.model.language_model = built.vision_encoder, built.language_model
    config.model.projector = built.projector
    with tempfile.TemporaryDirectory() as tmp:
        adapted_dir = args.adapted
        if adapted_dir is None:
            config.output_dir = adapted_dir = str(Path(tmp) / "qadapter")
            config.eval.meteor = False
            run(config, progress=False)
        adapted_config = RunConfig.from_dict(json.loads((Path(adapted_dir) / "metrics.json").read_text())["config"])
        base = Captioner.from_pretrained(config.model, config.data.num_frames).eval()
        source = dataclasses.replace(config.data, annotations=str(base_dir / "source-data" / "annotations.json"),
                                     video_dir=str(base_dir / "source-data" / "videos"))
        adapted = load_trained(adapted_config, Path(adapted_dir) / "adapter.safetensors")
        splits = {"train": config.data.train_split, "val": config.data.val_split}
        base_source = {key: split_features(base, source, split) for key, split in splits.items()}
        base_target = {key: split_features(base, config.data, split) for key, split in splits.items()}
        adapted_target = {key: split_features(adapted, config.data, split) for key, split in splits.items()}
    rows = {
        ("base, source clips", "source"): probe_rows(base_source["train"], base_source["val"]),
        ("base, target clips", "target"): probe_rows(base_target["train"], base_target["val"]),
        ("base, target clips", "base's source"): probe_rows(base_source["train"], base_target["val"]),
        ("Q-Adapter, target clips", "target"): probe_rows(adapted_target["train"], adapted_target["val"]),
        ("Q-Adapter, target clips", "base's source"): probe_rows(base_source["train"], adapted_target["val"]),
    }
    print("| model, val clips | probe fitted on | features | colour | shape | direction |")
    print("|---|---|---|---:|---:|---:|")
    for (name, fitted), by_kind in rows.items():
        for kind, scores in by_kind.items():
            print(f"| {name} | {fitted} | {kind} | {scores['colour']:.2f} | {scores['shape']:.2f} | "
                  f"{scores['direction']:.2f} |")


if __name__ == "__main__":
    main()
