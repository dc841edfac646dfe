"""The budget-aware sampler: its closed-form expected improvement, what it proposes, and that it resumes from storage."""

from __future__ import annotations

import math
import pickle

import numpy as np
import optuna
import pytest
from optuna.trial import FixedTrial
from qstudy.study.budget import BudgetSampler, config_key, expected_improvement
from qstudy.study.space import SampledConfig, SpaceSampler, load_space
from servers import SPACES
from shapes import tiny_dims

optuna.logging.set_verbosity(optuna.logging.WARNING)
REFERENCE = (6.0, 0.0)  # (log10 count, CIDEr)
POOL = 400  # configs drawn for a test's pool: enough to hold every arm's, at a fraction of a study's cost


def staircase(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Hypervolume of (x minimised, y maximised) points against ``reference``, by brute force on a fine grid."""
    xs = np.linspace(0.0, reference[0], 601)[:, None]
    ys = np.linspace(reference[1], 20.0, 801)[None, :]
    covered = np.zeros((xs.size, ys.size), dtype=bool)
    for x, y in points:
        covered |= (xs >= x) & (ys <= y)
    return covered.mean() * reference[0] * (20.0 - reference[1])


@pytest.mark.parametrize("front, x, mean, sd", [
    ([], 4.5, 8.0, 1.0),  # nothing yet: the whole box below its CIDEr
    ([(4.5, 8.0)], 4.0, 7.0, 2.0),  # cheaper and likely worse: a strip beside the point
    ([(4.5, 8.0)], 5.0, 9.0, 1.5),  # dearer: only above the point counts
    ([(4.0, 5.0), (4.5, 8.0), (5.5, 10.0)], 4.2, 8.5, 1.0),  # between steps of a front
    ([(4.0, 5.0), (4.5, 8.0)], 5.8, 3.0, 0.5),  # dominated almost surely: near zero
])
def test_expected_improvement_is_the_mean_improvement_over_draws_of_cider(front, x, mean, sd):
    draws = np.random.default_rng(0).normal(mean, sd, 400)
    before = staircase(front, REFERENCE)
    sampled = np.mean([staircase([*front, (x, y)], REFERENCE) - before for y in draws])
    exact = expected_improvement(np.array([x]), np.array([mean]), np.array([sd]), front, REFERENCE)[0]
    grid = REFERENCE[0] / 600 * 20.0  # one grid column's area at full height bounds the brute force's error
    assert exact == pytest.approx(sampled, abs=0.05 * sampled + grid)


def every_method_space(budget: int | None = None):
    space = load_space(SPACES / "every_method_tiny.yaml", dims=tiny_dims())
    space.parameter_budget = budget
    return space


# A hand-made task whose front is known: Q-Adapter scores high only as a sigmoid-gated side
# block near one learning rate, and then rises with its size; LoRA peaks at the same rate;
# every other arm is dominated. One pooled config in nine has Q-Adapter's good choices.
def hand_made_cider(sampled: SampledConfig) -> float:
    off_rate = abs(math.log10(sampled.values.get("train.learning_rate", 0.002) / 0.002))
    if sampled.method == "qadapter":
        adapter = sampled.run_config.adapter
        return (4.0 + 4.0 * (adapter.placement == "side") + 2.0 * (adapter.gating == "sigmoid") - 3.0 * off_rate
                + 2.0 * (math.log10(sampled.trainable_params) - 4.4))
    if sampled.method == "lora":
        return 6.0 - 2.0 * off_rate
    return {"frozen": 3.0, "full": 6.0}.get(sampled.method, 4.0)


def hypervolume_after(sampler: BudgetSampler, trials: int) -> float:
    """The hypervolume of the hand-made task's scores of the first ``trials`` configs ``sampler`` proposes."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    points = []
    for _ in range(trials):
        trial = study.ask()
        sampled = SampledConfig.from_tune_config(SpaceSampler(sampler.space)(trial))
        points.append((math.log10(sampled.trainable_params), hand_made_cider(sampled)))
        study.tell(trial, [points[-1][1], sampled.trainable_params])
    return staircase(points, REFERENCE)


def test_on_a_known_front_it_proposes_front_improving_configs_first():
    """After one config per arm, 15 guided proposals come close to the front of every pooled config; as many
    pooled configs at random do not."""
    space = every_method_space()
    guided = BudgetSampler(space, seed=0, pool_draws=POOL)
    known = []
    for candidate in guided.pool():
        sampled = SampledConfig.from_tune_config(SpaceSampler(space)(FixedTrial(candidate.params)))
        known.append((math.log10(sampled.trainable_params), hand_made_cider(sampled)))
    front = staircase(known, REFERENCE)
    at_random = BudgetSampler(space, seed=0, pool_draws=POOL, startup_trials=10**6)  # never leaves its random start-up
    reached, by_chance = hypervolume_after(guided, 24) / front, hypervolume_after(at_random, 24) / front
    assert reached >= 0.85 and reached > by_chance, (reached, by_chance)


def test_over_budget_configs_are_never_proposed():
    space = every_method_space(budget=40_000)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=BudgetSampler(space, seed=1, pool_draws=POOL))
    methods = set()
    for _ in range(12):
        trial = study.ask()
        sampled = SampledConfig.from_tune_config(SpaceSampler(space)(trial))
        assert sampled.trainable_params <= 40_000, sampled
        methods.add(sampled.method)
        study.tell(trial, [hand_made_cider(sampled), sampled.trainable_params])
    # every arm with a config within the budget was tried; full fine-tuning (and ADEM-VL, Hyperformer) never
    assert methods == {"qadapter", "frozen", "lora", "bottleneck", "compacter", "prompt_tuning"}


def test_a_running_config_is_never_proposed_again():
    """Trials asked and not yet told (running, as under Tune's concurrency): every one a different config."""
    space = every_method_space()
    space.arms = [space.arm("frozen"), space.arm("prompt_tuning")]  # 1 + 6 configs in all
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=BudgetSampler(space, seed=0, pool_draws=POOL))
    running = []
    for _ in range(7):
        running.append(study.ask())
        SpaceSampler(space)(running[-1])
    assert len({config_key(trial.params) for trial in running}) == 7


def test_a_resumed_sampler_proposes_what_the_first_would_have(tmp_path):
    """Everything it conditions on is in the study's storage, and its pool is rebuilt from the seed."""
    space, storage = every_method_space(), f"sqlite:///{tmp_path / 'optuna.db'}"
    first = BudgetSampler(space, seed=3, pool_draws=POOL)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=first, storage=storage, study_name="s")
    for _ in range(12):
        trial = study.ask()
        sampled = SampledConfig.from_tune_config(SpaceSampler(space)(trial))
        study.tell(trial, [hand_made_cider(sampled), sampled.trainable_params])
    resumed = pickle.loads(pickle.dumps(first))  # as Tune restores the searcher
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    proposal = resumed.propose(trials, {}, len(trials))
    assert proposal == first.propose(trials, {}, len(trials))
    assert proposal.key not in {config_key(trial.params) for trial in trials}
