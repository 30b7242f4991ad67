"""Episodes of a flat DSRL dataset: boundaries, per-trajectory returns and DSRL's scores."""

from dataclasses import dataclass
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


def trajectory_returns(data) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (reward_returns, cost_returns, starts, stops) of every trajectory, undiscounted."""
    ends = episode_ends(data)
    stops = np.flatnonzero(ends) + 1
    starts = np.concatenate([[0], stops[:-1]]).astype(np.int64)
    if stops.size == 0:
        empty = np.zeros(0)
        return empty, empty, starts[:0], stops
    rewards = np.asarray(data['rewards'], dtype=np.float64).reshape(-1)
    costs = np.asarray(data['costs'], dtype=np.float64).reshape(-1)
    return (np.add.reduceat(rewards, starts), np.add.reduceat(costs, starts), starts, stops)


def split_trajectories(data) -> List[Trajectory]:
    """Split a flat dataset into its trajectories, with their reward and cost returns."""
    reward_returns, cost_returns, starts, stops = trajectory_returns(data)
    return [Trajectory(int(a), int(b), float(r), float(c))
            for a, b, r, c in zip(starts, stops, reward_returns, cost_returns)]
