"""Record the per-epoch val CIDEr curves of configs sampled from the tiny search spaces: the table the replay benchmark reads.

Usage:
    OMP_NUM_THREADS=1 python bench/record_curves.py                      # 40 Q-Adapter + 8 baseline configs
    OMP_NUM_THREADS=1 python bench/record_curves.py --qadapter 48 --baselines 16
    OMP_NUM_THREADS=1 python bench/record_curves.py --shard 1/2 & OMP_NUM_THREADS=1 python bench/record_curves.py --shard 0/2

Configs are drawn (seeded, Optuna's random sampler through the study's own ``SpaceSampler``)
from ``search_spaces/qadapter_tiny.yaml`` and ``search_spaces/baselines.yaml``, so the replay
searches the same space the table came from. Each is trained for real, one after the other in
this process (``train/recipe.py::run`` on the tiny workspace, every epoch evaluated), and the
table is rewritten after each config: a stopped recording keeps what it finished and a rerun
skips those; ``--shard K/N`` splits the plan between processes that append to one table under a
file lock. Needs $QSTUDY_HOME prepared (`qstudy demo` or `qstudy base`).
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
SPACES = {"qadapter": REPO / "search_spaces" / "qadapter_tiny.yaml",
          "baselines": REPO / "search_spaces" / "baselines.yaml"}
DEFAULT_OUT = REPO / "bench" / "data" / "tiny_curves.json"


def sample_configs(space, count: int, seed: int) -> list[dict]:
    """``count`` distinct configs of ``space`` drawn by Optuna's random sampler (seeded) through the study's sampler."""
    import optuna

    from qstudy.study.space import SampledConfig, SpaceSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler, seen, configs = SpaceSampler(space), set(), []
    for _ in range(count * 20):  # small categorical arms (frozen) repeat: draw until enough distinct ones
        sampled = SampledConfig.from_tune_config(sampler(study.ask()))
        key = json.dumps([sampled.method, sampled.values], sort_keys=True)
        if key not in seen:
            seen.add(key)
            configs.append({"method": sampled.method, "values": sampled.values,
                            "trainable_params": sampled.trainable_params})
        if len(configs) == count:
            break
    return configs


def interleave(first: list, second: list) -> list:
    """``first`` with ``second`` spread through it, so a partial recording holds some of both."""
    if not second:
        return list(first)
    every = max(1, len(first) // len(second))
    merged, rest = [], list(second)
    for index, item in enumerate(first):
        if index % every == 0 and rest:
            merged.append(rest.pop(0))
        merged.append(item)
    return merged + rest


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
            "spaces": {name: str(path.relative_to(REPO)) for name, path in SPACES.items()},
            "sampler": f"optuna RandomSampler(seed={args.seed}) through qstudy.study.space.SpaceSampler",
            "workspace": workspace()}


def record(space, config: dict, output_dir: Path) -> dict:
    """Train ``config`` for real; its curves, one entry per epoch."""
    from qstudy.train.recipe import run

    run_config = space.run_config(config["method"], config["values"])
    run_config.output_dir = str(output_dir)
    started = time.perf_counter()
    result = run(run_config, progress=False)
    return {**config, "trainable_params": result.trainable_params,
            "cider": [round(epoch.val["cider"], 4) for epoch in result.epochs],
            "train_loss": [round(epoch.train_loss, 4) for epoch in result.epochs],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qadapter", type=int, default=40, help="Q-Adapter configs")
    parser.add_argument("--baselines", type=int, default=8, help="baseline configs (full, frozen, LoRA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="record configs K, K+N, K+2N, ... of the plan (N processes filling one table)")
    args = parser.parse_args()

    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.study.space import load_space

    quiet_weight_loading()
    spaces = {name: load_space(path) for name, path in SPACES.items()}
    epochs = {space.base["train"]["epochs"] for space in spaces.values()}
    if len(epochs) != 1:
        raise SystemExit(f"the spaces train for different numbers of epochs: {sorted(epochs)}")
    plan = interleave([("qadapter", c) for c in sample_configs(spaces["qadapter"], args.qadapter, args.seed)],
                      [("baselines", c) for c in sample_configs(spaces["baselines"], args.baselines, args.seed)])

    shard, shards = (int(part) for part in args.shard.split("/"))
    session = provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for index, (space_name, config) in enumerate(plan):
            if index % shards != shard or _key(config) in {_key(c) for c in _read(args.out)["configs"]}:
                continue
            row = {"space": space_name, **record(spaces[space_name], config, Path(scratch) / str(index))}
            with FileLock(f"{args.out}.lock"):  # shards append to one table: re-read it under the lock
                table = _read(args.out)
                table["epochs"] = next(iter(epochs))
                if session not in table["provenance"]:
                    table["provenance"].append(session)
                table["configs"].append(row)
                partial = args.out.with_suffix(".tmp")
                partial.write_text(json.dumps(table, indent=1))
                partial.replace(args.out)  # whole or not at all: a kill mid-write keeps the last table
            print(f"[{len(table['configs'])}/{len(plan)}] {row['method']} {row['values']} params {row['trainable_params']} "
                  f"CIDEr {' '.join(f'{c:.2f}' for c in row['cider'])}  {row['seconds']:.0f} s", flush=True)


def _key(config: dict) -> str:
    return json.dumps([config["method"], config["values"]], sort_keys=True)


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
