"""
The report of a saferl-loop folder: ``report.md`` and ``report.png``, from what is on disk.

Deployment figures come from the recordings themselves, one HDF5 file per episode
(saferl_ros.recorder): the episode's reward and cost are the sums of its ``rewards`` and
``costs``; the monitor's interventions are the steps whose ``replaced`` flag is set (the monitor
applied its fallback instead of the controller's proposal), and the steps it judged unsafe but
kept (no fallback was strictly safer) are those whose ``verdicts`` code is INTERVENING or
RECOVERY without ``replaced``. Evaluation figures come from each iteration's saferl-eval results
(DSRL-normalised reward, and cost at kappa 5 and 10). Both files are rewritten after every stage
(atomically), so they show the loop as far as it has run.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

import h5py
import numpy as np
from offline_training.results import kappa_entry
from saferl_ros.files import atomic_path, atomic_write_text
from saferl_ros.monitor import FALLBACK_STATES, MonitorState
from saferl_ros.recorder import read_index

REPORT_MD = 'report.md'
REPORT_PNG = 'report.png'
KAPPAS = (5, 10)
# Monitor states whose action is the configured safe action, not judged by a critic.
SAFE_ACTION_STATES = (MonitorState.STALE, MonitorState.FAULT, MonitorState.INACTIVE)


def recorded_episodes(recording) -> List[dict]:
    """
    Return one dict per completed episode of a recorder run folder.

    Keys: ``steps``, ``reward`` and ``cost`` (the episode's sums), ``replaced`` (steps whose
    action the monitor replaced), ``kept`` (judged unsafe, proposal kept), ``safe_action``
    (STALE, FAULT or INACTIVE: the safe action), ``missed`` (lock-step deadline misses).
    """
    recording = Path(recording)
    rows = []
    for entry in read_index(recording)['episodes']:
        with h5py.File(recording / entry['file'], 'r') as h5:
            verdicts = h5['verdicts'][()]
            replaced = h5['replaced'][()].astype(bool)
            judged = np.isin(verdicts, [int(s) for s in FALLBACK_STATES])
            rows.append({
                'episode': int(entry['episode']), 'steps': int(verdicts.size),
                'reward': float(np.sum(h5['rewards'][()], dtype=np.float64)),
                'cost': float(np.sum(h5['costs'][()], dtype=np.float64)),
                'replaced': int(replaced.sum()), 'kept': int((judged & ~replaced).sum()),
                'safe_action': int(np.isin(verdicts, [int(s) for s in SAFE_ACTION_STATES])
                                   .sum()),
                'missed': int(h5['missed'][()].sum()) if 'missed' in h5 else 0})
    return rows


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return '–'
    return f'{values.mean():.2f} ± {values.std():.2f}'


def _count(episodes) -> str:
    return f'{episodes} episode' + ('' if episodes == 1 else 's')


def _share(part: int, whole: int) -> str:
    return f'{100 * part / whole:.1f} % ({part} of {whole})' if whole else '–'


def iterations(out: Path, state: dict) -> List[dict]:
    """Return per iteration what the finished stages left: episodes, dataset, evaluation."""
    stages = state.get('stages', {})
    count = max([int(key.split('/')[0].split('-')[1]) + 1 for key in stages] +
                [state.get('config', {}).get('iterations', 0)])
    rows = []
    for k in range(count):
        row: Dict[str, Optional[object]] = {'iteration': k}
        for stage in ('deploy', 'merge', 'train', 'evaluate', 'export'):
            row[stage] = stages.get(f'iter-{k}/{stage}')
        row['episodes'] = (recorded_episodes(out / row['deploy']['recordings'])
                           if row['deploy'] else None)
        row['spread'] = evaluation_spread(out, row['evaluate'])
        rows.append(row)
    return rows


def evaluation_spread(out: Path, evaluation: Optional[dict]) -> Optional[dict]:
    """
    Return the standard errors of an evaluation's means, from its results file.

    {'reward': SE, 'cost_k5': SE, 'cost_k10': SE, 'episodes': n}, SE = std / sqrt(n) over the
    evaluation episodes; None when there is no readable results file (the report then shows
    the means alone).
    """
    if not evaluation or 'results' not in evaluation:
        return None
    try:
        summary = json.loads((out / evaluation['results']).read_text())['summary']
        n = int(summary['episodes'])
        root_n = np.sqrt(max(n, 1))
        spread = {'episodes': n, 'reward': kappa_entry(summary['normalized'], KAPPAS[0])
                  ['reward']['std'] / root_n}
        for kappa in KAPPAS:
            spread[f'cost_k{kappa}'] = kappa_entry(summary['normalized'], kappa)['cost']['std'] \
                / root_n
        return spread
    except (OSError, ValueError, KeyError, TypeError):
        return None


def markdown(out: Path, state: dict, rows: List[dict]) -> str:
    """Return report.md's text."""
    config = state.get('config', {})
    done, total = len(state.get('stages', {})), len(rows) * 5
    monitor = config.get('monitor_bundle') or "each deployed bundle's own critics"
    steps = config.get('train_steps') or f"the {config.get('preset')} preset's"
    # the file's name alone when it lies outside the loop's folder tree: a report names no
    # folder of the machine that wrote it
    base = str(state.get('base_dataset'))
    base = Path(base).name if Path(base).is_absolute() else base
    horizon = config.get('deploy_horizon')
    horizon = f'{horizon} steps' if horizon else 'the task horizon'
    lines = [
        f'# saferl-loop: {Path(config.get("output", out)).name}', '',
        f'Task {config.get("task")}, algorithm {config.get("algorithm")} (preset '
        f'{config.get("preset")}, {steps} training steps per iteration, seed '
        f'{config.get("seed")}). Iteration 0 deploys `{config.get("start_bundle")}`; every '
        f'deployment is monitored by `{monitor}`. Base dataset `{base}`.',
        f'{done} of {total} stages done.', '',
        '## Deployment (from the recordings)', '',
        'Per episode: reward and cost are the recorded sums (mean ± std over the episodes; '
        f'episodes of {horizon}). '
        'Interventions: steps whose action the monitor replaced by its fallback; kept: steps it '
        'judged unsafe but kept the proposal (no safer fallback); safe action: steps it answered '
        'with the safe action (stale, fault, inactive).', '',
        '| iteration | deployed bundle | episodes | steps | reward | cost | interventions | '
        'kept | safe action |',
        '|---:|---|---:|---:|---:|---:|---:|---:|---:|']
    for row in rows:
        deploy, episodes = row['deploy'], row['episodes']
        if not deploy:
            lines.append(f'| {row["iteration"]} | not yet | | | | | | | |')
            continue
        total_steps = sum(e['steps'] for e in episodes)
        lines.append(
            f'| {row["iteration"]} | `{deploy["bundle"]}` | {len(episodes)} | {total_steps} | '
            f'{_mean_std([e["reward"] for e in episodes])} | '
            f'{_mean_std([e["cost"] for e in episodes])} | '
            f'{_share(sum(e["replaced"] for e in episodes), total_steps)} | '
            f'{sum(e["kept"] for e in episodes)} | '
            f'{sum(e["safe_action"] for e in episodes)} |')
    lines += ['', '## Datasets and training', '',
              '| iteration | dataset | transitions | trajectories | training steps | '
              'training CPU |', '|---:|---|---:|---:|---:|---:|']
    for row in rows:
        merge, train = row['merge'] or {}, row['train'] or {}
        cpu = train.get('train_cpu_s')
        lines.append(f'| {row["iteration"]} | {merge.get("dataset", "not yet")} | '
                     f'{merge.get("transitions", "")} | {merge.get("trajectories", "")} | '
                     f'{train.get("steps", "")} | {"" if cpu is None else f"{cpu:.1f} s"} |')
    shield = ' under the monitor (--shield)' if config.get('eval_shield') else ''
    lines += ['', '## Evaluation (saferl-eval)', '',
              f'Each iteration\'s trained run{shield}, {_count(config.get("eval_episodes"))} '
              f'of the full horizon, seed {config.get("seed")}: DSRL-normalised reward and '
              'cost (mean ± its standard error, std / sqrt(episodes); safe means C_norm <= '
              '1).', '',
              '| iteration | R_norm | C_norm κ=5 | C_norm κ=10 | exported bundle |',
              '|---:|---:|---:|---:|---|']
    for row in rows:
        evaluation, export = row['evaluate'], row['export'] or {}
        if not evaluation:
            lines.append(f'| {row["iteration"]} | not yet | | | |')
            continue
        spread = row.get('spread')

        def cell(value, key, digits):
            error = f' ± {spread[key]:.{digits}f}' if spread else ''
            return f'{value:.{digits}f}{error}'
        lines.append(f'| {row["iteration"]} | {cell(evaluation["reward_norm_k5"], "reward", 3)} '
                     f'| {cell(evaluation["cost_norm_k5"], "cost_k5", 2)} | '
                     f'{cell(evaluation["cost_norm_k10"], "cost_k10", 2)} | '
                     f'{export.get("bundle", "not yet")} |')
    lines += ['', '## Stages', '', '| iteration | ' + ' | '.join(
        ('deploy', 'merge', 'train', 'evaluate', 'export')) + ' |', '|---:' + '|---:' * 5 + '|']
    for row in rows:
        cells = [f'{row[s]["seconds"]:.1f} s' if row[s] else '–'
                 for s in ('deploy', 'merge', 'train', 'evaluate', 'export')]
        lines.append(f'| {row["iteration"]} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'![the loop]({REPORT_PNG})', '']
    return '\n'.join(lines)


def plot(rows: List[dict], path: Path, title: str) -> None:
    """Draw report.png: deployment reward, cost and interventions; evaluation; dataset size."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100)
    (reward_ax, cost_ax, share_ax), (r_norm_ax, c_norm_ax, data_ax) = axes
    deployed = [r for r in rows if r['episodes']]
    for ax, key in ((reward_ax, 'reward'), (cost_ax, 'cost')):
        for row in deployed:
            values = [e[key] for e in row['episodes']]
            ax.scatter(np.full(len(values), row['iteration']), values, s=14, alpha=0.5,
                       color='tab:blue', linewidths=0)
        if deployed:
            ax.plot([r['iteration'] for r in deployed],
                    [np.mean([e[key] for e in r['episodes']]) for r in deployed], 'o-',
                    color='tab:blue', label='mean (dots: episodes)')
            ax.legend(loc='best', fontsize=8)
        ax.set_title(f'deployment: {key} per episode')
    if deployed:
        its = [r['iteration'] for r in deployed]
        steps = [max(1, sum(e['steps'] for e in r['episodes'])) for r in deployed]
        replaced = [100 * sum(e['replaced'] for e in r['episodes']) / n
                    for r, n in zip(deployed, steps)]
        kept = [100 * sum(e['kept'] for e in r['episodes']) / n for r, n in zip(deployed, steps)]
        share_ax.bar(its, replaced, color='tab:orange', label='replaced (interventions)')
        share_ax.bar(its, kept, bottom=replaced, color='tab:gray', label='judged unsafe, kept')
        share_ax.legend(loc='best', fontsize=8)
    share_ax.set_title('deployment: monitor, % of steps')
    evaluated = [r for r in rows if r['evaluate']]
    if evaluated:
        its = [r['iteration'] for r in evaluated]

        def errors(key):        # standard errors where the results file gave them
            return [r['spread'][key] if r.get('spread') else 0.0 for r in evaluated]
        r_norm_ax.errorbar(its, [r['evaluate']['reward_norm_k5'] for r in evaluated],
                           yerr=errors('reward'), fmt='o-', color='tab:green', capsize=3)
        for kappa, style in zip(KAPPAS, ('s--', '^:')):
            c_norm_ax.errorbar(its, [r['evaluate'][f'cost_norm_k{kappa}'] for r in evaluated],
                               yerr=errors(f'cost_k{kappa}'), fmt=style, color='tab:red',
                               capsize=3, label=f'κ = {kappa}')
        c_norm_ax.axhline(1.0, color='grey', linewidth=0.8, linestyle='--',
                          label='safe below 1')
        c_norm_ax.legend(loc='best', fontsize=8)
    r_norm_ax.set_title('evaluation: normalised reward (± s.e.)')
    c_norm_ax.set_title('evaluation: normalised cost (± s.e.)')
    merged = [r for r in rows if r['merge']]
    if merged:
        data_ax.plot([r['iteration'] for r in merged], [r['merge']['transitions'] for r in merged],
                     'o-', color='tab:purple')
    data_ax.ticklabel_format(axis='y', useOffset=False, style='plain')
    data_ax.set_title('dataset: transitions after the merge')
    for ax in axes.flat:
        ax.set_xlabel('iteration')
        ax.set_xticks([r['iteration'] for r in rows])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)


def write_report(out, state: dict) -> Path:
    """Write OUT/report.md and OUT/report.png from the state and the files; return the .md."""
    out = Path(out)
    rows = iterations(out, state)
    config = state.get('config', {})
    plot(rows, out / REPORT_PNG, f'saferl-loop {config.get("task")} '
         f'{config.get("algorithm")}: {Path(config.get("output", out)).name}')
    atomic_write_text(out / REPORT_MD, markdown(out, state, rows))
    return out / REPORT_MD
