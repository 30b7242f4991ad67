"""
Draw the learned feasible region: V_h's zero level set over the x-y plane (FISOR's Fig. 2).

For the Circle tasks the agent's planar position is part of the observation (bullet_safety_gym
``agents.py``: every agent's observation starts with ``0.1 * x, 0.1 * y``; ``tasks.py``: the last
entry of a Circle observation is ``(|p_xy| - 7) / 10``, the signed distance from the reward
circle).
The picture sweeps x and y over the arena, keeps every other entry at a reference state (by
default the environment's first observation after ``reset(seed=0)``: the agent at rest), keeps the
circle-distance entry consistent with x and y, and draws V_h(s) with its zero contour (the
boundary of the learned feasible region: FISOR's sign convention, V_h <= 0 is feasible) and the
cost boundaries |x| = 6 of the task.

    python -m offline_training.feasibility_plot RUN_OR_BUNDLE -o feasibility.png
    saferl-export RUN -o models/NAME --feasibility-plot
"""

import argparse
from pathlib import Path
import sys
from typing import Callable, Optional

import numpy as np
from saferl_ros.errors import ConfigError, reports_user_errors
from saferl_ros.observation import (channel_names, channels, CIRCLE_RADIUS, CIRCLE_X_LIMIT,
                                    parse_task, WORLD_ENV_DIM)
from saferl_ros.tasks import get_task

ARENA = 10.0  # half-width [m] of the square that is drawn (the Octagon world spans ~ +-10 m)


def reference_observation(task, seed: int = 0) -> np.ndarray:
    """Return the environment's first observation after reset(seed): the agent at rest."""
    env = get_task(task).make_env()
    try:
        obs, _ = env.reset(seed=seed)
    finally:
        env.close()
    return np.asarray(obs, dtype=np.float32)


def xy_observations(task, reference: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """
    Return observations [len(ys), len(xs), obs_dim] with the agent placed at every (x, y).

    Only the position channels and the Circle task's distance channel change; everything else
    (velocities, orientation, joints) stays as in ``reference``.
    """
    agent, kind = parse_task(task)
    if kind != 'Circle':
        raise ConfigError(f'the feasibility picture is defined for the Circle tasks (the cost '
                          f'is |x| > {CIRCLE_X_LIMIT:g}); {task} is a {kind} task')
    names = channel_names(task)
    scale = {c.name: c.scale for c in channels(task)}
    grid_x, grid_y = np.meshgrid(xs, ys)
    obs = np.broadcast_to(reference, grid_x.shape + reference.shape).copy()
    obs[..., names.index('x')] = scale['x'] * grid_x
    obs[..., names.index('y')] = scale['y'] * grid_y
    obs[..., names.index('circle_dist')] = (np.hypot(grid_x, grid_y) - CIRCLE_RADIUS) / \
        WORLD_ENV_DIM
    return obs.astype(np.float32)


def feasibility_grid(v_h: Callable[[np.ndarray], np.ndarray], task,
                     reference: Optional[np.ndarray] = None, resolution: int = 121):
    """Return (xs, ys, V_h grid [len(ys), len(xs)]) for ``v_h(obs [B, obs_dim]) -> [B]``."""
    if reference is None:
        reference = reference_observation(task)
    xs = np.linspace(-ARENA, ARENA, resolution)
    ys = np.linspace(-ARENA, ARENA, resolution)
    obs = xy_observations(task, np.asarray(reference, dtype=np.float32), xs, ys)
    values = np.asarray(v_h(obs.reshape(-1, obs.shape[-1])), dtype=np.float64)
    return xs, ys, values.reshape(len(ys), len(xs))


def plot_feasibility(v_h: Callable[[np.ndarray], np.ndarray], task, png, title: str = '',
                     reference: Optional[np.ndarray] = None, resolution: int = 121) -> dict:
    """
    Draw V_h over the x-y plane into ``png``; return summary numbers of the picture.

    Returns the fraction of the drawn area that is feasible inside and outside the cost
    boundaries, a quick check that the critic learned the task's constraint.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    spec = get_task(task)
    xs, ys, grid = feasibility_grid(v_h, spec.name, reference, resolution)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    low, high = min(grid.min(), -1e-3), max(grid.max(), 1e-3)
    image = ax.pcolormesh(xs, ys, grid, cmap='RdBu_r', shading='auto',
                          norm=TwoSlopeNorm(vmin=low, vcenter=0.0, vmax=high))
    fig.colorbar(image, ax=ax, label='$V_h(s)$  (<= 0 feasible)')
    if grid.min() < 0 < grid.max():
        ax.contour(xs, ys, grid, levels=[0.0], colors='k', linewidths=2.0)
    ax.plot([], [], 'k-', lw=2, label='$V_h = 0$ (learned feasible boundary)')
    for x in (-CIRCLE_X_LIMIT, CIRCLE_X_LIMIT):
        ax.axvline(x, color='tab:orange', ls='--', lw=1.5)
    ax.plot([], [], color='tab:orange', ls='--', label=f'cost boundary |x| = {CIRCLE_X_LIMIT:g}')
    angle = np.linspace(0, 2 * np.pi, 200)
    ax.plot(CIRCLE_RADIUS * np.cos(angle), CIRCLE_RADIUS * np.sin(angle), color='0.4', ls=':',
            label=f'reward circle r = {CIRCLE_RADIUS:g}')
    ax.set_xlabel('x [m]')
    ax.set_ylabel('y [m]')
    ax.set_aspect('equal')
    ax.set_title(title or f'{spec.name}: learned feasible region')
    ax.legend(loc='lower left', fontsize=8, framealpha=0.9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    inside = np.abs(xs)[None, :].repeat(len(ys), 0) <= CIRCLE_X_LIMIT
    feasible = grid <= 0
    return {'feasible_fraction_inside_bounds': float(feasible[inside].mean()),
            'feasible_fraction_outside_bounds': float(feasible[~inside].mean()),
            'v_h_min': float(grid.min()), 'v_h_max': float(grid.max())}


def plot_bundle_feasibility(bundle_dir, png, reference: Optional[np.ndarray] = None) -> dict:
    """Draw the feasibility picture of a bundle's (ONNX) critic."""
    from saferl_ros.bundle import load_bundle
    bundle = load_bundle(bundle_dir)
    if bundle.critic_kind != 'feasibility':
        raise ConfigError(f'{bundle_dir}: critic kind {bundle.critic_kind!r} has no V_h; the '
                          'feasibility picture needs a FISOR-style feasibility critic')

    def v_h(obs):
        return bundle.critic(obs, np.zeros((len(obs), bundle.act_dim), np.float32))['v_h']
    return plot_feasibility(v_h, bundle.task_name, png, f'{bundle.name}: V_h over x-y',
                            reference)


def plot_run_feasibility(run_dir, png, reference: Optional[np.ndarray] = None) -> dict:
    """Draw the feasibility picture of a run folder's torch V_h."""
    import torch

    from offline_training.runs import load_run
    algorithm, run_config, model = load_run(run_dir)
    if not hasattr(model, 'v_h'):
        raise ConfigError(f'{run_dir}: {algorithm} has no feasible value V_h')

    def v_h(obs):
        with torch.no_grad():
            return model.v_h(torch.as_tensor(obs)).numpy()
    return plot_feasibility(v_h, run_config['task']['name'], png,
                            f'{Path(run_dir).name}: V_h over x-y', reference)


@reports_user_errors('feasibility_plot')
def main(argv=None) -> int:
    """Command-line entry point: draw the feasibility picture of a run or a bundle."""
    parser = argparse.ArgumentParser(
        prog='python -m offline_training.feasibility_plot',
        description="Draw V_h's zero level set over the x-y plane (Circle tasks).")
    parser.add_argument('source', help='bundle folder (manifest.yaml) or saferl-train run folder')
    parser.add_argument('-o', '--out', required=True, help='PNG file')
    args = parser.parse_args(argv)
    source = Path(args.source)
    if (source / 'manifest.yaml').is_file():
        summary = plot_bundle_feasibility(source, args.out)
    else:
        summary = plot_run_feasibility(source, args.out)
    print(f'{args.out}: ' + ', '.join(f'{k}={v:.3g}' for k, v in summary.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
