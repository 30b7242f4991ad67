"""
Calibrate a safety monitor before deployment: a policy shielded at a range of thresholds.

    python -m offline_training.shield_sweep POLICY MONITOR_BUNDLE \
        [--thresholds 0 1 3 5 10] [--seeds 0 1] [--episodes 20] [--kappa 10] -o DIR

Each threshold is one ``saferl-eval POLICY --shield MONITOR_BUNDLE`` with the monitor's
threshold set (a feasibility critic: ``threshold_v`` = ``threshold_q`` = t, the V_h/Q_h level
above which a state or action counts as infeasible; a cost critic: its ``budget`` = t), beside the
policy alone, on every evaluation seed. A larger threshold lets more proposals through. Written
to DIR: ``sweep.json`` (one row per threshold and seed), ``sweep.md`` (the table) and
``sweep.png`` (reward kept and normalised cost against the threshold, one line per seed).

Choose the threshold on one seed and check it on another (``--seeds 0 1``): a threshold picked
on the episodes it is judged by flatters it. The tool suggests the smallest threshold that is safe
(mean normalised cost <= 1 and every episode within the budget) and keeps at least
``--keep`` of the policy's reward on every seed, or says that none does.
"""

import argparse
import json
from pathlib import Path
import sys
from typing import List, Optional, Sequence

import numpy as np
from offline_training.evaluate import evaluate
from offline_training.results import kappa_entry
from saferl_ros.errors import reports_user_errors


def summary_row(results: dict, kappa: float) -> dict:
    """Return the figures of one evaluation at ``kappa``: reward, cost, safe share, replaced."""
    norm = kappa_entry(results['summary']['normalized'], kappa)
    shield = results.get('shield', {})
    return {'reward': norm['reward']['mean'], 'reward_std': norm['reward']['std'],
            'cost': norm['cost']['mean'], 'safe_fraction': norm['safe_fraction'],
            'replaced_share': shield.get('replaced_share', 0.0)}


def sweep(policy, monitor, thresholds: Sequence[float], seeds: Sequence[int], episodes: int,
          kappa: float, progress: bool = True) -> List[dict]:
    """Return one row per (threshold, seed), threshold None being the policy alone."""
    from saferl_ros.bundle import load_bundle
    from saferl_ros.monitor import boundary_at, monitor_config

    kind = load_bundle(monitor).critic_kind
    kappas = sorted({float(kappa), 10.0, 5.0})
    rows = []
    for seed in seeds:
        alone = summary_row(evaluate([policy], episodes, [seed], kappas, progress=progress), kappa)
        rows.append({'threshold': None, 'seed': int(seed), **alone,
                     'reward_kept': 1.0 if alone['reward'] > 0 else None})
        for threshold in thresholds:
            config = monitor_config(boundary_at(kind, threshold))
            results = evaluate([policy], episodes, [seed], kappas, progress=progress,
                               shield=monitor, shield_config=config)
            row = summary_row(results, kappa)
            # None where the policy alone earns nothing: no share of it to keep
            kept = row['reward'] / alone['reward'] if alone['reward'] > 0 else None
            rows.append({'threshold': float(threshold), 'seed': int(seed), **row,
                         'reward_kept': kept})
    return rows


def suggestion(rows: List[dict], keep: float) -> Optional[float]:
    """Return the smallest threshold safe on every seed that keeps ``keep`` of the reward."""
    thresholds = sorted({r['threshold'] for r in rows if r['threshold'] is not None})
    for threshold in thresholds:
        at = [r for r in rows if r['threshold'] == threshold]
        if all(r['cost'] <= 1.0 and r['safe_fraction'] == 1.0 and r['reward_kept'] is not None
               and r['reward_kept'] >= keep for r in at):
            return threshold
    return None


def table(rows: List[dict], kappa: float) -> str:
    """Return the sweep as a markdown table."""
    lines = [f'| threshold | seed | R (κ = {kappa:g}) | C | safe episodes | actions replaced | '
             'reward kept |', '|---:|---:|---|---:|---:|---:|---:|']
    for r in rows:
        name = 'policy alone' if r['threshold'] is None else f'{r["threshold"]:g}'
        kept = '–' if r['reward_kept'] is None else f'{100 * r["reward_kept"]:.0f} %'
        cost = f'**{r["cost"]:.2f}**' if r['cost'] > 1.0 else f'{r["cost"]:.2f}'
        lines.append(f'| {name} | {r["seed"]} | {r["reward"]:.2f} ± {r["reward_std"]:.2f} | '
                     f'{cost} | {100 * r["safe_fraction"]:.0f} % | '
                     f'{100 * r["replaced_share"]:.1f} % | {kept} |')
    return '\n'.join(lines) + '\n'


def plot(rows: List[dict], path: Path, title: str, keep: float) -> None:
    """Plot reward kept and normalised cost against the threshold, one line per seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    for seed in sorted({r['seed'] for r in rows}):
        at = sorted((r for r in rows if r['seed'] == seed and r['threshold'] is not None),
                    key=lambda r: r['threshold'])
        x = [r['threshold'] for r in at]
        ax_r.plot(x, [np.nan if r['reward_kept'] is None else 100 * r['reward_kept']
                      for r in at], 'o-', label=f'seed {seed}')
        ax_c.plot(x, [r['cost'] for r in at], 'o-', label=f'seed {seed}')
        alone = [r for r in rows if r['seed'] == seed and r['threshold'] is None][0]
        ax_c.axhline(alone['cost'], ls=':', color=ax_c.lines[-1].get_color(),
                     label=f'policy alone, seed {seed}')
    ax_r.axhline(100 * keep, ls='--', color='grey', label=f'{100 * keep:.0f} % goal')
    ax_c.axhline(1.0, ls='--', color='grey', label='budget (normalised cost 1)')
    ax_r.set(xlabel='monitor threshold', ylabel="reward kept (% of the policy's own)")
    ax_c.set(xlabel='monitor threshold', ylabel='normalised cost')
    for ax in (ax_r, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@reports_user_errors('shield_sweep')
def main(argv=None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('policy', help='a bundle or a saferl-train run folder')
    parser.add_argument('monitor', help='the monitor bundle (its critics judge every action)')
    parser.add_argument('--thresholds', type=float, nargs='+', default=[0, 1, 3, 5, 10])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--episodes', type=int, default=20)
    parser.add_argument('--kappa', type=float, default=10.0)
    parser.add_argument('--keep', type=float, default=0.8,
                        help='reward share to keep for the suggestion (default 0.8)')
    parser.add_argument('-o', '--out', required=True, help='output folder')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    if args.episodes < 1 or not all(np.isfinite(args.thresholds)):
        parser.error('--episodes must be >= 1 and --thresholds finite numbers')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep(args.policy, args.monitor, args.thresholds, args.seeds, args.episodes,
                 args.kappa, progress=not args.no_progress)
    best = suggestion(rows, args.keep)
    report = {'policy': str(args.policy), 'monitor': str(args.monitor),
              'episodes': args.episodes, 'kappa': args.kappa, 'keep': args.keep,
              'suggested_threshold': best, 'rows': rows}
    (out / 'sweep.json').write_text(json.dumps(report, indent=1, allow_nan=False) + '\n')
    text = table(rows, args.kappa)
    (out / 'sweep.md').write_text(
        f'`python -m offline_training.shield_sweep {args.policy} {args.monitor} --thresholds '
        f'{" ".join(f"{t:g}" for t in args.thresholds)} --seeds '
        f'{" ".join(map(str, args.seeds))} --episodes {args.episodes} --kappa {args.kappa:g}`'
        f'\n\n{text}')
    plot(rows, out / 'sweep.png', f'{Path(args.policy).name} shielded by '
         f'{Path(args.monitor).name}', args.keep)
    print(text)
    if best is None:
        print(f'no threshold is safe on every seed while keeping {100 * args.keep:.0f} % of the '
              'reward; widen --thresholds or improve the critics')
    else:
        print(f'suggested threshold: {best:g} (the smallest that is safe on every seed and keeps '
              f'{100 * args.keep:.0f} % of the reward); set it as threshold_v '
              'and threshold_q (or budget)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
