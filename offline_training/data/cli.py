"""
``saferl-data``: inspect, validate and plot DSRL-format datasets.

Examples::

    saferl-data info datasets/SafetyBallCircle-v0-80-886.hdf5
    saferl-data validate recording.hdf5 --task BallCircle   # exit 1 and a list of problems if bad
    saferl-data plot datasets/SafetyBallCircle-v0-80-886.hdf5 -o ballcircle.png
    saferl-data collect --task BallCircle               # regenerate from behavior_agents/
    saferl-data train-behavior --task BallCircle        # (re)train the behaviour agents
    saferl-data merge recordings/demo/run_* --dataset old.hdf5 --task BallCircle -o new.hdf5
    saferl-data reshape new.hdf5 --task BallCircle --kappa 20 -o reshaped.hdf5   # OASIS
    saferl-data tempting datasets/SafetyBallCircle-v0-80-959.hdf5 --task BallCircle -o t.hdf5
    saferl-data split-demos datasets/SafetyBallCircle-v0-80-886.hdf5 --kappa 10 \
        -o datasets/dspo/BallCircle-k10    # cost-free unlabelled set + 12 safe demonstrations
"""

import argparse
import os
from pathlib import Path
import sys
from typing import List, Optional

import numpy as np

from offline_training.data.dataset import (check_file, DatasetError, describe_generated,
                                           file_generated_info, load_dataset, Problem,
                                           resolve_dataset_path, validate_arrays, write_dataset)
from offline_training.data.plot import plot_returns
from offline_training.data.trajectories import (DEFAULT_NUM_DEMOS, select_trajectories,
                                                split_safe_demos, trajectory_returns)
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import ConfigError, reports_user_errors
from saferl_ros.files import atomic_write_json, sha256_file
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
    origin = describe_generated(report.generated) if report.generated \
        else 'collected (no generated mark)'
    print(f'origin       {origin}')
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
    output = Path(args.output)
    if output.suffix.lower() != '.png':
        raise ConfigError(f'{output}: the plot is a PNG image; give -o a name ending in .png')
    if output.is_dir() or (output.exists() and not output.is_file()):
        # checked before the dataset is read, and named, not left to an errno from matplotlib
        raise ConfigError(f'-o {output}: exists and is not a regular file; give a new .png '
                          'file name')
    path, data, report = _load(args)
    out = plot_returns(data, output, task=report.task)
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
    items = ([args.dataset] if args.dataset else []) + list(args.recordings)
    if not items:
        raise ConfigError('nothing to merge; give --dataset and/or recordings')
    out = _refuse_existing(args.output)
    parts, sources, generated = [], [], []
    for item in items:
        path = Path(item)
        if path.is_dir():   # a recorder run folder: its completed episodes (also after a crash)
            data = _load_recording(path, args.task)
        else:
            data = load_dataset(path, task=args.task, keys=DSRL_KEYS)
            if file_generated_info(path) is not None:
                generated.append(str(path))
        parts.append(data)
        sources.append({'path': str(path), 'transitions': int(len(data['observations'])),
                        **({'sha256': sha256_file(path)} if path.is_file() else {})})
        print(f'{path}: {len(data["observations"])} transitions')
    merged = {k: np.concatenate([p[k] for p in parts]) for k in DSRL_KEYS}
    attrs = {'merged_from': sources}
    if generated:   # generated transitions stay marked as such
        attrs.update({'generated': True, 'generator': 'merge of ' + ', '.join(generated),
                      'source_sha256': ','.join(s.get('sha256', '') for s in sources),
                      'mode': 'mix'})
    manifest = _write_output(out, merged, args.task, attrs=attrs)
    print(f'wrote {out}: {manifest["transitions"]} transitions, '
          f'{manifest["trajectories"]} trajectories')
    return 0


def _refuse_existing(output) -> Path:
    """
    Return the output path of a command that writes a dataset; refuse one that exists.

    No command overwrites a file (or folder) it did not make; a missing parent folder is
    created when the file is written, as `write_dataset` does, but a parent that is a file is
    refused here.
    """
    out = Path(output)
    if out.exists() or out.is_symlink():
        raise ConfigError(f'{out}: already exists; remove it or choose another -o')
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f'{out}: {parent} is not a folder; choose another -o')
    return out


def _write_output(out: Path, arrays, task, attrs) -> dict:
    """`write_dataset`, with a file system that refuses the file reported as the user's error."""
    try:
        return write_dataset(out, arrays, task, attrs=attrs)
    except OSError as err:
        if isinstance(err, DatasetError) or err.errno is None:
            raise
        raise ConfigError(f'{out}: cannot be written ({os.strerror(err.errno)}); choose an -o '
                          'in a folder you can write to') from None


def _load_recording(path: Path, task) -> dict:
    """Return the DSRL arrays of a recorder run folder, checked like a dataset file."""
    # The recorder's reader (numpy + h5py, no ROS): the completed episodes the index lists,
    # only the DSRL keys, each file checked (saferl_ros.hdf5_limits) before it is read.
    from saferl_ros.recorder import load_episodes, read_index

    # the run's own task first: BallCircle and CarCircle (BallRun and CarRun) share their shapes
    index = read_index(path)
    recorded = index['task']
    given = get_task(task).name if task is not None else recorded
    if recorded != given:
        raise DatasetError([Problem(str(path), 'task', f'index.json says the run recorded task '
                                                       f'{recorded[:60]!r} but {given} was '
                                                       f'given; pass --task {recorded[:60]} or '
                                                       'leave this run out')])
    data = load_episodes(path, keys=DSRL_KEYS, index=index)
    problems = validate_arrays(data, task, source=str(path))
    if problems:
        raise DatasetError(problems)
    return data


def _load_source(item, task):
    """Return (DSRL arrays, {'path', 'sha256', 'kind'}) of a dataset file or a recording."""
    path = Path(item)
    if path.is_dir():
        data = _load_recording(path, task)
        from offline_training.algos.oasis import arrays_sha256
        return data, {'path': str(path), 'sha256': arrays_sha256(data), 'kind': 'recording'}
    path = resolve_dataset_path(path, task)
    if file_generated_info(path) is not None:
        raise DatasetError([Problem(str(path), 'generated', 'is generated data, not collected; '
                                                            'give the collected dataset or '
                                                            'recording it came from')])
    data = load_dataset(path, task=task, keys=DSRL_KEYS)
    if np.isnan(np.asarray(data['costs'])).any():
        why = ('holds no cost labels (a cost-free split-demos file); OASIS needs them: give '
               'the labelled dataset')
        raise DatasetError([Problem(str(path), 'costs', why)])
    return data, {'path': str(path), 'sha256': sha256_file(path), 'kind': 'file'}


def _generator_config(args, spec):
    from offline_training.algos import oasis
    from offline_training.overrides import parse_override

    overrides = dict(parse_override(text) for text in args.overrides)
    overrides['kappa'] = args.kappa
    if args.steps is not None:
        overrides['steps'] = args.steps
    if args.starts is not None:
        overrides['num_starts'] = args.starts
    if args.start_states is not None:
        overrides['start_states'] = args.start_states
    if args.condition:
        overrides['conditions'] = [tuple(c) for c in args.condition]
    return oasis.resolve_generator_config(oasis.make_generator_config(args.preset, **overrides),
                                          spec)


def _condition(text):
    try:
        reward, cost = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected REWARD,COST (e.g. 600,10), got {text!r}')
    return reward, cost


def cmd_reshape(args) -> int:
    """OASIS: train (or load) a generator, generate toward cost <= kappa, label, write."""
    from dataclasses import replace

    from offline_training.algos import oasis
    from offline_training.algos.infrastructure import keep_freed_memory, resolve_device

    keep_freed_memory()    # speed only: the generator's training step re-allocates MB tensors
    spec = get_task(args.task)
    if not args.kappa > 0:
        raise ConfigError(f'--kappa must be > 0 (a cost budget), got {args.kappa:g}')
    if args.starts is not None and args.starts < 1:
        raise ConfigError(f'--starts must be >= 1, got {args.starts}')
    out = _refuse_existing(args.output)
    device = resolve_device(args.device)
    data, source = _load_source(args.source, spec.name)
    print(f'source       {source["path"]} ({source["kind"]}, {len(data["observations"])} '
          f'transitions, sha256 {source["sha256"][:12]}...)')
    generator_path = Path(args.generator) if args.generator else Path(str(out) + '.generator.pt')
    config = _generator_config(args, spec)
    model, info = None, None
    if generator_path.exists():
        model, saved, record = oasis.load_generator(generator_path, device)
        if record['task'] != spec.name or record['source_sha256'] != source['sha256']:
            raise ConfigError(f'{generator_path}: trained for {record["task"]} on data sha256 '
                              f'{str(record["source_sha256"])[:12]}..., not this {spec.name} '
                              'source; remove it (or give another --generator) to retrain')
        # The trained shapes are the file's; generation settings come from this command.
        # (pin_first_state stays the file's: a generator trained with the pin needs it.)
        config = replace(saved, kappa=config.kappa, num_starts=config.num_starts,
                         start_states=config.start_states, conditions=config.conditions,
                         guidance=config.guidance, sample_batch=config.sample_batch)
        info = record['info']
        # a training state left by a run killed between saving the generator and removing it
        Path(str(generator_path) + '.partial').unlink(missing_ok=True)
        print(f'generator    loaded {generator_path}')
    else:
        # Training keeps its state beside the generator file, so that an interrupted reshape
        # (Ctrl-C, a lost machine) resumes rather than restarts.
        partial = Path(str(generator_path) + '.partial')
        resumed = (f', resuming from {partial}' if partial.exists() else
                   f', state kept in {partial} every {oasis.GENERATOR_CHECKPOINT_EVERY} steps')
        print(f'generator    training ({args.preset} preset, {config.steps} steps) -> '
              f'{generator_path}{resumed}')
        generator_path.parent.mkdir(parents=True, exist_ok=True)
        model, info = oasis.fit(data, config, device, args.seed, progress=not args.no_progress,
                                checkpoint=partial)
        oasis.save_generator(generator_path, model, config, spec.name, source['sha256'], info)
        partial.unlink(missing_ok=True)
    arrays, attrs, report = oasis.reshape(data, spec, config, source, model, info,
                                          args.mode, device, args.seed,
                                          progress=not args.no_progress)
    # The report (per-condition returns, label error, timings) and its picture, beside the
    # file and before it: a written dataset means a complete step (the grid relies on it).
    _print_reshape_summary(data, report, spec)
    atomic_write_json(Path(str(out) + '.report.json'), report)
    from offline_training.data.plot import plot_generation
    png = plot_generation(data, report, Path(str(out) + '.conditions.png'), spec.name,
                          config.kappa)
    print(f'report       {out}.report.json, plot {png}')
    manifest = _write_output(out, arrays, spec.name, attrs=attrs)
    print(f'wrote {out}: {manifest["transitions"]} transitions ({args.mode}: '
          f'{report["generated_transitions"]} generated), marked generated; train with '
          f'`saferl-train oasis --task {spec.name} --dataset {out}`')
    return 0


def _print_reshape_summary(data, report, spec) -> None:
    labels = report['fit'].get('labels') or {}
    if labels:
        print(f'labels       held-out {labels["held_out_transitions"]} transitions: reward MAE '
              f'{labels["reward_mae"]:.4f} (std {labels["reward_std"]:.4f}, MAE of the mean '
              f'{labels["reward_mae_of_mean"]:.4f}); cost accuracy '
              f'{labels["cost_accuracy"]:.4f} (cost rate {labels["cost_rate"]:.4f})')
    horizon = spec.horizon
    raw_r = float(np.mean(data['rewards'])) * horizon
    raw_c = float(np.mean(data['costs'])) * horizon
    print(f'generated returns against the conditions (episode-equivalent = per-step label '
          f'x horizon {horizon}; raw data: reward {raw_r:.1f}, cost {raw_c:.1f}); '
          f'{report["generation_s"]:.1f} s')
    print(f'  {"condition R":>12} {"condition C":>12} {"gen. R":>10} {"gen. C":>10} '
          f'{"windows":>8}')
    for row in report['conditions']:
        print(f'  {row["reward_condition"]:12.1f} {row["cost_condition"]:12.1f} '
              f'{row["reward_per_step"] * horizon:10.1f} {row["cost_per_step"] * horizon:10.1f} '
              f'{row["windows"]:8d}')


def cmd_tempting(args) -> int:
    """Build OASIS's 'tempting' variant: drop most trajectories of low cost return."""
    from offline_training.data.trajectories import split_trajectories

    spec = get_task(args.task)
    if not 0.0 <= args.remove_ratio <= 1.0:
        raise ConfigError(f'--remove-ratio must lie in [0, 1], got {args.remove_ratio:g}')
    if not np.isfinite(args.cost_min) or np.isnan(args.cost_max):
        # NaN compares false with everything: the command would remove nothing and say done
        raise ConfigError(f'--cost-min must be a finite number and --cost-max a number (inf '
                          f'for no upper bound), got {args.cost_min:g} and {args.cost_max:g}')
    if args.cost_max < args.cost_min:
        raise ConfigError(f'--cost-max ({args.cost_max:g}) is below --cost-min '
                          f'({args.cost_min:g})')
    out = _refuse_existing(args.output)
    data, source = _load_source(args.source, spec.name)
    rng = np.random.default_rng(args.seed)
    keep = []
    removed = 0
    for traj in split_trajectories(data):
        if args.cost_min <= traj.cost_return <= args.cost_max and rng.random() < args.remove_ratio:
            removed += 1
            continue
        keep.append(np.arange(traj.start, traj.stop))
    if not keep:
        raise ConfigError('every trajectory was removed; lower --remove-ratio')
    index = np.concatenate(keep)
    subset = {k: np.asarray(data[k])[index] for k in DSRL_KEYS}
    # the source's name and sha256, not its path: the same data gives the same file anywhere
    attrs = {'tempting_from': Path(source['path']).name,
             'tempting_from_sha256': source['sha256'],
             'tempting': {'cost_min': args.cost_min, 'cost_max': args.cost_max,
                          'remove_ratio': args.remove_ratio, 'seed': args.seed,
                          'removed_trajectories': removed}}
    manifest = _write_output(out, subset, spec.name, attrs=attrs)
    rewards, costs, _, _ = trajectory_returns(subset)
    print(f'removed {removed} trajectories with cost return in [{args.cost_min:g}, '
          f'{args.cost_max:g}]; kept {manifest["trajectories"]} '
          f'({np.mean(costs <= args.cost_max):.1%} of them within {args.cost_max:g})')
    print(f'wrote {out}: {manifest["transitions"]} transitions')
    return 0


def cmd_subset(args) -> int:
    """Keep whole trajectories drawn at random until a share (or a count) of the transitions."""
    import h5py

    from offline_training.data.dataset import (COST_LABELS_ATTR, GENERATED_ATTR,
                                               generated_info, is_unlabelled, UNLABELLED)
    from offline_training.data.trajectories import split_trajectories

    spec = get_task(args.task)
    if (args.fraction is None) == (args.transitions is None):
        raise ConfigError('give exactly one of --fraction and --transitions')
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise ConfigError(f'--fraction must lie in (0, 1], got {args.fraction:g}')
    if args.transitions is not None and args.transitions < 1:
        raise ConfigError(f'--transitions must be >= 1, got {args.transitions}')
    out = _refuse_existing(args.output)
    path = resolve_dataset_path(Path(args.source), spec.name)
    data = load_dataset(path, task=spec.name, keys=DSRL_KEYS)
    with h5py.File(path, 'r') as h5:
        generated, unlabelled = generated_info(h5.attrs), is_unlabelled(h5.attrs)
    total = len(data['observations'])
    wanted = args.transitions if args.transitions is not None else int(
        np.ceil(args.fraction * total))
    if wanted > total:
        raise ConfigError(f'--transitions {wanted} is more than {path} holds ({total})')
    trajectories = split_trajectories(data)
    order = np.random.default_rng(args.seed).permutation(len(trajectories))
    keep, count = [], 0
    for i in order:            # whole trajectories, so that every kept episode is complete
        if count >= wanted:
            break
        keep.append(i)
        count += trajectories[i].length
    keep.sort()                # in the source's order
    index = np.concatenate([np.arange(trajectories[i].start, trajectories[i].stop) for i in keep])
    subset = {k: np.asarray(data[k])[index] for k in DSRL_KEYS}
    attrs = {'subset_of': path.name, 'subset_of_sha256': sha256_file(path),
             'subset': {'fraction': args.fraction, 'transitions': args.transitions,
                        'seed': args.seed, 'trajectories': len(keep)}}
    if generated is not None:      # a share of generated data is still generated data
        attrs.update({GENERATED_ATTR: True, **generated})
    if unlabelled:                 # and a share of a cost-free file is still cost-free
        attrs[COST_LABELS_ATTR] = UNLABELLED
    manifest = _write_output(out, subset, spec.name, attrs=attrs)
    kept = manifest['transitions']
    print(f'kept {len(keep)} of {len(trajectories)} trajectories at random (seed {args.seed}): '
          f'{kept} of {total} transitions ({kept / total:.1%})'
          + ('; generated data, marked so' if generated is not None else ''))
    print(f'wrote {out}')
    return 0


def split_paths(prefix, heldout: bool = False) -> tuple:
    """Return the (unlabelled, demonstrations[, held-out]) files of ``split-demos -o PREFIX``."""
    prefix = Path(prefix)
    names = ('unlabelled', 'demos', 'heldout') if heldout else ('unlabelled', 'demos')
    return tuple(prefix.with_name(f'{prefix.name}-{name}.hdf5') for name in names)


def cmd_split_demos(args) -> int:
    """Write a cost-free unlabelled dataset and the safe demonstrations of a labelled one."""
    from offline_training.data.dataset import COST_LABELS_ATTR, UNLABELLED

    outputs = [_refuse_existing(p) for p in split_paths(args.output, heldout=True)]
    path = resolve_dataset_path(args.path, args.task)
    report = check_file(path, task=args.task)
    if report.problems:
        raise DatasetError(report.problems)
    if report.unlabelled:
        raise ConfigError(f'{path} has no cost labels ({COST_LABELS_ATTR}={UNLABELLED!r}); give '
                          'the labelled dataset it was split from')
    data = load_dataset(path, task=report.task.name, validate=False, keys=DSRL_KEYS)
    try:
        split = split_safe_demos(data, args.kappa, args.num_demos, args.holdout, args.seed)
    except ValueError as err:
        raise ConfigError(f'{path}: {err}') from None
    unlabelled_path, demos_path, heldout_path = outputs
    source = {'path': path.name, 'sha256': sha256_file(path), 'kappa': split.kappa,
              'rule': f'demos: the {len(split.demos)} trajectories of highest reward return '
                      f'among the {split.num_safe} with cost return <= kappa'}
    reward_returns, _, _, _ = trajectory_returns(data)
    parts = [(unlabelled_path, split.unlabelled, 'unlabelled'), (demos_path, split.demos, 'demos')]
    if split.heldout.size:
        parts.append((heldout_path, split.heldout, 'heldout'))
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
        manifest = _write_output(part_path, part, report.task.name, attrs=attrs)
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

    reshape = sub.add_parser(
        'reshape', help='OASIS: reshape a dataset or recording toward cost <= kappa',
        description="Train (or load) OASIS's conditional diffusion generator, inverse dynamics "
                    'and reward/cost labellers on a dataset or a recorder run folder, generate '
                    'state windows under cost conditions <= kappa, label them and write a DSRL '
                    'file marked as generated (train on it with saferl-train oasis).')
    reshape.add_argument('source', help='DSRL HDF5 file or saferl_ros recording folder')
    reshape.add_argument('--task', required=True, help='task name, e.g. BallCircle')
    reshape.add_argument('--kappa', type=float, default=20.0, help='cost budget (default 20)')
    reshape.add_argument('-o', '--output', required=True, help='output HDF5 file (must not exist)')
    reshape.add_argument('--preset', default='paper', help="'paper', 'cpu' or 'test'")
    reshape.add_argument('--generator', default=None,
                         help='generator file: loaded if it exists, else trained and saved '
                              'there (default OUTPUT.generator.pt)')
    reshape.add_argument('--mode', choices=('replace', 'mix'), default='replace',
                         help="'replace' (OASIS): only generated data; 'mix': raw + generated")
    reshape.add_argument('--condition', action='append', type=_condition, default=[],
                         metavar='REWARD,COST', help='a generation condition (episode returns); '
                         'repeat; default: the official ones for the task')
    reshape.add_argument('--steps', type=int, default=None, help='generator training steps')
    reshape.add_argument('--starts', type=int, default=None, help='start states per condition')
    reshape.add_argument('--start-states', default=None, metavar='{data,training}',
                         help="where the start states come from: 'data' (default, the official "
                              "code: any state of the data) or 'training' (as the generator's "
                              'training windows: trajectories weighted by max(70 - C, 0))')
    reshape.add_argument('--set', dest='overrides', action='append', default=[],
                         metavar='KEY=VALUE', help='override an OASIS config field')
    reshape.add_argument('--seed', type=int, default=0)
    reshape.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda[:i]'")
    reshape.add_argument('--no-progress', action='store_true', help='hide the progress bars')
    reshape.set_defaults(func=cmd_reshape)

    tempting = sub.add_parser(
        'tempting', help="build OASIS's 'tempting' variant of a dataset",
        description='Remove a share of the trajectories whose cost return lies in [cost-min, '
                    'cost-max] (OASIS: 90 % of those in [0, 30]), so rewarding but unsafe '
                    'behaviour dominates; the kept transitions are collected data.')
    tempting.add_argument('source', help='DSRL HDF5 file or saferl_ros recording folder')
    tempting.add_argument('--task', required=True, help='task name, e.g. BallCircle')
    tempting.add_argument('-o', '--output', required=True, help='output HDF5 file')
    tempting.add_argument('--cost-min', type=float, default=0.0)
    tempting.add_argument('--cost-max', type=float, default=30.0)
    tempting.add_argument('--remove-ratio', type=float, default=0.9)
    tempting.add_argument('--seed', type=int, default=0)
    tempting.set_defaults(func=cmd_tempting)
    subset = sub.add_parser(
        'subset', help='keep a random share of the trajectories of a dataset',
        description='Keep whole trajectories drawn at random until at least --fraction of the '
                    "transitions (or --transitions of them) are kept, e.g. OASIS's data-"
                    'efficiency check. A generated or cost-free source stays marked so.')
    subset.add_argument('source', help='DSRL HDF5 file (collected, generated or cost-free)')
    subset.add_argument('--task', required=True, help='task name, e.g. BallCircle')
    subset.add_argument('-o', '--output', required=True, help='output HDF5 file')
    subset.add_argument('--fraction', type=float, default=None,
                        help='share of the transitions to keep, in (0, 1]')
    subset.add_argument('--transitions', type=int, default=None,
                        help='number of transitions to keep (at least; whole trajectories)')
    subset.add_argument('--seed', type=int, default=0, help='seed of the draw')
    subset.set_defaults(func=cmd_subset)
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


@reports_user_errors('saferl-data', expected=(DatasetError, KeyError))
def main(argv: Optional[List[str]] = None) -> int:
    """
    Run the CLI; return the exit code.

    A file, folder or name that cannot be used is the user's mistake: one line per problem
    (``saferl-data: error: ...``) and exit status 2, as every tool (saferl_ros.errors). A
    dataset's problems (DatasetError), a recording's (RecordingError, a UserError) and path
    errors (PATH_ERRORS) are reported so. `validate`'s verdict on a readable file is 1.
    """
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
