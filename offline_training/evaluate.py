"""
Evaluate policies in Bullet-Safety-Gym and build the results table: ``saferl-eval``.

    saferl-eval RUN_OR_BUNDLE --episodes 20 --seeds 0 1 2       # RUN_OR_BUNDLE/eval/results.json
    saferl-eval RUN [MORE...] --episodes 20 -o results/NAME.json
    saferl-eval table results/*.json -o docs/results.md [--kappa 5] [--plot-dir docs/img/results]

A source is a ``saferl-train`` run folder (the torch model) or a model bundle (its ONNX graphs
through the runtime loader, exactly as the ROS nodes run it). Both act through the same policy
graph with the same noise stream, so a run and its bundle choose the same action for the same
observation (within float precision; over an episode, PyBullet's contacts can amplify a 1e-7
difference into a different trajectory, so compare actions, not returns, for parity).

Scores follow DSRL exactly (``saferl_ros.tasks.normalized_score``):
``R_norm = (R - R_min) / (R_max - R_min)``, ``C_norm = (C + eps) / (kappa + eps)`` with
``eps = 1`` only when ``kappa = 0``; safe means ``C_norm <= 1``. Each evaluation seed (and each
source, e.g. runs of different training seeds) is one unit: the unit's mean over its episodes;
the reported mean +- std is over units (over episodes when there is a single unit).
FISOR's paper evaluates Bullet-Safety-Gym at kappa = 5 with 20 episodes x 3 seeds
(the paper's Sec. 5 and Table 1); DSRL's benchmark uses kappa in {10, 20, 40}.
"""

import argparse
import csv
from datetime import datetime, timezone
import json
import os
from pathlib import Path
import platform
import re
import sys
from typing import Dict, List, Sequence

import numpy as np
from saferl_ros.errors import ConfigError, MissingFileError, reports_user_errors
from saferl_ros.sim import episode_seed, run_episode
from saferl_ros.tasks import get_task, normalized_score
from tqdm import tqdm

KAPPAS = (5, 10, 20, 40)
# Default results file of one source, relative to its folder (the CSV goes next to it).
DEFAULT_RESULTS = Path('eval') / 'results.json'
TABLE_KAPPA = 5  # FISOR's Table 1 kappa for Bullet-Safety-Gym (paper, Sec. 5)
# FISOR paper, Table 1 (normalised reward, normalised cost), Bullet-Safety-Gym rows, kappa = 5,
# 20 episodes x 3 seeds (the paper's protocol). Shown next to our numbers for reference.
PAPER = {
    'bc_all': {'AntRun': (0.73, 11.73), 'BallRun': (0.67, 11.38), 'CarRun': (0.96, 1.88),
               'DroneRun': (0.55, 5.21), 'AntCircle': (0.65, 19.45),
               'BallCircle': (0.72, 10.02), 'CarCircle': (0.65, 11.16),
               'DroneCircle': (0.82, 13.78)},
    'bcq_lag': {'AntRun': (0.65, 3.30), 'BallRun': (0.43, 6.25), 'CarRun': (0.84, 2.51),
                'DroneRun': (0.80, 17.98), 'AntCircle': (0.67, 19.13),
                'BallCircle': (0.67, 8.50), 'CarCircle': (0.68, 8.84),
                'DroneCircle': (0.95, 18.56)},
    'fisor': {'AntRun': (0.45, 0.03), 'BallRun': (0.18, 0.00), 'CarRun': (0.73, 0.14),
              'DroneRun': (0.30, 0.55), 'AntCircle': (0.20, 0.00), 'BallCircle': (0.34, 0.00),
              'CarCircle': (0.40, 0.11), 'DroneCircle': (0.48, 0.00)},
}


def machine_info() -> dict:
    """Return the CPU model, core count and library versions (for every measured figure)."""
    cpu = platform.processor() or 'unknown'
    try:
        with open('/proc/cpuinfo') as stream:
            for line in stream:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = {'cpu': cpu, 'cores': os.cpu_count(), 'platform': platform.platform(),
            'python': platform.python_version(), 'numpy': np.__version__}
    for module in ('torch', 'onnxruntime', 'pybullet'):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            info[module] = None
    return info


# --------------------------------------------------------------------------- agents

class Agent:
    """A policy that maps one raw observation to one action, drawing noise from ``rng``."""

    name: str
    kind: str  # 'bundle' or 'run'
    algorithm: str
    task: str

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class BundleAgent(Agent):
    """A model bundle run by the runtime loader (ONNX Runtime), as the ROS nodes run it."""

    def __init__(self, path):
        from saferl_ros.bundle import load_bundle
        self.bundle = load_bundle(path)
        self.name, self.kind = self.bundle.name, 'bundle'
        self.algorithm, self.task = self.bundle.algorithm, self.bundle.task_name

    def act(self, obs, rng):
        return self.bundle.policy(obs, rng=rng)[0]


class RunAgent(Agent):
    """
    A saferl-train run's torch model, acting through the graph the export would trace.

    The noise is drawn with the same shape and the same generator calls as the bundle draws it,
    so a run and its exported bundle choose the same actions for the same observations.
    """

    def __init__(self, path):
        import torch

        from offline_training.runs import open_run

        self._torch = torch
        run = open_run(path)
        self.graph = run.export_plan().graphs['policy']
        self.name, self.kind = Path(path).resolve().name, 'run'
        self.algorithm, self.task = run.algorithm, run.task
        noise = self.graph.inputs.get('noise')
        self.noise_shape = None if noise is None else tuple(noise[1:])

    def act(self, obs, rng):
        torch = self._torch
        args = [torch.as_tensor(np.asarray(obs, dtype=np.float32)[None])]
        if self.noise_shape is not None:
            args.append(torch.as_tensor(rng.standard_normal((1, *self.noise_shape),
                                                            dtype=np.float32)))
        with torch.no_grad():
            return self.graph.module(*args)[0].numpy()


def is_bundle(path) -> bool:
    """Return whether folder ``path`` holds a bundle manifest (even a link the loader refuses)."""
    return os.path.lexists(Path(path) / 'manifest.yaml')


def load_agent(path) -> Agent:
    """Return the agent of a bundle folder (manifest.yaml) or a run folder (config.yaml)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f'{path}: no such folder; give a model bundle folder (e.g. '
                               'models/NAME) or a saferl-train run folder (e.g. runs/NAME)')
    if is_bundle(path):
        return BundleAgent(path)
    if (path / 'config.yaml').is_file():
        return RunAgent(path)
    raise MissingFileError(f'{path}: neither a model bundle (manifest.yaml) nor a saferl-train '
                           'run folder (config.yaml + checkpoint.pt); point at one of those')


# --------------------------------------------------------------------------- rollouts

def rollout(agent: Agent, env, seed: int, episode: int) -> dict:
    """
    Run one episode (saferl_ros.sim.run_episode); return its reward and cost returns and length.

    The start state comes from ``episode_seed(seed, episode)``; the policy's noise has its own
    generator, seeded with the same number.
    """
    seed_value = episode_seed(seed, episode)
    rng = np.random.default_rng(seed_value)
    episode_result = run_episode(env, lambda obs: agent.act(obs, rng), seed_value)
    return {'seed': int(seed), 'episode': int(episode), 'reward': episode_result.reward,
            'cost': episode_result.cost, 'length': episode_result.length}


def _mean_std(values) -> Dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {'mean': float(values.mean()), 'std': float(values.std()) if len(values) > 1 else 0.0}


def summarize(task, episodes: List[dict], kappas: Sequence[float] = KAPPAS) -> dict:
    """
    Aggregate episodes into raw and normalised scores per kappa.

    Units are (source, seed) pairs: mean +- std over unit means when there are several units,
    over episodes when there is one (``std_over`` says which).
    """
    units: Dict[tuple, List[dict]] = {}
    for row in episodes:
        units.setdefault((row.get('source', ''), row['seed']), []).append(row)
    several = len(units) > 1

    def aggregate(values_of):
        if several:
            return _mean_std([np.mean([values_of(r) for r in rows]) for rows in units.values()])
        return _mean_std([values_of(r) for r in episodes])

    summary = {'std_over': 'seeds' if several else 'episodes', 'units': len(units),
               'episodes': len(episodes),
               'reward': aggregate(lambda r: r['reward']), 'cost': aggregate(lambda r: r['cost']),
               'length': aggregate(lambda r: r['length']), 'normalized': {}}
    for kappa in kappas:
        def norm(row, index, k=kappa):
            return float(normalized_score(task, row['reward'], row['cost'], k)[index])
        summary['normalized'][str(kappa)] = {
            'reward': aggregate(lambda r: norm(r, 0)), 'cost': aggregate(lambda r: norm(r, 1)),
            'safe_fraction': float(np.mean([norm(r, 1) <= 1.0 for r in episodes])),
        }
    return summary


def evaluate(sources: Sequence, episodes: int = 20, seeds: Sequence[int] = (0,),
             kappas: Sequence[float] = KAPPAS, progress: bool = True) -> dict:
    """
    Roll out every source for ``episodes`` episodes per seed; return the results dict.

    All sources must be of one task and one algorithm (e.g. the runs of several training seeds,
    or one bundle); evaluate different algorithms separately and combine them with ``table``.
    """
    agents = [load_agent(s) for s in sources]
    tasks = {a.task for a in agents}
    algorithms = {a.algorithm for a in agents}
    if len(tasks) != 1 or len(algorithms) != 1:
        raise ConfigError(f'evaluate one task and algorithm at a time; got tasks '
                          f'{sorted(tasks)} and algorithms {sorted(algorithms)}; run saferl-eval '
                          'once per task and algorithm and combine with `saferl-eval table`')
    spec = get_task(tasks.pop())
    rows = []
    env = spec.make_env()
    bar = tqdm(total=len(agents) * len(seeds) * episodes, desc=f'eval {spec.name}',
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for agent, source in zip(agents, sources):
            for seed in seeds:
                for episode in range(episodes):
                    row = rollout(agent, env, seed, episode)
                    row['source'] = str(source)
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix(reward=f'{row["reward"]:.1f}', cost=f'{row["cost"]:.0f}',
                                    refresh=False)
    finally:
        bar.close()
        env.close()
    return {
        'name': agents[0].name if len(agents) == 1 else f'{agents[0].algorithm}-{spec.name}',
        'task': spec.name, 'algorithm': agents[0].algorithm,
        'kinds': sorted({a.kind for a in agents}), 'sources': [str(s) for s in sources],
        'episodes_per_seed': episodes, 'seeds': [int(s) for s in seeds],
        'kappas': [float(k) for k in kappas],
        'constants': {'max_reward': spec.max_reward, 'min_reward': spec.min_reward,
                      'horizon': spec.horizon},
        'summary': summarize(spec.name, rows, kappas),
        'episodes': rows,
        'machine': machine_info(),
        'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
    }


def write_results(results: dict, out) -> Path:
    """Write results as JSON and the per-episode rows as CSV next to it; return the JSON path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + '\n')
    with open(out.with_suffix('.csv'), 'w', newline='') as stream:
        writer = csv.writer(stream)
        kappas = results['kappas']
        norm_columns = [f'{n}_norm_k{k:g}' for k in kappas for n in ('reward', 'cost')]
        writer.writerow(['task', 'algorithm', 'source', 'seed', 'episode', 'reward', 'cost',
                         'length'] + norm_columns)
        for row in results['episodes']:
            norms = []
            for k in kappas:
                norms += list(normalized_score(results['task'], row['reward'], row['cost'], k))
            writer.writerow([results['task'], results['algorithm'], row['source'], row['seed'],
                             row['episode'], f'{row["reward"]:.4f}', f'{row["cost"]:.1f}',
                             row['length']] + [f'{v:.4f}' for v in norms])
    return out


def format_summary(results: dict) -> str:
    """Return a human-readable summary of one evaluation."""
    s = results['summary']
    lines = [f'{results["name"]} ({results["algorithm"]}, {results["task"]}): '
             f'{s["episodes"]} episodes, seeds {results["seeds"]}, mean +- std over '
             f'{s["std_over"]}',
             f'  raw reward {s["reward"]["mean"]:.2f} +- {s["reward"]["std"]:.2f}, raw cost '
             f'{s["cost"]["mean"]:.2f} +- {s["cost"]["std"]:.2f}, length '
             f'{s["length"]["mean"]:.0f}']
    for kappa, n in s['normalized'].items():
        lines.append(f'  kappa {float(kappa):>4g}: R_norm {n["reward"]["mean"]:.3f} +- '
                     f'{n["reward"]["std"]:.3f}, C_norm {n["cost"]["mean"]:.3f} +- '
                     f'{n["cost"]["std"]:.3f}, safe episodes {100 * n["safe_fraction"]:.0f}%')
    return '\n'.join(lines)


# --------------------------------------------------------------------------- results table

def result_label(result: dict) -> str:
    """
    Return the table column of one results file.

    Its ``label`` if set; else, for a run folder named LABEL-TASK-sSEED (tools/run_results.py,
    e.g. bc_safe-k5-BallCircle-s0), LABEL, so variants of one algorithm (BC-Safe at two kappas)
    stay apart; else the algorithm.
    """
    if result.get('label'):
        return result['label']
    match = re.fullmatch(rf'(.+)-{re.escape(result["task"])}-s\d+', result.get('name', ''))
    return match.group(1) if match else result['algorithm']


def merge_results(results: Sequence[dict]) -> Dict[tuple, dict]:
    """Group results by (task, label) and re-aggregate the episodes of each group."""
    groups: Dict[tuple, List[dict]] = {}
    for result in results:
        groups.setdefault((result['task'], result_label(result)), []).append(result)
    merged = {}
    for (task, label), items in groups.items():
        episodes = [dict(row, source=row.get('source', item['name']))
                    for item in items for row in item['episodes']]
        kappas = sorted({k for item in items for k in item['kappas']})
        merged[(task, label)] = {
            'summary': summarize(task, episodes, kappas), 'kappas': kappas,
            'algorithm': items[0]['algorithm'],
            'names': [item['name'] for item in items],
            'kinds': sorted({k for item in items for k in item['kinds']}),
            'episodes_per_seed': sorted({item['episodes_per_seed'] for item in items}),
            'seeds': sorted({s for item in items for s in item['seeds']})}
    return merged


def _cell(stat: dict) -> str:
    return f'{stat["mean"]:.2f} ± {stat["std"]:.2f}'


def results_table(results: Sequence[dict], kappa: float = TABLE_KAPPA,
                  details: bool = True) -> str:
    """Return the markdown results table at ``kappa`` (unsafe costs, C_norm > 1, in bold)."""
    merged = merge_results(results)
    tasks = sorted({t for t, _ in merged}, key=lambda t: (t.endswith('Run'), t))
    labels = sorted({label for _, label in merged})
    algorithm_of = {label: entry['algorithm'] for (_, label), entry in merged.items()}
    paper = sorted({algorithm_of[label] for label in labels} & set(PAPER))
    head = ['Task'] + [f'{label} R↑ / C↓' for label in labels]
    head += [f'paper {a} R / C' for a in paper]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * (1 + len(labels) + len(paper))]
    for task in tasks:
        cells = [task]
        for label in labels:
            entry = merged.get((task, label))
            norm = entry and entry['summary']['normalized'].get(str(float(kappa)))
            if not norm:
                cells.append('–')
                continue
            cost = _cell(norm['cost'])
            cost = f'**{cost}**' if norm['cost']['mean'] > 1 else cost
            cells.append(f'{_cell(norm["reward"])} / {cost}')
        for algorithm in paper:
            row = PAPER[algorithm].get(task)
            cells.append(f'{row[0]:.2f} / {row[1]:.2f}' if row else '–')
        lines.append('| ' + ' | '.join(cells) + ' |')
    if not details:
        return '\n'.join(lines) + '\n'
    return '\n'.join(lines + [''] + results_details(merged)) + '\n'


def results_details(merged: Dict[tuple, dict]) -> List[str]:
    """Return one line per (task, label): episodes, seeds, sources, raw returns."""
    out = []
    for (task, label), entry in sorted(merged.items()):
        s = entry['summary']
        out.append(f'- {task} / {label}: {s["episodes"]} episodes '
                   f'({", ".join(str(e) for e in entry["episodes_per_seed"])} per seed), '
                   f'seeds {entry["seeds"]}, {len(entry["names"])} source(s) '
                   f'[{", ".join(entry["names"])}] ({"/".join(entry["kinds"])}); '
                   f'raw reward {s["reward"]["mean"]:.1f}, raw cost {s["cost"]["mean"]:.1f}; '
                   f'± is the std over {s["std_over"]}')
    return out


def results_csv(results: Sequence[dict], path) -> None:
    """Write every (task, algorithm, kappa) aggregate as one CSV row."""
    merged = merge_results(results)
    with open(path, 'w', newline='') as stream:
        writer = csv.writer(stream)
        writer.writerow(['task', 'algorithm', 'kappa', 'reward_norm_mean', 'reward_norm_std',
                         'cost_norm_mean', 'cost_norm_std', 'safe_episode_fraction',
                         'reward_raw_mean', 'cost_raw_mean', 'episodes', 'units', 'std_over',
                         'sources'])
        for (task, label), entry in sorted(merged.items()):
            s = entry['summary']
            for kappa, n in s['normalized'].items():
                writer.writerow([task, label, kappa, f'{n["reward"]["mean"]:.4f}',
                                 f'{n["reward"]["std"]:.4f}', f'{n["cost"]["mean"]:.4f}',
                                 f'{n["cost"]["std"]:.4f}', f'{n["safe_fraction"]:.3f}',
                                 f'{s["reward"]["mean"]:.3f}', f'{s["cost"]["mean"]:.3f}',
                                 s['episodes'], s['units'], s['std_over'],
                                 ';'.join(entry['names'])])


def reward_cost_plots(results: Sequence[dict], out_dir, kappa: float = TABLE_KAPPA) -> List[Path]:
    """Draw one normalised reward-vs-cost plot per task (safe region: C_norm <= 1)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    merged = merge_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    suffix = '' if float(kappa) == float(TABLE_KAPPA) else f'_kappa{kappa:g}'
    for task in sorted({t for t, _ in merged}):
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        ax.axvspan(0, 1, color='tab:green', alpha=0.08, label='safe ($C_{norm} \\leq 1$)')
        ax.axvline(1.0, color='tab:green', ls='--', lw=1)
        drawn_paper = set()
        for label, color in zip(sorted(a for t, a in merged if t == task),
                                plt.cm.tab10.colors):
            norm = merged[(task, label)]['summary']['normalized'].get(str(float(kappa)))
            if norm:
                ax.errorbar(norm['cost']['mean'], norm['reward']['mean'],
                            xerr=norm['cost']['std'], yerr=norm['reward']['std'], fmt='o',
                            color=color, capsize=3, label=f'{label} (ours)')
            algorithm = merged[(task, label)]['algorithm']
            paper = PAPER.get(algorithm, {}).get(task)
            if paper and algorithm not in drawn_paper and float(kappa) == 5.0:
                drawn_paper.add(algorithm)
                ax.plot(paper[1], paper[0], marker='s', mfc='none', color=color, ls='none',
                        label=f'{algorithm} (paper, kappa 5)')
        ax.set_xlabel(f'normalised cost (kappa = {kappa:g})')
        ax.set_ylabel('normalised reward')
        ax.set_title(f'{task}: reward vs cost')
        ax.set_xlim(left=-0.5)
        ax.legend(fontsize=7, loc='best')
        fig.tight_layout()
        png = out_dir / f'reward_cost_{task}{suffix}.png'
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written


RESULT_FIELDS = {'name': str, 'task': str, 'algorithm': str, 'kinds': list, 'episodes': list,
                 'kappas': list, 'seeds': list, 'episodes_per_seed': int}


def read_results(path) -> dict:
    """Return one results file written by saferl-eval; raise ConfigError naming what is wrong."""
    fix = 'give the JSON files that saferl-eval wrote (saferl-eval SOURCE -o FILE.json)'
    try:
        text = Path(path).read_text(encoding='utf-8')
    except FileNotFoundError:
        raise MissingFileError(f'{path}: missing; {fix}') from None
    except UnicodeDecodeError:
        raise ConfigError(f'{path}: not a text file; {fix}') from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f'{path}: not valid JSON ({error.msg} at line {error.lineno}); '
                          f'{fix}') from None
    if not isinstance(results, dict):
        raise ConfigError(f'{path}: expected a JSON object, found {type(results).__name__}; '
                          f'{fix}')
    for key, kind in RESULT_FIELDS.items():
        if not isinstance(results.get(key), kind):
            found = 'missing' if key not in results else type(results[key]).__name__
            raise ConfigError(f'{path}: field {key!r} should be a {kind.__name__}, found '
                              f'{found}; {fix}')
    for row in results['episodes']:
        needed = ('seed', 'reward', 'cost', 'length')
        if not isinstance(row, dict) or any(key not in row for key in needed):
            raise ConfigError(f'{path}: an entry of episodes lacks seed, reward, cost or '
                              f'length; {fix}')
    return results


def write_table(result_files: Sequence, out, kappa=TABLE_KAPPA, plot_dir=None,
                notes=None) -> Path:
    """
    Write the markdown tables (and the CSV and plots next to them) from results JSON files.

    ``kappa``: one threshold or several (one table and one set of plots each; the first is the
    main one). ``notes``: a markdown file appended below the tables (what was run, caveats).
    """
    kappas = [float(k) for k in (kappa if isinstance(kappa, (list, tuple)) else [kappa])]
    results = [read_results(f) for f in result_files]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = Path(plot_dir) if plot_dir is not None else out.parent / 'img' / 'results'
    machines = sorted({f'{r["machine"]["cpu"]} ({r["machine"]["cores"]} cores)' for r in results
                       if 'machine' in r})
    kappa_args = ' '.join(f'{k:g}' for k in kappas)
    files = ' '.join(str(f) for f in result_files)
    header = (
        '# Results\n\n'
        f'<!-- generated by `saferl-eval table {files} -o {out} --kappa {kappa_args}'
        f'{f" --notes {notes}" if notes is not None else ""}`; edit the sources, not this '
        'page -->\n\n'
        'Each cell: normalised reward (R↑) / normalised cost (C↓), normalised as DSRL does, '
        'mean ± std (over '
        'evaluation units: training seeds or evaluation seeds, or over episodes for a single '
        'one). Costs above 1 (unsafe) are in bold. The paper columns are Table 1 of the FISOR '
        'paper (κ = 5, 20 episodes × 3 seeds, the hosted DSRL datasets); ours use the datasets '
        'collected here, so they are comparable in protocol but not in data. Other κ: the CSV '
        f'next to this file. Plots: `{plot_dir}`. '
        f'Machine: {"; ".join(machines) or "unknown"}.\n\n')
    sections = []
    for k in kappas:
        title = f'## κ = {k:g}' + (" (FISOR's threshold for these tasks)" if k == 5 else '')
        sections.append(f'{title}\n\n' + results_table(results, k, details=False))
        pngs = reward_cost_plots(results, plot_dir, k)
        if k == kappas[0]:
            links = ' '.join(f'![{png.stem}]({os.path.relpath(png, out.parent)})' for png in pngs)
            sections.append(f'Reward against cost at κ = {k:g} (squares: the paper):\n\n{links}\n')
    details = '## Evaluation units\n\n' + '\n'.join(results_details(merge_results(results)))
    extra = f'\n{Path(notes).read_text()}' if notes is not None else ''
    out.write_text(header + '\n'.join(sections) + '\n' + details + '\n' + extra)
    results_csv(results, out.with_suffix('.csv'))
    return out


# --------------------------------------------------------------------------- command line

def _table_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog='saferl-eval table', description='Build the markdown/CSV results table and the '
        'reward-cost plots from saferl-eval results files.')
    parser.add_argument('results', nargs='+', help='results JSON files written by saferl-eval')
    parser.add_argument('-o', '--out', required=True, help='markdown file, e.g. docs/results.md '
                        '(the CSV is written next to it)')
    parser.add_argument('--kappa', type=float, nargs='+', default=[TABLE_KAPPA],
                        help=f'cost thresholds, one table each (default {TABLE_KAPPA}, as FISOR; '
                             'e.g. --kappa 5 10)')
    parser.add_argument('--plot-dir', default=None,
                        help='folder of the reward-cost PNGs (default OUT_DIR/img/results)')
    parser.add_argument('--notes', default=None,
                        help='markdown file appended below the table (runs, caveats)')
    args = parser.parse_args(argv)
    out = write_table(args.results, args.out, args.kappa, args.plot_dir, args.notes)
    print(f'saferl-eval: wrote {out} and {out.with_suffix(".csv")}')
    return 0


def default_results_path(sources: Sequence) -> Path:
    """Return the default results file of one source: SOURCE/eval/results.json."""
    return Path(sources[0]) / DEFAULT_RESULTS


@reports_user_errors('saferl-eval')
def main(argv=None) -> int:
    """Command-line entry point of saferl-eval."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == 'table':
        return _table_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog='saferl-eval', description='Roll out runs or bundles in Bullet-Safety-Gym and report '
        'raw and DSRL-normalised reward and cost. `saferl-eval table ...` builds the results '
        'table.')
    parser.add_argument('sources', nargs='+',
                        help='bundle folders or saferl-train run folders (one task and '
                        'algorithm)')
    parser.add_argument('--episodes', type=int, default=20, help='episodes per seed (default 20)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0],
                        help='evaluation seeds (default 0)')
    parser.add_argument('--kappa', type=float, nargs='+', default=list(KAPPAS),
                        help='cost thresholds for the normalised cost (default 5 10 20 40)')
    parser.add_argument('-o', '--out', default=None,
                        help=f'results JSON; the CSV goes next to it (default, for one source: '
                        f'SOURCE/{DEFAULT_RESULTS.as_posix()}; required for several)')
    parser.add_argument('--update-manifest', action='store_true',
                        help="store the summary in the bundle manifest's metrics")
    parser.add_argument('--label', default=None,
                        help='column name in `saferl-eval table` (default: the run-name prefix, '
                             'e.g. bc_safe-k5 for runs/bc_safe-k5-BallCircle-s0, else the '
                             'algorithm)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads for run folders')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error('--episodes must be >= 1')
    if args.out is None and len(args.sources) > 1:
        parser.error('several sources: give -o FILE.json for their combined results')
    out = Path(args.out) if args.out else default_results_path(args.sources)
    _check_writable(out)
    if not all(is_bundle(s) for s in args.sources):
        import torch  # only run folders need torch; bundles run on onnxruntime alone
        torch.set_num_threads(args.threads)
    results = evaluate(args.sources, args.episodes, args.seeds, args.kappa,
                       progress=not args.no_progress)
    if args.label:
        results['label'] = args.label
    write_results(results, out)
    if args.update_manifest:
        from offline_training.export import update_metrics
        for source in args.sources:
            if is_bundle(source):
                update_metrics(source, {'evaluation': _manifest_metrics(results, out)})
    print(format_summary(results))
    print(f'saferl-eval: wrote {out} and {out.with_suffix(".csv")}')
    return 0


def _check_writable(out: Path) -> None:
    """Fail before a long evaluation if the results file ``out`` cannot be written."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise ConfigError(f'{out}: cannot be written ({folder} is not a writable folder); give '
                          '-o FILE.json in a folder you can write to')


def _manifest_metrics(results: dict, out: Path) -> dict:
    s = results['summary']
    return {'episodes_per_seed': results['episodes_per_seed'], 'seeds': results['seeds'],
            'std_over': s['std_over'], 'reward': s['reward'], 'cost': s['cost'],
            'normalized': s['normalized'], 'results_file': str(out),
            'created': results['created']}


if __name__ == '__main__':
    sys.exit(main())
