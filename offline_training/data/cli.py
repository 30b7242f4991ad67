"""
``saferl-data``: inspect, validate and plot DSRL-format datasets.

Examples::

    saferl-data info datasets/SafetyBallCircle-v0-80-886.hdf5
    saferl-data validate recording.hdf5 --task BallCircle   # exit 1 and a list of problems if bad
    saferl-data plot datasets/SafetyBallCircle-v0-80-886.hdf5 -o ballcircle.png
    saferl-data collect --task BallCircle               # regenerate from behavior_agents/
    saferl-data train-behavior --task BallCircle        # (re)train the behaviour agents
    saferl-data merge recordings/demo/run_* --dataset old.hdf5 --task BallCircle -o new.hdf5
    saferl-data split-demos datasets/SafetyBallCircle-v0-80-886.hdf5 --kappa 10 \
        -o datasets/dspo/BallCircle-k10    # cost-free unlabelled set + 12 safe demonstrations
"""

import argparse
import sys
from typing import List, Optional

import numpy as np

from offline_training.data.dataset import (check_file, DatasetError, load_dataset,
                                           resolve_dataset_path)
from offline_training.data.plot import plot_returns
from offline_training.data.trajectories import (DEFAULT_NUM_DEMOS, select_trajectories,
                                                split_safe_demos, trajectory_returns)
from saferl_ros.errors import EXIT_USER_ERROR, UserError
from saferl_ros.files import sha256_file
from saferl_ros.tasks import get_task

KAPPAS = (5, 10, 20, 40)
# What the summaries and plots need: per-transition rewards, costs and episode ends.
SUMMARY_KEYS = ('rewards', 'costs', 'terminals', 'timeouts')


def _load(args):
    """
    Check ``args.path`` fully and load only its SUMMARY_KEYS; return (path, data, report).

    The checks stream over the file (nothing is read before its declared layout is accepted),
    and the observations, the bulk of a file, are never loaded.
    """
    path = resolve_dataset_path(args.path, args.task)
    report = check_file(path, task=args.task, require_task=False)
    if report.problems:
        raise DatasetError(report.problems)
    data = load_dataset(path, task=args.task, validate=False, keys=SUMMARY_KEYS)
    return path, data, report


def _print_notes(report, stream) -> None:
    for note in report.notes:
        print(f'  note: {note.key}: {note.message}', file=stream)


def _row(name, values):
    return (f'  {name:<22} min {values.min():10.2f}   mean {values.mean():10.2f}   '
            f'max {values.max():10.2f}')


def cmd_info(args) -> int:
    """Print a summary table of a dataset."""
    path, data, report = _load(args)
    spec = report.task
    reward_returns, cost_returns, starts, stops = trajectory_returns(data)
    lengths = (stops - starts).astype(np.float64)
    print(f'file         {path}')
    print(f'sha256       {sha256_file(path)}')
    print(f'task         {spec.name if spec else "unknown"}'
          + (f' ({spec.env_id}, horizon {spec.horizon})' if spec else ''))
    print(f'transitions  {data["rewards"].shape[0]}')
    print(f'trajectories {starts.size}'
          + (f'   (DSRL dataset: {spec.dsrl_num_trajectories})' if spec else ''))
    print('keys')
    for key, (shape, dtype) in sorted(report.layout.items()):
        print(f'  {key:<22} {str(dtype):<8} {shape}')
    print('per trajectory')
    print(_row('length', lengths))
    print(_row('reward return', reward_returns))
    if report.unlabelled:
        print('  cost return            none (cost labels removed: costs are NaN)')
    else:
        print(_row('cost return', cost_returns))
    if spec:
        print(f'  DSRL bounds            reward [{spec.min_reward:.2f}, {spec.max_reward:.2f}]   '
              f'cost cut-off {spec.max_cost:g}')
    if not report.unlabelled:
        shares = '   '.join(f'<= {k}: {np.mean(cost_returns <= k):6.1%}' for k in KAPPAS)
        print(f'cost return  {shares}')
    if report.notes:
        print('notes')
        _print_notes(report, sys.stdout)
    return 0


def cmd_validate(args) -> int:
    """Validate a file; print every problem and return 1 if there is any."""
    report = check_file(args.path, task=args.task)
    if report.problems:
        print(f'INVALID: {len(report.problems)} problem(s) in {args.path}', file=sys.stderr)
        for problem in report.problems:
            print(f'  - {problem.key}: {problem.message}', file=sys.stderr)
        _print_notes(report, sys.stderr)
        return 1
    print(f'OK: {args.path} is a valid DSRL dataset')
    _print_notes(report, sys.stdout)
    return 0


def cmd_plot(args) -> int:
    """Write the reward-versus-cost scatter plot of a dataset."""
    path, data, report = _load(args)
    out = plot_returns(data, args.output, task=report.task)
    print(f'wrote {out}')
    return 0


def cmd_collect(args) -> int:
    """Roll the committed behaviour agents out and write a density-filtered dataset."""
    from offline_training.collection.collect import collect_task

    overrides = {}
    if args.raw_factor is not None:
        overrides['raw_factor'] = args.raw_factor
    if args.episodes_per_setting is not None:
        overrides['episodes_per_setting'] = args.episodes_per_setting
    path = collect_task(args.task, agent_dir=args.agent_dir, out_dir=args.out_dir,
                        out_path=args.out, seed=args.seed, **overrides)
    print(f'wrote {path}')
    return 0


def cmd_train_behavior(args) -> int:
    """Train (or resume) a task's behaviour agents."""
    from offline_training.collection.behavior import DEFAULT_AGENT_ROOT
    from offline_training.collection.train_all import train_task

    name = get_task(args.task).name
    overrides = {} if args.steps is None else {'total_steps': args.steps}
    train_task(name, args.agent_dir or DEFAULT_AGENT_ROOT / name, **overrides)
    return 0


def cmd_merge(args) -> int:
    """Build a retraining dataset: an existing dataset plus robot/sim recordings."""
    from pathlib import Path

    from offline_training.data.dataset import validate_arrays, write_dataset
    from saferl_ros.dataset_keys import DSRL_KEYS
    # The recorder's reader (numpy + h5py, no ROS): it lists the completed episodes of a run.
    from saferl_ros.recorder import load_episodes, RecordingError

    parts, sources = [], []
    for item in ([args.dataset] if args.dataset else []) + list(args.recordings):
        path = Path(item)
        if path.is_dir():
            try:   # a recorder run folder: its completed episodes (also after a crash)
                data = load_episodes(path)
            except RecordingError as err:
                print(f'saferl-data: error: {err}', file=sys.stderr)
                return EXIT_USER_ERROR
            problems = validate_arrays(data, args.task, source=str(path))
            if problems:
                raise DatasetError(problems)
        else:
            data = load_dataset(path, task=args.task)
        parts.append({k: np.asarray(data[k]) for k in DSRL_KEYS})
        sources.append({'path': str(path), 'transitions': int(len(data['observations'])),
                        **({'sha256': sha256_file(path)} if path.is_file() else {})})
        print(f'{path}: {len(data["observations"])} transitions')
    if not parts:
        print('saferl-data: error: nothing to merge; give --dataset and/or recordings',
              file=sys.stderr)
        return EXIT_USER_ERROR
    merged = {k: np.concatenate([p[k] for p in parts]) for k in DSRL_KEYS}
    manifest = write_dataset(args.output, merged, args.task, attrs={'merged_from': sources})
    print(f'wrote {args.output}: {manifest["transitions"]} transitions, '
          f'{manifest["trajectories"]} trajectories')
    return 0


def split_paths(prefix, heldout: bool = False) -> tuple:
    """Return the (unlabelled, demonstrations[, held-out]) files of ``split-demos -o PREFIX``."""
    from pathlib import Path

    prefix = Path(prefix)
    names = ('unlabelled', 'demos', 'heldout') if heldout else ('unlabelled', 'demos')
    return tuple(prefix.with_name(f'{prefix.name}-{name}.hdf5') for name in names)


def cmd_split_demos(args) -> int:
    """Write a cost-free unlabelled dataset and the safe demonstrations of a labelled one."""
    from offline_training.data.dataset import COST_LABELS_ATTR, UNLABELLED, write_dataset
    from saferl_ros.dataset_keys import DSRL_KEYS

    path = resolve_dataset_path(args.path, args.task)
    report = check_file(path, task=args.task)
    if report.problems:
        raise DatasetError(report.problems)
    if report.unlabelled:
        print(f'saferl-data: error: {path} has no cost labels ({COST_LABELS_ATTR}='
              f'{UNLABELLED!r}); give the labelled dataset it was split from', file=sys.stderr)
        return EXIT_USER_ERROR
    data = load_dataset(path, task=report.task.name, validate=False)
    try:
        split = split_safe_demos(data, args.kappa, args.num_demos, args.holdout, args.seed)
    except ValueError as err:
        print(f'saferl-data: error: {path}: {err}', file=sys.stderr)
        return EXIT_USER_ERROR
    unlabelled_path, demos_path, heldout_path = split_paths(args.output, heldout=True)
    source = {'path': path.name, 'sha256': sha256_file(path), 'kappa': split.kappa,
              'rule': f'demos: the {len(split.demos)} trajectories of highest reward return '
                      f'among the {split.num_safe} with cost return <= kappa'}
    reward_returns, _, _, _ = trajectory_returns(data)
    parts = [(unlabelled_path, split.unlabelled, 'unlabelled'), (demos_path, split.demos, 'demos')]
    if split.heldout.size:
        parts.append((heldout_path, split.heldout, 'heldout'))
    elif heldout_path.exists():
        heldout_path.unlink()      # a stale held-out file of an earlier split would mislead
    for part_path, indices, role in parts:
        part = select_trajectories(data, indices, DSRL_KEYS)
        attrs = {'split_role': role, 'split_source': source,
                 'source_trajectories': [int(i) for i in indices]}
        if role != 'heldout':
            # The cost labels go: NaN in every row, and the file says so (the data layer
            # accepts NaN costs only in a file that carries this mark). The held-out
            # trajectories keep theirs: they are for evaluation only.
            part['costs'] = np.full(len(part['costs']), np.nan, dtype=np.float32)
            attrs[COST_LABELS_ATTR] = UNLABELLED
        manifest = write_dataset(part_path, part, report.task.name, attrs=attrs)
        returns = reward_returns[indices]
        print(f'wrote {part_path}: {manifest["trajectories"]} trajectories '
              f'({manifest["transitions"]} transitions), reward return '
              f'{returns.min():.1f}..{returns.max():.1f}')
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

    collect = sub.add_parser(
        'collect', help='regenerate a dataset from the committed behaviour agents',
        description='Roll every behaviour-agent checkpoint out (with and without action noise), '
                    'density-filter the trajectories like DSRL and write '
                    'Safety<Task>-v0-<cmax>-<ntraj>.hdf5.')
    collect.add_argument('--task', required=True, help='task name, e.g. BallCircle')
    collect.add_argument('--out', default=None, help='output file (default: DSRL name in '
                                                     '--out-dir)')
    collect.add_argument('--out-dir', default=None, help='default: datasets/ at the repo root')
    collect.add_argument('--seed', type=int, default=0)
    collect.add_argument('--agent-dir', default=None, help='default: behavior_agents/<Task>')
    collect.add_argument('--raw-factor', type=float, default=None,
                         help="raw pool size as a multiple of DSRL's count (default 1.5)")
    collect.add_argument('--episodes-per-setting', type=int, default=None,
                         help='episodes per (checkpoint, noise) pair; overrides --raw-factor')
    collect.set_defaults(func=cmd_collect)

    train = sub.add_parser(
        'train-behavior', help='train or resume the behaviour agents of a task',
        description='PPO-Lagrangian with an annealed cost budget; resumes from '
                    'behavior_agents/<Task>/resume when killed and restarted.')
    train.add_argument('--task', required=True, help='task name, e.g. BallCircle')
    train.add_argument('--steps', type=int, default=None, help='total env steps (default: '
                                                               'the task preset)')
    train.add_argument('--agent-dir', default=None, help='default: behavior_agents/<Task>')
    train.set_defaults(func=cmd_train_behavior)

    merge = sub.add_parser(
        'merge', help='build a retraining dataset from an existing dataset plus recordings',
        description='Concatenate the DSRL keys of an existing dataset and of saferl_ros '
                    'recordings (run folders written by recorder_node, also after a crash, or '
                    'their recording.hdf5) into one validated DSRL file with provenance.')
    merge.add_argument('recordings', nargs='*', help='recorder run folders or HDF5 files')
    merge.add_argument('--dataset', help='existing DSRL dataset to extend')
    merge.add_argument('--task', required=True, help='task name, e.g. BallCircle')
    merge.add_argument('-o', '--output', required=True, help='output HDF5 file')
    merge.set_defaults(func=cmd_merge)

    split = sub.add_parser(
        'split-demos', help='split a labelled dataset into a cost-free set and safe demos (DSPO)',
        description='Choose the safe demonstrations of a labelled dataset (the N trajectories of '
                    'highest reward return among those with cost return <= kappa) and write '
                    'them and every other trajectory as two validated files without cost labels '
                    '(costs NaN, file attribute cost_labels=removed): PREFIX-demos.hdf5 and '
                    'PREFIX-unlabelled.hdf5; with --holdout, a labelled PREFIX-heldout.hdf5 '
                    'for evaluation.')
    split.add_argument('path', help='labelled DSRL-format HDF5 file')
    split.add_argument('--task', help="task name (default: from the file's attributes or name)")
    split.add_argument('--kappa', type=float, required=True,
                       help='cost budget: a demonstration has cost return <= kappa')
    split.add_argument('--num-demos', type=int, default=DEFAULT_NUM_DEMOS,
                       help=f'demonstrations to keep (default {DEFAULT_NUM_DEMOS}; DSPO: 10-15)')
    split.add_argument('--holdout', type=float, default=0.0, metavar='SHARE',
                       help='share of the other trajectories kept out of the unlabelled set, '
                            'with their costs, as PREFIX-heldout.hdf5 (evaluation only; '
                            'default 0)')
    split.add_argument('--seed', type=int, default=0, help='seed of the held-out draw')
    split.add_argument('-o', '--output', required=True, metavar='PREFIX',
                       help='output prefix, e.g. datasets/dspo/BallCircle-k10')
    split.set_defaults(func=cmd_split_demos)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    # A file or name that cannot be used is the user's mistake: exit status 2, as every tool
    # (saferl_ros.errors.EXIT_USER_ERROR). `validate`'s verdict on a readable file is 1.
    try:
        return args.func(args)
    except DatasetError as err:
        print('saferl-data: error: ' + str(err).replace('\n', '\nsaferl-data: error: '),
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyError as err:
        print(f'saferl-data: error: {err.args[0]}', file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as err:
        print(f'saferl-data: error: {err}', file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == '__main__':
    sys.exit(main())
