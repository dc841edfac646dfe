"""Record the per-epoch val CIDEr curves of configs sampled from the tiny every-method space: the table the replay benchmark reads.

Usage:
    OMP_NUM_THREADS=1 python bench/record_curves.py --shard 0/2 & OMP_NUM_THREADS=1 python bench/record_curves.py --shard 1/2
    OMP_NUM_THREADS=1 python bench/record_curves.py --configs qadapter=20 lora=8 --seeds 3

Configs are drawn per method (seeded, Optuna's random sampler through the study's own
``SpaceSampler``) from ``search_spaces/every_method_tiny.yaml``, so the replay searches the same
space the table came from. Each is trained for real at ``--seeds`` training seeds (``train.seed``:
the adapter's initialisation and the data order), one after the other in this process
(``train/recipe.py::run`` on the tiny workspace, every epoch evaluated): the replay draws one of
them, so a searcher meets the noise a real study does. The table is rewritten after each
training: a stopped recording keeps what it finished and a rerun skips those; ``--shard K/N``
splits the plan between processes that append to one table under a file lock. Needs
$QSTUDY_HOME prepared (`qstudy base` and `qstudy data`, or `qstudy demo`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "every_method_tiny.yaml"
DEFAULT_OUT = REPO / "bench" / "data" / "tiny_curves.json"
# Configs per method: the most where the space is largest (Q-Adapter's readings, LoRA's ranks and
# targets), one where it has a single config.
CONFIGS = {"qadapter": 10, "lora": 5, "bottleneck": 3, "prompt_tuning": 3, "compacter": 2, "hyperformer": 2,
           "ademvl": 2, "full": 2, "frozen": 1}


def sample_configs(space, method: str, count: int, seed: int) -> list[dict]:
    """Up to ``count`` distinct configs of ``method``'s arm drawn by Optuna's random sampler (seeded) through the study's sampler.

    The arm's first searched choice (Q-Adapter's placement, LoRA's rank) takes its values in
    turn, so a few configs still cover each of them.
    """
    import itertools

    import optuna

    from qstudy.study.space import SampledConfig, SpaceSampler, encode

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler, seen, configs = SpaceSampler(space), set(), []
    first = next((param for param in space.arm(method).params if len(param.choices) > 1), None)
    turns = itertools.cycle(first.choices if first else [None])
    for _ in range(count * 20):  # small categorical arms repeat: draw until enough distinct ones
        fixed = {"method": method} | ({f"{method}.{first.key}": encode(next(turns))} if first else {})
        study.enqueue_trial(fixed)
        sampled = SampledConfig.from_tune_config(sampler(study.ask()))
        key = json.dumps(sampled.values, sort_keys=True)
        if key not in seen:
            seen.add(key)
            configs.append({"method": method, "values": sampled.values, "trainable_params": sampled.trainable_params})
        if len(configs) == count:
            break
    return configs


def round_robin(per_method: list[list[dict]]) -> list[dict]:
    """One config of each method in turn, so a partial recording holds every method."""
    plan = []
    for turn in range(max(map(len, per_method), default=0)):
        plan += [configs[turn] for configs in per_method if turn < len(configs)]
    return plan


def workspace() -> dict:
    """What the curves were trained on: the base's build spec and a digest of its weights and of the target data."""
    import hashlib

    from qstudy.cli import tiny_base_dir
    from qstudy.core.paths import qstudy_home

    base, data = tiny_base_dir(), qstudy_home() / "data" / "target"
    files = sorted(base.glob("*/*.safetensors")) + [base / "projector.safetensors", data / "annotations.json",
                                                     *sorted((data / "videos").glob("*.mp4"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return {"base_spec": json.loads((base / "base.json").read_text())["spec"],
            "sha256_base_and_target_data": digest.hexdigest()[:16]}


def provenance(args) -> dict:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python "
                       + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), no GPU",
            "space": str(SPACE.relative_to(REPO)),
            "sampler": f"optuna RandomSampler(seed={args.seed}) through qstudy.study.space.SpaceSampler",
            "workspace": workspace()}


def record(space, config: dict, output_dir: Path) -> dict:
    """Train ``config`` for real at its ``seed``; its curves, one entry per epoch."""
    from qstudy.train.recipe import run

    run_config = space.run_config(config["method"], config["values"])
    run_config.train.seed = config["seed"]
    run_config.output_dir = str(output_dir)
    started = time.perf_counter()
    result = run(run_config, progress=False)
    return {**config, "trainable_params": result.trainable_params,
            "cider": [round(epoch.val["cider"], 4) for epoch in result.epochs],
            "train_loss": [round(epoch.train_loss, 4) for epoch in result.epochs],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=[], metavar="METHOD=N",
                        help=f"configs of a method (default: {' '.join(f'{m}={n}' for m, n in CONFIGS.items())})")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per config (train.seed 0, 1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="the config sampler's seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="record trainings K, K+N, K+2N, ... of the plan (N processes filling one table)")
    args = parser.parse_args()

    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.study.space import load_space

    quiet_weight_loading()
    space = load_space(SPACE)
    counts = {**CONFIGS, **{method: int(n) for method, _, n in (item.partition("=") for item in args.configs)}}
    configs = round_robin([sample_configs(space, arm.method, counts.get(arm.method, 0), args.seed) for arm in space.arms])
    plan = [{**config, "seed": seed} for config in configs for seed in range(args.seeds)]

    shard, shards = (int(part) for part in args.shard.split("/"))
    session = provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for index, config in enumerate(plan):
            if index % shards != shard or _key(config) in {_key(c) for c in _read(args.out)["configs"]}:
                continue
            row = record(space, config, Path(scratch) / str(index))
            with FileLock(f"{args.out}.lock"):  # shards append to one table: re-read it under the lock
                table = _read(args.out)
                table["epochs"] = space.base["train"]["epochs"]
                if session not in table["provenance"]:
                    table["provenance"].append(session)
                table["configs"].append(row)
                partial = args.out.with_suffix(".tmp")
                partial.write_text(json.dumps(table, indent=1))
                partial.replace(args.out)  # whole or not at all: a kill mid-write keeps the last table
            print(f"[{len(table['configs'])}/{len(plan)}] {row['method']} {row['values']} seed {row['seed']} params "
                  f"{row['trainable_params']} CIDEr {' '.join(f'{c:.2f}' for c in row['cider'])}  {row['seconds']:.0f} s",
                  flush=True)


def _key(config: dict) -> str:
    return json.dumps([config["method"], config["values"], config["seed"]], sort_keys=True)


def _read(path: Path) -> dict:
    """The table so far; ``provenance`` lists every recording session that added to it."""
    if not path.exists():
        return {"provenance": [], "configs": []}
    table = json.loads(path.read_text())
    if isinstance(table["provenance"], dict):
        table["provenance"] = [table["provenance"]]
    return table


if __name__ == "__main__":
    main()
