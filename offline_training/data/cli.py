"""
``saferl-data``: inspect, validate and plot DSRL-format datasets.

Examples::

    saferl-data info datasets/SafetyBallCircle-v0-80-886.hdf5
    saferl-data validate recording.hdf5 --task BallCircle   # exit 1 and a list of problems if bad
    saferl-data plot datasets/SafetyBallCircle-v0-80-886.hdf5 -o ballcircle.png
"""

import argparse
import sys
from typing import List, Optional

import numpy as np

from offline_training.data.dataset import (DatasetError, file_sha256, infer_task, load_dataset,
                                           resolve_dataset_path, validate_file)
from offline_training.data.plot import plot_returns
from offline_training.data.tasks import get_task
from offline_training.data.trajectories import trajectory_returns

KAPPAS = (5, 10, 20, 40)


def _load(args):
    """Load ``args.path`` (validated) and return (path, data, task spec)."""
    path = resolve_dataset_path(args.path, args.task)
    data = load_dataset(path, task=args.task)
    import h5py
    with h5py.File(path, 'r') as h5:
        attrs = dict(h5.attrs)
    spec = get_task(args.task) if args.task else infer_task(path, attrs)
    return path, data, spec


def _row(name, values):
    return (f'  {name:<22} min {values.min():10.2f}   mean {values.mean():10.2f}   '
            f'max {values.max():10.2f}')


def cmd_info(args) -> int:
    """Print a summary table of a dataset."""
    path, data, spec = _load(args)
    reward_returns, cost_returns, starts, stops = trajectory_returns(data)
    lengths = (stops - starts).astype(np.float64)
    print(f'file         {path}')
    print(f'sha256       {file_sha256(path)}')
    print(f'task         {spec.name if spec else "unknown"}'
          + (f' ({spec.env_id}, horizon {spec.horizon})' if spec else ''))
    print(f'transitions  {data["observations"].shape[0]}')
    print(f'trajectories {starts.size}'
          + (f'   (DSRL dataset: {spec.dsrl_num_trajectories})' if spec else ''))
    print('keys')
    for key in sorted(data):
        print(f'  {key:<22} {str(data[key].dtype):<8} {tuple(data[key].shape)}')
    print('per trajectory')
    print(_row('length', lengths))
    print(_row('reward return', reward_returns))
    print(_row('cost return', cost_returns))
    if spec:
        print(f'  DSRL bounds            reward [{spec.min_reward:.2f}, {spec.max_reward:.2f}]   '
              f'cost cut-off {spec.max_cost:g}')
    shares = '   '.join(f'<= {k}: {np.mean(cost_returns <= k):6.1%}' for k in KAPPAS)
    print(f'cost return  {shares}')
    return 0


def cmd_validate(args) -> int:
    """Validate a file; print every problem and return 1 if there is any."""
    problems = validate_file(args.path, task=args.task)
    if problems:
        print(f'INVALID: {len(problems)} problem(s) in {args.path}', file=sys.stderr)
        for problem in problems:
            print(f'  - {problem.key}: {problem.message}', file=sys.stderr)
        return 1
    print(f'OK: {args.path} is a valid DSRL dataset')
    return 0


def cmd_plot(args) -> int:
    """Write the reward-versus-cost scatter plot of a dataset."""
    path, data, spec = _load(args)
    out = plot_returns(data, args.output, task=spec)
    print(f'wrote {out}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog='saferl-data', description='Inspect, validate and plot DSRL-format datasets.')
    sub = parser.add_subparsers(dest='command', required=True)

    def with_path(name, help_text, func):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument('path', help='DSRL-format HDF5 file')
        p.add_argument('--task', help="task name (default: from the file's attributes or name)")
        p.set_defaults(func=func)
        return p

    with_path('info', 'print a summary table of a dataset', cmd_info)
    with_path('validate', 'check a dataset; exit 1 and list the problems if it is bad',
              cmd_validate)
    plot = with_path('plot', 'write a reward-versus-cost scatter plot (PNG)', cmd_plot)
    plot.add_argument('-o', '--output', required=True, help='output PNG path')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatasetError as err:
        print('error: ' + str(err).replace('\n', '\nerror: '), file=sys.stderr)
        return 1
    except KeyError as err:
        print(f'error: {err.args[0]}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
