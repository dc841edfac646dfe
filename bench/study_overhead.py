"""P2: platform overhead of a study: N tiny trials under Tune + Optuna + MLflow vs the same N runs called directly.

Usage:
    python bench/study_overhead.py                 # 4 trials, both trial paths, then the direct runs
    python bench/study_overhead.py --trials 6 --epochs 2

The study runs one trial at a time (concurrency 1) so that its wall time compares with the
same runs called one after another in this process (``recipe.run``, no Ray, no MLflow). Two
studies are timed side by side, with identical configs (random sampler, same seed): the
in-actor path qstudy uses for single-worker trials, and Ray's stock Train-V2-in-Tune pattern
(a ``TorchTrainer`` per trial, ``force_trainer``). Where the time goes, per trial:
``run`` is the training function itself (model build, decode, train, eval), ``in trial``
adds what the trial does around it (MLflow child run, config and weights artifacts,
checkpoints reported to Tune), ``between trials`` is Tune's scheduling, actor or worker-group
start and the trainer's controller. Needs the tiny workspace in $QSTUDY_HOME (built if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "qadapter_tiny.yaml"


def tiny_space(directory: Path, trials: int, epochs: int) -> Path:
    space = yaml.safe_load(SPACE.read_text())
    space["overrides"].update({"train.epochs": epochs, "train.max_steps_per_epoch": 10, "train.batch_size": 16,
                               "data.max_val_clips": 32, "eval.max_new_tokens": 12})
    space.update(trials=trials, concurrency=1, sampler="random", seed=0)
    path = directory / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def time_study(space: Path, home: Path, name: str, force_trainer: bool) -> dict:
    from qstudy.study.tuner import StudyOptions, run_study
    from ray.tune import ExperimentAnalysis

    started_at, started = time.time(), time.perf_counter()
    summary = run_study(StudyOptions(space_path=space, home=home, name=name, force_trainer=force_trainer, verbose=0))
    wall = time.perf_counter() - started
    assert summary.count("FINISHED") == len(summary.records), f"{name}: not every trial finished"
    trials = []
    for trial in sorted(ExperimentAnalysis(str(summary.study_dir / "tune")).trials, key=lambda t: t.trial_id):
        metrics = json.loads((summary.study_dir / "trials" / trial.trial_id / "metrics.json").read_text())
        result = trial.last_result  # Tune's timestamp has 1 s resolution
        trials.append({"in_trial": result["time_total_s"], "run": metrics["wall_seconds"], "pid": result["pid"],
                       "start": result["timestamp"] - result["time_total_s"] - started_at,
                       "config": metrics["config"]})
    trials.sort(key=lambda trial: trial["start"])
    return {"wall": wall, "trials": trials}


def time_direct(configs: list[dict], directory: Path) -> float:
    from qstudy.config import RunConfig
    from qstudy.train.recipe import run

    started = time.perf_counter()
    for index, data in enumerate(configs):
        config = RunConfig.from_dict(data)
        config.output_dir = str(directory / f"direct-{index}")
        run(config, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from qstudy.cli import prepare_tiny_workspace
    from qstudy.core.paths import qstudy_home
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    workspace = qstudy_home()
    prepare_tiny_workspace(workspace)
    with tempfile.TemporaryDirectory(prefix="qstudy-bench-") as scratch:
        home = Path(scratch)
        for name in ("data", "base"):
            (home / name).symlink_to(workspace / name)
        space = tiny_space(home, args.trials, args.epochs)
        started = time.perf_counter()
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        results = {"in-actor": time_study(space, home, "in-actor", force_trainer=False),
                   "TorchTrainer": time_study(space, home, "torch-trainer", force_trainer=True)}
        ray.shutdown()
        direct = time_direct([trial["config"] for trial in results["in-actor"]["trials"]], home)

    n = args.trials
    print(f"\n{n} tiny trials ({args.epochs} epochs x 10 steps, 32 val clips), one at a time; "
          f"ray.init {ray_start:.1f} s (not counted)")
    print(f"direct: {n} x recipe.run in one process: {direct:.1f} s ({direct / n:.1f} s per run)")
    print(f"{'path':<13} {'study s':>8} {'/direct':>8} {'overhead/trial':>15} {'startup':>8} {'run':>6} "
          f"{'in trial':>9} {'between':>8} {'warm overhead/trial':>20}")
    for path, r in results.items():
        trials = r["trials"]
        contained = sum(trial["run"] for trial in trials)
        startup = trials[0]["start"]
        extra = [trial["in_trial"] - trial["run"] for trial in trials]
        between = (r["wall"] - startup - sum(trial["in_trial"] for trial in trials)) / n
        warm = statistics.median(extra[1:] or extra) + between
        print(f"{path:<13} {r['wall']:8.1f} {r['wall'] / direct:8.2f} {(r['wall'] - contained) / n:13.1f} s "
              f"{startup:7.1f}s {contained / n:5.1f}s {statistics.mean(extra):8.1f}s {between:7.1f}s {warm:18.1f} s")
        print(f"{'':<13} per trial (in trial / run, s): "
              + ", ".join(f"{t['in_trial']:.1f}/{t['run']:.1f}" for t in trials)
              + f"; trial processes: {len({t['pid'] for t in trials})}")
    print("overhead/trial = (study wall - the training it contains) / trials; startup = study start to the first "
          "trial's start (validation, MLflow, Optuna, the first actor); run = recipe.run inside a trial; in trial = "
          "the trial's own work around it (MLflow, reports, checkpoints; the first trial's cold imports); between = "
          "the rest per trial (scheduling, actor or worker-group start, the trial's final MLflow delivery, summary); "
          "warm overhead/trial = a later trial's in-trial extra + between")


if __name__ == "__main__":
    main()
