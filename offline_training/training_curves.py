"""
Plot TensorBoard scalars of saferl-train runs side by side (one panel per scalar).

    python -m offline_training.training_curves runs/fisor-BallCircle-s0 runs/fisor-CarCircle-s0 \
        --tags value/feasible_fraction value/v_h_mean -o docs/img/results/fisor-training.png

Reads the run folders' ``tb/`` event files (every session of a resumed run), so no TensorBoard
server is needed. Each curve is labelled with the run folder's name.

With ``--eval`` it draws the evaluations made during training (``saferl-train --eval-every K``,
``RUN/eval_curve.csv``): normalised reward and cost against training steps and training CPU time,
mean +- std over the evaluation episodes, with the cost threshold (C_norm = 1) marked::

    python -m offline_training.training_curves --eval runs/fisor-BallCircle-s0 -o curve.png
"""

import argparse
from pathlib import Path
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from saferl_ros.errors import UserError

DEFAULT_TAGS = ('value/feasible_fraction', 'value/v_h_mean', 'weights/zero_fraction',
                'loss/actor')


def read_scalars(run_dir, tags: Sequence[str]) -> Dict[str, List[Tuple[int, float]]]:
    """Return {tag: [(step, value), ...]} of one run, sorted by step, later sessions winning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = Path(run_dir) / 'tb'
    if not tb.is_dir():
        raise FileNotFoundError(f'{run_dir}: no tb/ folder (is it a saferl-train run folder?)')
    out: Dict[str, Dict[int, float]] = {tag: {} for tag in tags}
    for events in sorted(tb.glob('events.out.tfevents.*')):   # one file per session, in order
        acc = EventAccumulator(str(events), size_guidance={'scalars': 0})
        acc.Reload()
        available = set(acc.Tags().get('scalars', []))
        for tag in tags:
            if tag in available:
                out[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in out.items()}


def _save(fig, out) -> Path:
    """Write ``fig`` as a PNG (creating the folder), close it and return the path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_runs(run_dirs: Sequence, tags: Sequence[str], out, title: str = '',
              labels: Optional[Sequence[str]] = None) -> Path:
    """Draw one panel per tag with one curve per run (labelled by folder name); return the PNG."""
    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f'{len(labels)} labels for {len(run_dirs)} runs')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4), squeeze=False)
    for run_dir, label in zip(run_dirs, labels):
        scalars = read_scalars(run_dir, tags)
        for ax, tag in zip(axes[0], tags):
            if scalars[tag]:
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, lw=1.2, label=label)
    for ax, tag in zip(axes[0], tags):
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def plot_eval_curves(run_dirs: Sequence, out, title: str = '',
                     labels: Optional[Sequence[str]] = None) -> Path:
    """Draw normalised reward and cost against steps and CPU time for each run; return the PNG."""
    from offline_training.periodic_eval import CURVE, read_curve
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from offline_training.runs import CONFIG, LOAD_FIX
    from saferl_ros.errors import read_yaml_mapping, require_field
    from saferl_ros.tasks import get_task, normalized_score

    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f'{len(labels)} labels for {len(run_dirs)} runs')
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.0), squeeze=False)
    for run_dir, label in zip(run_dirs, labels):
        if not (Path(run_dir) / CURVE).is_file():
            raise FileNotFoundError(f'{run_dir}: no {CURVE} (train with --eval-every K)')
        rows = read_curve(run_dir)
        if not rows:
            raise ValueError(f'{run_dir}: {CURVE} has no rows yet')
        config_file = Path(run_dir) / CONFIG
        task = require_field(read_yaml_mapping(config_file, LOAD_FIX), 'task', str(config_file),
                             dict, LOAD_FIX)
        spec = get_task(require_field(task, 'name', str(config_file), str, LOAD_FIX))
        x_axes = {'steps': [r['step'] for r in rows],
                  'CPU hours': [r['train_cpu_s'] / 3600 for r in rows]}
        for column, (x_name, xs) in enumerate(x_axes.items()):
            for row_index, kind in enumerate(('reward', 'cost')):
                ax = axes[row_index][column]
                mean = np.array([r[f'{kind}_mean'] for r in rows])
                std = np.array([r[f'{kind}_std'] for r in rows])
                kappa = rows[-1]['kappa']
                index = 0 if kind == 'reward' else 1
                lo = normalized_score(spec, mean - std, mean - std, kappa)[index]
                hi = normalized_score(spec, mean + std, mean + std, kappa)[index]
                line, = ax.plot(xs, [r[f'normalized_{kind}'] for r in rows], lw=1.4,
                                marker='o', ms=3, label=label)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
                if kind == 'cost':
                    ax.axhline(1.0, color='tab:red', lw=0.8, ls='--')
                ax.set_xlabel(f'training {x_name}')
                ax.set_ylabel(f'normalised {kind}' + (f' (kappa {kappa:g})'
                                                      if kind == 'cost' else ''))
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or 'evaluation during training (mean +- std over episodes; '
                 'dashed: cost threshold)', fontsize=10)
    return _save(fig, out)


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('runs', nargs='+', help='saferl-train run folders')
    parser.add_argument('--tags', nargs='+', default=list(DEFAULT_TAGS),
                        help=f'scalars to plot (default {" ".join(DEFAULT_TAGS)})')
    parser.add_argument('-o', '--out', required=True, help='PNG file')
    parser.add_argument('--title', default='')
    parser.add_argument('--labels', nargs='+', default=None,
                        help='legend entries, one per run (default: the folder names)')
    parser.add_argument('--eval', action='store_true',
                        help='plot the evaluations during training (eval_curve.csv) instead')
    args = parser.parse_args(argv)
    try:
        if args.eval:
            out = plot_eval_curves(args.runs, args.out, args.title, args.labels)
        else:
            out = plot_runs(args.runs, args.tags, args.out, args.title, args.labels)
    except (FileNotFoundError, ValueError, UserError) as exc:
        print(f'training_curves: {exc}', file=sys.stderr)
        return 2
    print(f'training_curves: wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
