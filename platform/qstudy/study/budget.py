"""The budget-aware sampler: an Optuna sampler that knows one objective exactly and models only CIDEr.

A config's trainable-parameter count is known in closed form before it trains
(``SpaceSampler``); only its CIDEr costs a trial. So instead of modelling both objectives as
black boxes, this sampler:

1. draws a pool of configs from the space once (seeded, through the study's own
   ``SpaceSampler``: every arm, conditional keys included), each with its exact count, and
   drops those over ``parameter_budget``;
2. fits a Gaussian process (scikit-learn) to the CIDEr of the completed trials, on the
   configs' values (arms and choices one-hot, numbers scaled to [0, 1]) and log10 count;
3. proposes the pooled config of largest expected hypervolume improvement, in the plane of
   (log10 trainable parameters, CIDEr) that the study's Pareto analysis reads. With the count
   exact, the expectation over CIDEr alone has a closed form (:func:`expected_improvement`).

Running trials are pending points: each counts as reaching its predicted CIDEr (the kriging
believer), and no config that is running or was tried is proposed again, so concurrent
trials spread out. It first tries a random config of each arm that has one within the
budget, the arm with the cheapest config first (so the front's cheap end, where the
hypervolume's box starts, is known early), then random ones until ``STARTUP_TRIALS`` trials
have completed. Everything it conditions on is in the study's Optuna storage and the pool is
rebuilt from the seed, so a resumed study proposes what the first driver would have. Imports
no torch.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import norm

from qstudy.study.space import SampledConfig, SearchSpace, SpaceSampler

log = logging.getLogger(__name__)

POOL_DRAWS = 1000  # configs drawn for the pool; categorical arms repeat, so fewer remain
STARTUP_TRIALS = 3  # completed trials before the surrogate guides the search
REFERENCE_CIDER = 0.0  # the hypervolume's reference point: CIDEr 0 and 1.1x the largest count pooled
REFERENCE_COUNT_FACTOR = 1.1


@dataclass(frozen=True)
class Candidate:
    """One pooled config: Optuna's parameters (external values) and its exact trainable count."""

    params: dict[str, Any]
    trainable_params: int

    @property
    def key(self) -> str:
        return config_key(self.params)


def config_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def front_steps(points: list[tuple[float, float]], reference: tuple[float, float]) -> list[tuple[float, float, float]]:
    """The covered region of a front in (x minimised, y maximised), as CIDEr bands ``(low, high, x edge)``.

    A point ``(x, y)`` covers the box ``[x, x_ref] x [y_ref, y]``; in the band of heights
    ``(low, high]`` the union covers ``[edge, x_ref]``. Above the last band nothing is covered.
    """
    x_ref, y_ref = reference
    inside = sorted((y, x) for x, y in points if x < x_ref and y > y_ref)
    bands, low = [], y_ref
    for index, (y, _) in enumerate(inside):
        if y > low:
            bands.append((low, y, min(x for _, x in inside[index:])))
            low = y
    return bands


def expected_improvement(x: np.ndarray, mean: np.ndarray, sd: np.ndarray, points: list[tuple[float, float]],
                         reference: tuple[float, float]) -> np.ndarray:
    """Expected hypervolume improvement of candidates at exact ``x`` whose y is Normal(``mean``, ``sd``).

    A candidate at ``x`` adds, at height ``t``, the strip from ``x`` to the covered edge there
    (``x_ref`` above the front), so its improvement is ``integral of width(t) * P(Y > t) dt``; the
    width is constant in each band, and the integral of ``P(Y > t)`` over ``[a, b]`` is
    ``psi(a) - psi(b)`` with ``psi(c) = E[max(Y - c, 0)]``, in closed form for a normal Y.
    """
    x_ref, y_ref = reference
    sd = np.maximum(sd, 1e-9)

    def psi(c: float) -> np.ndarray:
        z = (c - mean) / sd
        return sd * norm.pdf(z) + (mean - c) * norm.sf(z)

    bands = front_steps(points, reference)
    top = bands[-1][1] if bands else y_ref
    improvement = np.maximum(x_ref - x, 0.0) * psi(top)  # above the front: the whole strip to x_ref
    for low, high, edge in bands:
        improvement += np.maximum(edge - x, 0.0) * (psi(low) - psi(high))
    return improvement


class BudgetSampler(BaseSampler):
    """Optuna sampler: expected hypervolume improvement over a pool of configs whose counts are exact.

    See the module docstring. ``space`` is the study's validated search space; ``seed`` fixes
    the pool, the random start-up and the surrogate's restarts.
    """

    def __init__(self, space: SearchSpace, seed: int = 0, pool_draws: int = POOL_DRAWS,
                 startup_trials: int = STARTUP_TRIALS):
        self.space, self.seed = space, seed
        self.pool_draws, self.startup_trials = pool_draws, startup_trials
        self._random = RandomSampler(seed=seed)
        self._pool: list[Candidate] | None = None
        self._distributions: dict[str, BaseDistribution] = {}
        # Built now, not at the first proposal, which Ray times (and warns about past a second).
        self.pool()

    def __getstate__(self) -> dict:
        # Tune pickles the searcher into its experiment state: the pool is rebuilt from the seed.
        return {**self.__dict__, "_pool": None, "_distributions": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pool()

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    # -- the pool ------------------------------------------------------------------------------

    def pool(self) -> list[Candidate]:
        """Distinct configs within the budget, drawn once through the study's ``SpaceSampler``."""
        if self._pool is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            draw = optuna.create_study(sampler=RandomSampler(seed=self.seed))
            sampler, pooled = SpaceSampler(self.space), {}
            for _ in range(self.pool_draws):
                trial = draw.ask()
                sampled = SampledConfig.from_tune_config(sampler(trial))
                self._distributions.update(trial.distributions)
                if not sampled.over_budget:
                    candidate = Candidate(dict(trial.params), sampled.trainable_params)
                    pooled.setdefault(candidate.key, candidate)
            if not pooled:
                raise ValueError(f"{self.space.path}: no config of the space is within parameter_budget")
            self._pool = list(pooled.values())
        return self._pool

    def reference(self) -> tuple[float, float]:
        return math.log10(REFERENCE_COUNT_FACTOR * max(c.trainable_params for c in self.pool())), REFERENCE_CIDER

    # -- Optuna's sampler interface --------------------------------------------------------------

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self.pool()
        return dict(self._distributions)

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        fixed = trial.system_attrs.get("fixed_params", {})  # the study's first trials fix the arm
        proposal = self.propose(study.get_trials(deepcopy=False), fixed, trial.number)
        return {} if proposal is None else {name: value for name, value in proposal.params.items() if name not in fixed}

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution):
        # Only when the pool holds no untried config that fits the trial's fixed parameters.
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- the proposal ----------------------------------------------------------------------------

    def propose(self, trials: list[FrozenTrial], fixed: dict[str, Any], number: int) -> Candidate | None:
        """The untried pooled config (agreeing with ``fixed``) to try next; None when none is left.

        First a random config of each arm not yet tried, cheapest arm first (an arm with no
        config within the budget is never tried), then random ones until ``startup_trials`` have
        completed, then the one of largest expected hypervolume improvement.
        """
        others = [trial for trial in trials if trial.number != number and trial.params]
        tried = {config_key(trial.params) for trial in others}
        open_ = [c for c in self.pool() if c.key not in tried
                 and all(c.params.get(name) == value for name, value in fixed.items())]
        if not open_:
            log.warning("the budget sampler has tried every pooled config that fits %s: sampling at random", fixed)
            return None
        rng = np.random.default_rng([self.seed, number])
        arms_tried = {_method(trial.params) for trial in others}
        first_of_arm = [c for c in open_ if _method(c.params) not in arms_tried]
        completed = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None and _feasible(t)]
        if first_of_arm:  # the arm whose cheapest config is cheapest first: the front's left end is known early
            cheapest = min(c.trainable_params for c in first_of_arm)
            arm = _method(next(c.params for c in first_of_arm if c.trainable_params == cheapest))
            choices = [c for c in first_of_arm if _method(c.params) == arm]
            return choices[rng.integers(len(choices))]
        if len(completed) < self.startup_trials:
            return open_[rng.integers(len(open_))]
        running = [t for t in others if t.state == TrialState.RUNNING]
        return open_[int(np.argmax(self.scores(completed, running, open_)))]

    def scores(self, completed: list[FrozenTrial], running: list[FrozenTrial], candidates: list[Candidate]) -> np.ndarray:
        """Each candidate's expected hypervolume improvement over the completed trials and the running ones' predictions."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        counts = [_count(t) for t in completed]
        features = self._features([t.params for t in completed], counts)
        kernel = (ConstantKernel(1.0, (1e-2, 1e2)) * Matern(np.ones(features.shape[1]), (1e-2, 1e3), nu=2.5)
                  + WhiteKernel(1e-2, (1e-6, 1.0)))  # two seeds of one config score apart: noise is real
        model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=1, random_state=self.seed)
        with warnings.catch_warnings():  # a bound reached on a few points is no news
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(features, np.array([t.values[0] for t in completed]))
        points = [(math.log10(count), t.values[0]) for count, t in zip(counts, completed)]
        if running:  # the kriging believer: a running trial reaches its predicted CIDEr
            believed = model.predict(self._features([t.params for t in running], [_count(t) for t in running]))
            points += [(math.log10(_count(t)), float(y)) for t, y in zip(running, believed)]
        mean, sd = model.predict(self._features([c.params for c in candidates], [c.trainable_params for c in candidates]),
                                 return_std=True)
        x = np.log10([c.trainable_params for c in candidates])
        return expected_improvement(x, mean, sd, points, self.reference())

    def _features(self, params: list[dict[str, Any]], counts: list[int]) -> np.ndarray:
        """One row per config: each categorical one-hot, each number in [0, 1] (log where sampled so), log10 count scaled."""
        lowest, highest = (math.log10(f(c.trainable_params for c in self.pool())) for f in (min, max))
        rows = []
        for values, count in zip(params, counts):
            row = []
            for name, distribution in sorted(self._distributions.items()):
                if isinstance(distribution, CategoricalDistribution):
                    row += [float(name in values and values[name] == choice) for choice in distribution.choices]
                elif name in values:
                    low, high, value = distribution.low, distribution.high, values[name]
                    if distribution.log:
                        low, high, value = math.log(low), math.log(high), math.log(value)
                    row.append((value - low) / (high - low))
                else:
                    row.append(0.0)
            row.append((math.log10(count) - lowest) / max(highest - lowest, 1e-9))
            rows.append(row)
        return np.array(rows, dtype=float)


def _method(params: dict[str, Any]) -> str | None:
    """The arm of a config's parameters: ``method`` where the space has several arms, else the prefix of its keys."""
    return params.get("method") or next((name.partition(".")[0] for name in params), None)


def _count(trial: FrozenTrial) -> int:
    return int(trial.user_attrs["trainable_params"])


def _feasible(trial: FrozenTrial) -> bool:
    """Not over the budget and not out of memory: the study's constraints are all <= 0."""
    return all(value <= 0 for value in trial.constraints.values())
