"""P1: train-step time and peak memory of every registered method, side by side, as ratios to full FT.

Usage:
    python bench/step_cost.py                     # tiny preset, then paper scale (CLIP ViT-B/16 + GPT-2 124M)
    python bench/step_cost.py --presets tiny --steps 20
    python bench/step_cost.py --table-only        # paper-scale trainable share, GPT-2 124M and Qwen2-0.5B LMs, no training
    python bench/step_cost.py --methods full qadapter qadapter-gated_attention   # some rows only

A row is a registered method at its defaults, or one of Q-Adapter's other placements
(``QADAPTER_READINGS``) at the defaults otherwise.

Each (preset, method) runs in a fresh subprocess so that its peak RSS is its own. Memory is
reported two ways: the process's peak RSS while training (model included), and the training increment (that peak minus
RSS once the model is built), which is what PEFT saves: gradients, optimiser state and the
activations kept for backward. The step's forward pass is timed apart: every method pays all of
it, so it bounds how far below full fine-tuning a method's step can go. Models are random
weights from config classes: no download.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (frames, batch). "tiny" is the tiny preset's own model; "paper" is CLIP ViT-B/16 + GPT-2 124M.
PRESETS = {"tiny": (4, 32), "paper": (8, 2)}
# Q-Adapter's placements other than its default side block, each as its paper sets it up.
QADAPTER_READINGS = {
    "qadapter-gated_attention": {"method": "qadapter", "placement": "gated_attention", "gating": "per_head"},
    "qadapter-sequence-vpt": {"method": "qadapter", "placement": "sequence"},
    "qadapter-sequence-vqt": {"method": "qadapter", "placement": "sequence", "sequence_mode": "vqt",
                              "queries_to_lm": True},
}


def row_config(row: str):
    """A row's adapter config: a method's defaults, or one of ``QADAPTER_READINGS``."""
    from qstudy.methods import adapter_config_from_mapping

    return adapter_config_from_mapping(QADAPTER_READINGS.get(row, {"method": row}))


def paper_towers() -> tuple[tuple, dict[str, tuple]]:
    """Paper scale as (model class, config): CLIP ViT-B/16, and the LMs by name (GPT-2 124M, a Qwen2-0.5B shape)."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel, Qwen2Config,
                              Qwen2ForCausalLM)

    vision = (CLIPVisionModel, CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, image_size=224, patch_size=16))
    lms = {
        "GPT-2 124M": (GPT2LMHeadModel, GPT2Config(n_embd=768, n_layer=12, n_head=12)),
        "Qwen2-0.5B": (Qwen2ForCausalLM, Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                                      num_key_value_heads=2, intermediate_size=4864,
                                                      vocab_size=151936, tie_word_embeddings=True)),
    }
    return vision, lms


def build_models(preset: str, directory: Path):
    """Random-weight towers from config classes, saved in HF format; returns their ModelConfig."""
    from qstudy.config import ModelConfig
    from qstudy.data.synthetic import caption_vocabulary
    from qstudy.model.tiny import build_tiny, build_tokenizer

    if preset == "tiny":
        return build_tiny(directory, caption_vocabulary())
    (vision_class, vision_config), lms = paper_towers()
    lm_class, lm_config = lms["GPT-2 124M"]
    vision_class(vision_config).save_pretrained(directory / "vision")
    lm_class(lm_config).save_pretrained(directory / "lm")
    build_tokenizer(caption_vocabulary()).save_pretrained(directory / "lm")
    return ModelConfig(vision_encoder=str(directory / "vision"), language_model=str(directory / "lm"))


def measure(preset: str, directory: Path, row: str, steps: int) -> dict:
    """Runs inside the subprocess: build, adapt, time ``steps`` optimiser steps after two warm-ups."""
    import torch

    from qstudy.methods.inject import apply_adapter, count_parameters
    from qstudy.config import ModelConfig, TrainConfig
    from qstudy.train.pretrain import BaseSpec
    from qstudy.model.captioner import Captioner
    from qstudy.train.engine import make_engine

    frames, batch = PRESETS[preset]
    torch.manual_seed(0)
    tiny = preset == "tiny"
    # As the tiny base is built (eager attention, a clip-token merger); paper scale is plain LLaVA-style.
    model = ModelConfig(vision_encoder=str(directory / "vision"), language_model=str(directory / "lm"),
                        attn_implementation="eager" if tiny else None,
                        temporal_merger_rank=BaseSpec().temporal_merger_rank if tiny else 0)
    captioner = Captioner.from_pretrained(model, frames)
    trainable = apply_adapter(captioner, row_config(row))
    engine = make_engine(captioner, trainable, TrainConfig(batch_size=batch), total_steps=steps + 2)
    size = captioner.image_size
    video = torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8)
    token_ids, token_mask = captioner.tokenize(["a blue square moves left across the screen"] * batch)
    built_rss = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak below is training's own
    captioner.train()
    forward = 0.0  # every method pays the whole forward pass; only backward and the update shrink
    for step in range(steps + 2):
        if step == 2:
            started, forward = time.perf_counter(), 0.0
        begun = time.perf_counter()
        loss = engine.model(video, token_ids, token_mask)
        forward += time.perf_counter() - begun
        engine.step(loss)
    seconds = (time.perf_counter() - started) / steps
    trainable_params, total_params = count_parameters(captioner)
    return {"method": row, "step_seconds": seconds, "forward_seconds": forward / steps, "peak_rss_mb": _rss_mb(),
            "train_memory_mb": _rss_mb() - built_rss, "trainable": trainable_params, "total": total_params}


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MB.

    Not getrusage's ru_maxrss: Linux carries it across exec from the forking parent, so every
    worker would report the (larger) parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def share_table(methods: list[str]) -> str:
    """Trainable count and share at paper scale for each paper LM, from the closed-form counts."""
    from qstudy.core.dims import ModelDims

    vision, lms = paper_towers()
    vision_config, vision_shapes = _meta_shapes(*vision)
    dims = {}
    for name, lm in lms.items():
        lm_config, lm_shapes = _meta_shapes(*lm)
        dims[name] = ModelDims.from_configs(vision_config, lm_config, vision_shapes, lm_shapes, PRESETS["paper"][0])
    header = "| method | " + " | ".join(f"trainable ({name}) | share" for name in dims) + " |"
    rows = [header, "|---|" + "---:|---:|" * len(dims)]
    for method in methods:
        counts = [(row_config(method).count_trainable(d), d.total_params) for d in dims.values()]
        rows.append(f"| {method} | " + " | ".join(f"{n:,} | {100 * n / total:.2f}%" for n, total in counts) + " |")
    totals = ", ".join(f"{name} LM ({d.lm_params:,}; total {d.total_params:,})" for name, d in dims.items())
    return (f"Paper scale: CLIP ViT-B/16 vision ({next(iter(dims.values())).vision_params:,}) + {totals}, "
            f"8 frames; default hyperparameters of each method\n" + "\n".join(rows))


def _meta_shapes(model_class, config) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(config dict, parameter shapes) of a model instantiated on the meta device: no memory, no init.

    Its named parameters are what ``save_pretrained`` writes (tied weights once, no buffers),
    so the closed forms see the shapes a saved checkpoint's header would give.
    """
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return config.to_dict(), {name: tuple(p.shape) for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"], choices=list(PRESETS))
    parser.add_argument("--methods", nargs="+", default=None,
                        help="rows: registered methods or QADAPTER_READINGS names (default: all of them)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("PRESET", "DIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], Path(args.worker[1]), args.worker[2], args.steps)))
        return

    from qstudy.methods import ADAPTERS

    methods = args.methods or [*sorted(ADAPTERS, key=lambda m: m != "full"), *QADAPTER_READINGS]  # full first: the anchor
    print(share_table(methods), "\n")
    if args.table_only:
        return
    for preset in args.presets:
        frames, batch = PRESETS[preset]
        with tempfile.TemporaryDirectory() as tmp:
            build_models(preset, Path(tmp))  # once, here: the workers' peak RSS must not include building
            results = []
            for method in methods:
                output = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", preset, tmp,
                                         method], capture_output=True, text=True, check=True).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
        anchor = next(r for r in results if r["method"] == "full")
        print(f"Preset {preset}: {frames} frames, batch {batch}, {args.steps} timed steps each, CPU fp32")
        print("| method | trainable | step s | of which forward s | time vs full | peak RSS MB | vs full | train mem MB | "
              "vs full |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['method']} | {r['trainable']:,} | {r['step_seconds']:.3f} | {r['forward_seconds']:.3f} | "
                  f"{r['step_seconds'] / anchor['step_seconds']:.2f}x | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] / anchor['peak_rss_mb']:.2f}x | {r['train_memory_mb']:.0f} | "
                  f"{r['train_memory_mb'] / max(anchor['train_memory_mb'], 1e-9):.2f}x |")
        print()


if __name__ == "__main__":
    main()
