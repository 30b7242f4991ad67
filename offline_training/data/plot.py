"""Reward-versus-cost scatter plot of a dataset's trajectories, like DSRL's CR-plots."""

from pathlib import Path
from typing import Optional

import numpy as np

from offline_training.data.trajectories import trajectory_returns
from saferl_ros.tasks import get_task


def plot_returns(data, out_path, task=None, title: Optional[str] = None,
                 kappas=(5, 10, 20, 40)) -> Path:
    """
    Save a PNG with one point per trajectory: cost return (x) against reward return (y).

    Dashed lines mark the cost thresholds ``kappas``; with a task, the DSRL cost cut-off and the
    DSRL reward bounds used for normalisation are drawn too, so coverage can be read off.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    reward_returns, cost_returns, _, _ = trajectory_returns(data)
    spec = get_task(task) if task is not None else None
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.scatter(cost_returns, reward_returns, s=6, alpha=0.5, color='tab:blue', linewidths=0,
               label=f'{reward_returns.size} trajectories')
    for kappa in kappas:
        ax.axvline(kappa, color='tab:green', linestyle=':', linewidth=0.8)
    if kappas:
        ax.plot([], [], color='tab:green', linestyle=':', label=f'kappa = {list(kappas)}')
    if spec is not None:
        ax.axvline(spec.max_cost, color='tab:red', linestyle='--', linewidth=1,
                   label=f'DSRL cost cut-off {spec.max_cost:g}')
        for bound in (spec.min_reward, spec.max_reward):
            ax.axhline(bound, color='grey', linestyle='--', linewidth=0.8)
        ax.plot([], [], color='grey', linestyle='--', label='DSRL reward bounds')
    ax.set_xlabel('cost return')
    ax.set_ylabel('reward return')
    ax.set_title(title or (f'{spec.name}: reward vs cost per trajectory' if spec
                           else 'reward vs cost per trajectory'))
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    if reward_returns.size:
        ax.set_xlim(left=min(-1.0, float(np.min(cost_returns)) - 1))
    return _save(fig, out_path)


def plot_generation(data, report: dict, out_path, task, kappa: float) -> Path:
    """
    Save OASIS's generation check: each requested (cost, reward) return against what was made.

    Grey points: the source's trajectories. Per condition, an open square at the requested
    returns and a filled circle at the generated data's episode-equivalent returns (mean label
    per step x the task horizon), joined by an arrow; the dotted line is kappa.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    spec = get_task(task)
    reward_returns, cost_returns, _, _ = trajectory_returns(data)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.scatter(cost_returns, reward_returns, s=5, alpha=0.35, color='grey', linewidths=0,
               label=f'source: {reward_returns.size} trajectories')
    ax.axvline(kappa, color='tab:green', linestyle=':', linewidth=1, label=f'kappa = {kappa:g}')
    for row, color in zip(report['conditions'], plt.cm.tab10.colors):
        wanted = (row['cost_condition'], row['reward_condition'])
        made = (row['cost_per_step'] * spec.horizon, row['reward_per_step'] * spec.horizon)
        ax.plot(*wanted, marker='s', mfc='none', color=color, ls='none', ms=9,
                label=f'asked ({wanted[1]:.0f}, {wanted[0]:.0f})')
        ax.plot(*made, marker='o', color=color, ls='none', ms=7,
                label=f'made ({made[1]:.0f}, {made[0]:.1f})')
        ax.annotate('', xy=made, xytext=wanted,
                    arrowprops={'arrowstyle': '->', 'color': color, 'lw': 1})
    ax.set_xlabel('cost return (generated: per-step label x horizon)')
    ax.set_ylabel('reward return')
    ax.set_title(f'{spec.name}: OASIS generation, asked vs made (reward, cost)')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=7)
    return _save(fig, out_path)


def _save(fig, out_path) -> Path:
    """Write a figure as PNG (making its folder) and close it; return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
