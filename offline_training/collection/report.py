"""
Coverage of collected datasets against the DSRL datasets, as a markdown table and plots.

``python -m offline_training.collection.report [--dataset-dir datasets] [--img docs/img/datasets]``
prints the per-task table used in docs/datasets.md and writes one reward-cost scatter per task.

Targets (issue #3): trajectory count within +-50% of DSRL's; cost returns reaching DSRL's cut-off
(the largest kept cost return at least 90% of it, and nothing above it); at least 20% of
trajectories with cost <= 10 and at least 20% with cost > 20; reward returns spanning at least 60%
of DSRL's [MIN_EPISODE_REWARD, MAX_EPISODE_REWARD].
"""

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from offline_training.data.dataset import load_dataset
from offline_training.data.trajectories import trajectory_returns
from saferl_ros.tasks import get_task

DEFAULT_TASKS = ('BallCircle', 'CarCircle', 'DroneCircle', 'BallRun', 'CarRun', 'DroneRun')


def coverage(task, reward_returns: np.ndarray, cost_returns: np.ndarray) -> dict:
    """Return the coverage figures and pass/fail per target for one task's returns."""
    spec = get_task(task)
    n = int(reward_returns.size)
    dsrl_span = spec.max_reward - spec.min_reward
    # Only the part of our reward range inside DSRL's bounds counts towards its span.
    lo = max(float(reward_returns.min()), spec.min_reward)
    hi = min(float(reward_returns.max()), spec.max_reward)
    span = max(0.0, hi - lo) / dsrl_span
    figures = {
        'task': spec.name, 'trajectories': n, 'dsrl_trajectories': spec.dsrl_num_trajectories,
        'count_ratio': n / spec.dsrl_num_trajectories,
        'cost_max': float(cost_returns.max()), 'cost_min': float(cost_returns.min()),
        'cmax': spec.max_cost,
        'share_cost_le_10': float(np.mean(cost_returns <= 10)),
        'share_cost_gt_20': float(np.mean(cost_returns > 20)),
        'reward_min': float(reward_returns.min()), 'reward_max': float(reward_returns.max()),
        'dsrl_reward_min': spec.min_reward, 'dsrl_reward_max': spec.max_reward,
        'reward_span': span,
    }
    figures['pass'] = {
        'count': 0.5 <= figures['count_ratio'] <= 1.5,
        'cost_range': (figures['cost_min'] <= 1.0
                       and 0.9 * spec.max_cost <= figures['cost_max'] <= spec.max_cost),
        'cost_le_10': figures['share_cost_le_10'] >= 0.2,
        'cost_gt_20': figures['share_cost_gt_20'] >= 0.2,
        'reward_span': span >= 0.6,
    }
    return figures


def find_dataset(task, dataset_dir) -> Optional[Path]:
    """Return the newest ``Safety<Task>-v0-*.hdf5`` in ``dataset_dir``, or None."""
    spec = get_task(task)
    matches = sorted(Path(dataset_dir).glob(f'{spec.env_id}-*.hdf5'),
                     key=lambda p: p.stat().st_mtime)
    return matches[-1] if matches else None


def _mark(ok: bool) -> str:
    return 'pass' if ok else '**FAIL**'


def markdown_tables(rows) -> str:
    """Return the summary and coverage tables for a list of (figures, transitions, path)."""
    lines = ['| task | file | trajectories (DSRL) | transitions | reward return [min, max] '
             '(DSRL bounds) | cost return [min, max] (DSRL cut-off) |',
             '|---|---|---|---|---|---|']
    for f, transitions, path in rows:
        lines.append(
            f'| {f["task"]} | `{path.name}` | {f["trajectories"]} ({f["dsrl_trajectories"]}) | '
            f'{transitions} | [{f["reward_min"]:.1f}, {f["reward_max"]:.1f}] '
            f'([{f["dsrl_reward_min"]:.1f}, {f["dsrl_reward_max"]:.1f}]) | '
            f'[{f["cost_min"]:.0f}, {f["cost_max"]:.0f}] ({f["cmax"]:g}) |')
    lines += ['', '| task | count within +-50% | cost 0 .. cut-off | >= 20% cost <= 10 | '
              '>= 20% cost > 20 | reward span >= 60% |', '|---|---|---|---|---|---|']
    for f, _, _ in rows:
        p = f['pass']
        lines.append(
            f'| {f["task"]} | {_mark(p["count"])} ({f["count_ratio"]:.0%}) | '
            f'{_mark(p["cost_range"])} ({f["cost_min"]:.0f} .. {f["cost_max"]:.0f} of '
            f'{f["cmax"]:g}) | {_mark(p["cost_le_10"])} ({f["share_cost_le_10"]:.0%}) | '
            f'{_mark(p["cost_gt_20"])} ({f["share_cost_gt_20"]:.0%}) | '
            f'{_mark(p["reward_span"])} ({f["reward_span"]:.0%}) |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    """Print the coverage tables and write the scatter plots."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    root = Path(__file__).resolve().parents[2]
    parser.add_argument('--dataset-dir', default=str(root / 'datasets'))
    parser.add_argument('--img', default=str(root / 'docs' / 'img' / 'datasets'),
                        help='folder for the scatter plots (empty string: no plots)')
    parser.add_argument('--tasks', nargs='+', default=list(DEFAULT_TASKS))
    args = parser.parse_args(argv)
    rows = []
    for task in args.tasks:
        path = find_dataset(task, args.dataset_dir)
        if path is None:
            print(f'{task}: no dataset in {args.dataset_dir}')
            continue
        data = load_dataset(path, task=task)
        rewards, costs, _, _ = trajectory_returns(data)
        rows.append((coverage(task, rewards, costs), int(data['rewards'].size), path))
        if args.img:
            from offline_training.data.plot import plot_returns
            plot_returns(data, Path(args.img) / f'{get_task(task).name}.png', task=task,
                         title=f'{get_task(task).name}: {path.name}')
    print(markdown_tables(rows))


if __name__ == '__main__':
    main()
