"""Episodes of a flat DSRL dataset: boundaries, per-trajectory returns and DSRL's scores."""

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np


@dataclass(frozen=True)
class Trajectory:
    """One episode of a flat dataset: transitions ``start`` (inclusive) to ``stop`` (exclusive)."""

    start: int
    stop: int
    reward_return: float
    cost_return: float

    @property
    def length(self) -> int:
        """Return the number of transitions."""
        return self.stop - self.start


def episode_ends(data) -> np.ndarray:
    """
    Return a boolean mask of transitions that end an episode (terminal or timeout).

    The last transition always ends the final episode, so an unterminated tail is still counted
    as a (truncated) trajectory; `validate_arrays` reports such a tail as a problem.
    """
    ends = np.asarray(data['terminals']).reshape(-1).astype(bool)
    ends = ends | np.asarray(data['timeouts']).reshape(-1).astype(bool)
    if ends.size:
        ends[-1] = True
    return ends


def episode_spans(data) -> Tuple[np.ndarray, np.ndarray]:
    """Return (starts, stops) of every trajectory; reads only the terminal and timeout flags."""
    stops = (np.flatnonzero(episode_ends(data)) + 1).astype(np.int64)
    return np.concatenate([[0], stops[:-1]]).astype(np.int64)[:stops.size], stops


def reward_returns(data) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Return (reward_returns, starts, stops) of every trajectory without reading ``costs``.

    What a method that learns without cost labels (DSPO) may use of a dataset.
    """
    starts, stops = episode_spans(data)
    if stops.size == 0:
        return np.zeros(0), starts, stops
    rewards = np.asarray(data['rewards'], dtype=np.float64).reshape(-1)
    return np.add.reduceat(rewards, starts), starts, stops


def trajectory_returns(data) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (reward_returns, cost_returns, starts, stops) of every trajectory, undiscounted."""
    rewards, starts, stops = reward_returns(data)
    if stops.size == 0:
        return rewards, np.zeros(0), starts, stops
    costs = np.asarray(data['costs'], dtype=np.float64).reshape(-1)
    return rewards, np.add.reduceat(costs, starts), starts, stops


def split_trajectories(data) -> List[Trajectory]:
    """Split a flat dataset into its trajectories, with their reward and cost returns."""
    reward_returns, cost_returns, starts, stops = trajectory_returns(data)
    return [Trajectory(int(a), int(b), float(r), float(c))
            for a, b, r, c in zip(starts, stops, reward_returns, cost_returns)]


# Safe demonstrations per task in DSPO's experiments ("10 ~ 15"); split-demos' default.
DEFAULT_NUM_DEMOS = 12


@dataclass(frozen=True)
class DemoSplit:
    """
    Trajectory indices of a labelled dataset split into safe demonstrations and the rest.

    ``demos``: the ``num_demos`` trajectories of highest reward return among those with cost
    return <= ``kappa`` (ties: the earlier trajectory); ``heldout``: a random share of the other
    trajectories, kept with their labels to evaluate a discriminator on trajectories it never
    saw; ``unlabelled``: every other trajectory.
    """

    demos: np.ndarray
    unlabelled: np.ndarray
    kappa: float
    num_safe: int
    heldout: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def split_safe_demos(data, kappa: float, num_demos: int = DEFAULT_NUM_DEMOS,
                     holdout: float = 0.0, seed: int = 0) -> DemoSplit:
    """
    Choose the safe demonstrations of a labelled dataset (the only use of its cost labels).

    Rule: among whole trajectories with cost return <= kappa, the ``num_demos`` of highest
    reward return. ``holdout`` in [0, 1): that share of the remaining trajectories, drawn at
    random with ``seed``, is held out. Raises ValueError (one line naming the fix) when the input
    cannot give them.
    """
    if not np.isfinite(kappa) or kappa < 0:
        raise ValueError(f'kappa must be a finite cost budget >= 0, got {kappa}')
    if num_demos < 1:
        raise ValueError(f'the number of demonstrations must be >= 1, got {num_demos}')
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f'the held-out share must lie in [0, 1), got {holdout}')
    rewards, costs, starts, _ = trajectory_returns(data)
    if np.isnan(costs).any():
        raise ValueError('the dataset has no cost labels (NaN costs): split-demos needs the '
                         'labelled dataset to choose safe demonstrations')
    safe = np.flatnonzero(costs <= kappa)
    if safe.size < num_demos:
        raise ValueError(f'only {safe.size} of {starts.size} trajectories have cost return <= '
                         f'{kappa:g}, fewer than the {num_demos} demonstrations asked for; raise '
                         '--kappa or lower --num-demos')
    if starts.size <= num_demos:
        raise ValueError(f'the dataset has {starts.size} trajectories: taking {num_demos} '
                         'demonstrations would leave no unlabelled data; lower --num-demos')
    order = np.lexsort((safe, -rewards[safe]))       # highest reward first, then lower index
    demos = np.sort(safe[order[:num_demos]])
    rest = np.setdiff1d(np.arange(starts.size), demos)
    count = int(round(holdout * rest.size))
    if count >= rest.size:
        raise ValueError(f'holding out {holdout:g} of {rest.size} trajectories leaves no '
                         'unlabelled data; lower --holdout')
    heldout = np.sort(np.random.default_rng(seed).choice(rest, count, replace=False))
    unlabelled = np.setdiff1d(rest, heldout)
    return DemoSplit(demos, unlabelled, float(kappa), int(safe.size), heldout)


def select_trajectories(data, indices: np.ndarray, keys) -> dict:
    """Return the rows of ``keys`` belonging to the trajectories ``indices`` (in that order)."""
    starts, stops = episode_spans(data)
    rows = np.concatenate([np.arange(starts[i], stops[i]) for i in indices])
    return {key: np.asarray(data[key])[rows] for key in keys}
