"""How a search draws its trials: Optuna's TPE and random search, and random-around-best (Avetisian) as an Optuna
sampler of ours. Registry kind ``search_samplers``: ``(seed, startup_trials) -> optuna.samplers.BaseSampler``.

Every trial gets a sampler seeded from (search seed, trial number) (`PerTrialSeed`): a trial's draw is reproducible,
and two workers sharing one study never draw the same sequence, since the study gives each trial number to one
worker only. TPE and random search keep nothing between trials but their random state (they read the finished
trials from the study's storage every time), so a fresh instance per trial loses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from decathlete.registry import register_search_sampler


def trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeed(BaseSampler):
    """Delegates to ``make(seed)``, rebuilt before every trial with the seed of (``seed``, trial number)."""

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class RandomAroundBestSampler(BaseSampler):
    """Avetisian's search: each parameter drawn in ``[p_best / factor, p_best * factor]`` around the best finished
    trial so far (the paper: factor 10), clipped to the parameter's range.

    The paper does not say how values are spread over that interval; a multiplicative interval is drawn
    log-uniformly here (uniformly, 90 % of draws would lie above ``p_best``). Integers and stepped floats are rounded
    to their grid. A parameter whose best value is 0 or below has no multiplicative neighbourhood and is drawn over
    its whole range; a categorical one keeps the best choice with probability 1/2, else takes any choice. Before any
    trial has finished, every draw is uniform over the range (random search).
    """

    def __init__(self, factor: float = 10.0, seed: int | None = None) -> None:
        if factor <= 1:
            raise ValueError(f"random-around-best needs a factor above 1, got {factor}")
        self.factor = factor
        self._rng = np.random.default_rng(seed)
        self._random = RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        best = best_trial(study, param_name)
        if best is None:
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        value = best.params[param_name]
        if isinstance(param_distribution, CategoricalDistribution):
            if self._rng.random() < 0.5:
                return value
            return param_distribution.choices[int(self._rng.integers(len(param_distribution.choices)))]
        if value <= 0:
            return self._random.sample_independent(study, trial, param_name, param_distribution)
        low = max(param_distribution.low, value / self.factor)
        high = min(param_distribution.high, value * self.factor)
        drawn = math.exp(self._rng.uniform(math.log(max(low, 1e-300)), math.log(high))) if high > low else low
        return _on_grid(drawn, param_distribution)


def _on_grid(value: float, distribution: BaseDistribution) -> float | int:
    step = getattr(distribution, "step", None)
    low, high = distribution.low, distribution.high
    if isinstance(distribution, IntDistribution):
        step = step or 1
    if step:
        value = low + round((value - low) / step) * step
    value = min(max(value, low), high)
    return int(value) if isinstance(distribution, IntDistribution) else float(value)


def best_trial(study: Study, param_name: str | None = None) -> FrozenTrial | None:
    """The best finished trial (holding ``param_name``), or None."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and (param_name is None or param_name in t.params)]
    if not done:
        return None
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    return pick(done, key=lambda t: t.value)


@register_search_sampler("tpe")
def tpe(seed: int = 0, startup_trials: int = 10) -> BaseSampler:
    """Optuna's Tree-structured Parzen Estimator (van den Hork 2019 used hyperopt's) after ``startup_trials``
    random ones; ``constant_liar`` so that workers running at once spread out."""
    return PerTrialSeed(lambda s: optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=s,
                                                             constant_liar=True), seed)


@register_search_sampler("random")
def random(seed: int = 0, startup_trials: int = 0) -> BaseSampler:
    """Uniform random search over the space (log-uniform where the range is ``log``)."""
    return PerTrialSeed(lambda s: RandomSampler(seed=s), seed)


@register_search_sampler("random-around-best")
def random_around_best(seed: int = 0, startup_trials: int = 0) -> BaseSampler:
    """Avetisian: each parameter within a factor of 10 of the best trial so far (`RandomAroundBestSampler`)."""
    return PerTrialSeed(lambda s: RandomAroundBestSampler(10.0, s), seed)
