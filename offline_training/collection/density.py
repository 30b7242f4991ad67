"""
Density filter over (cost return, reward return), DSRL's ``grid_filter`` with a seeded rng.

DSRL (``scripts/process_dataset.py``, ``dsrl.offline_env.grid_filter``) bins trajectories on a
``cbins x rbins`` grid over cost and reward return, drops cells that hold ``min_per_bin`` or fewer
trajectories, keeps sparse cells whole and samples ``max_per_bin`` trajectories from dense ones;
trajectories above the cost cut-off ``cmax`` are removed. The result is a dataset whose
(cost, reward) coverage is even rather than dominated by wherever the behaviour agents spent most
time. DSRL samples with Python's global ``random`` and never seeds it; here the rng is explicit.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class DensityFilterConfig:
    """Grid-filter settings (DSRL defaults: cbins=60, rbins=50)."""

    cbins: int = 60
    rbins: int = 50
    max_per_bin: Optional[int] = None  # None: chosen so the result is close to target_count
    min_per_bin: int = 0               # cells with <= this many trajectories are dropped
    cmax: float = float('inf')         # cost cut-off (DSRL's MAX_EPISODE_COST)
    cmin: float = -float('inf')
    rmin: float = -float('inf')
    rmax: float = float('inf')
    target_count: Optional[int] = None


def _bin_cells(costs: np.ndarray, rewards: np.ndarray, cfg: DensityFilterConfig):
    """Return (kept-in-range indices, cell id per kept index)."""
    inside = ((costs >= cfg.cmin) & (costs <= cfg.cmax)
              & (rewards >= cfg.rmin) & (rewards <= cfg.rmax))
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return idx, idx
    c, r = costs[idx], rewards[idx]
    # As in DSRL the grid spans the data inside the limits, not the limits themselves.
    c_lo, c_hi = c.min(), c.max()
    r_lo, r_hi = r.min(), r.max()
    c_step = (c_hi - c_lo) / cfg.cbins or 1.0
    r_step = (r_hi - r_lo) / cfg.rbins or 1.0
    ci = np.minimum(((c - c_lo) // c_step).astype(np.int64), cfg.cbins - 1)
    ri = np.minimum(((r - r_lo) // r_step).astype(np.int64), cfg.rbins - 1)
    return idx, ci * cfg.rbins + ri


def grid_filter(cost_returns, reward_returns, cfg: DensityFilterConfig,
                rng: np.random.Generator) -> np.ndarray:
    """
    Return the sorted indices of the trajectories the density filter keeps.

    With ``cfg.max_per_bin=None`` the cap is the smallest one whose result reaches
    ``cfg.target_count`` (or no cap when even that keeps fewer), so the dataset size lands near
    DSRL's. Deterministic for a given ``rng`` state.
    """
    costs = np.asarray(cost_returns, dtype=np.float64)
    rewards = np.asarray(reward_returns, dtype=np.float64)
    if costs.shape != rewards.shape or costs.ndim != 1:
        raise ValueError(f'cost_returns and reward_returns must be 1-D of equal length, got '
                         f'{costs.shape} and {rewards.shape}')
    idx, cells = _bin_cells(costs, rewards, cfg)
    if idx.size == 0:
        return idx
    order = np.argsort(cells, kind='stable')
    cell_ids, starts, counts = np.unique(cells[order], return_index=True, return_counts=True)
    counts_kept = counts[counts > cfg.min_per_bin]

    cap = cfg.max_per_bin
    if cap is None:
        if cfg.target_count is None:
            raise ValueError('grid_filter needs max_per_bin or target_count in its config')
        cap = int(counts_kept.max()) if counts_kept.size else 1
        for candidate in range(1, cap + 1):
            if np.minimum(counts_kept, candidate).sum() >= cfg.target_count:
                cap = candidate
                break

    keep = []
    for start, count in zip(starts, counts):
        members = idx[order[start:start + count]]
        if count <= cfg.min_per_bin:
            continue
        if count > cap:
            members = rng.choice(members, size=cap, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
