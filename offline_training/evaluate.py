"""
Evaluate policies in Bullet-Safety-Gym: ``saferl-eval`` (``saferl-eval table``: results.py).

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
the reported mean +- std is over units (over episodes when there is a single unit); the
aggregation and the tables are in results.py. FISOR's paper evaluates Bullet-Safety-Gym at
kappa = 5 with 20 episodes x 3 seeds (the paper's Sec. 5 and Table 1); DSRL's benchmark uses
kappa in {10, 20, 40}.
"""

import argparse
import csv
from datetime import datetime, timezone
import json
import os
from pathlib import Path
import re
import sys
from typing import Sequence

import numpy as np
from offline_training.machine import machine_info
from offline_training.results import (check_kappas, check_replaceable, KAPPAS, read_results,
                                      result_label, summarize, table_main)
from saferl_ros.errors import ConfigError, MissingFileError, reports_user_errors
from saferl_ros.sim import episode_seed, run_episode
from saferl_ros.tasks import get_task, normalized_score
from tqdm import tqdm

# Default results file of one source, relative to its folder (the CSV goes next to it).
DEFAULT_RESULTS = Path('eval') / 'results.json'


# --------------------------------------------------------------------------- agents

class Agent:
    """A policy that maps one raw observation to one action, drawing noise from ``rng``."""

    name: str
    kind: str  # 'bundle' or 'run'
    algorithm: str
    task: str
    # Settings that make this policy a variant of its algorithm (e.g. FISOR's selection when not
    # the paper's): they name its own column in the results table.
    variant: dict = {}
    inference: dict = {}   # inference settings changed for this evaluation (saferl-eval --set)

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def start_episode(self, seed_value: int) -> None:
        """Begin an episode (a shielded agent resets its monitor here)."""

    def episode_counts(self) -> dict:
        """Return counts to add to the episode's row (a shielded agent: its monitor's)."""
        return {}


class BundleAgent(Agent):
    """A model bundle run by the runtime loader (ONNX Runtime), as the ROS nodes run it."""

    def __init__(self, path):
        from saferl_ros.bundle import load_bundle
        self.bundle = load_bundle(path)
        self.name, self.kind = self.bundle.name, 'bundle'
        self.algorithm, self.task = self.bundle.algorithm, self.bundle.task_name
        self.variant = bundle_variant(self.bundle.manifest)

    def act(self, obs, rng):
        return self.bundle.policy(obs, rng=rng)[0]


class ModelAgent(Agent):
    """
    A torch model (in training or loaded from a run), acting through the graph the export traces.

    The noise is drawn with the same shape and the same generator calls as the bundle draws it,
    so a model and its exported bundle choose the same actions for the same observations.
    """

    def __init__(self, algorithm: str, model, config, task: str, name: str = 'model'):
        import torch

        from offline_training.algos import get_algorithm

        self._torch = torch
        module, _ = get_algorithm(algorithm)
        self.graph = module.export_plan(model, config).graphs['policy']
        self.device = next(model.parameters()).device
        self.name, self.kind = name, 'run'
        self.algorithm, self.task = algorithm, task
        noise = self.graph.inputs.get('noise')
        self.noise_shape = None if noise is None else tuple(noise[1:])

    def act(self, obs, rng):
        torch = self._torch
        args = [np.asarray(obs, dtype=np.float32)[None]]
        if self.noise_shape is not None:
            args.append(rng.standard_normal((1, *self.noise_shape), dtype=np.float32))
        with torch.no_grad():
            action = self.graph.module(*[torch.as_tensor(a, device=self.device) for a in args])
        return action[0].cpu().numpy()


class RunAgent(ModelAgent):
    """A saferl-train run folder's model (its last checkpoint)."""

    def __init__(self, path, inference=None):
        from offline_training.runs import open_run

        run = open_run(path, inference=inference)
        super().__init__(run.algorithm, run.model, run.config, run.task,
                         Path(path).resolve().name)
        # the settings changed here, and a variant the run was trained as
        self.inference = run.run_config.get('inference', {})
        self.variant = {**{key: getattr(run.config, key) for key, default in
                           VARIANT_DEFAULTS.items()
                           if getattr(run.config, key, default) != default},
                        **self.inference}


class ShieldedAgent(Agent):
    """
    An agent whose every proposal passes the safety monitor's rule before it acts.

    The rule is :class:`saferl_ros.monitor.SafetyMonitor`, the object the safety monitor node
    decides with, on a clock of stamps one control period apart (no staleness in a lock-step
    rollout). A fresh monitor per episode, its fallback noise seeded with the episode's seed,
    makes episodes reproducible; the inner agent's noise stream is untouched, so with a monitor
    that never intervenes the episode is exactly the unshielded one.
    """

    def __init__(self, inner: Agent, monitor_bundle, config=None):
        from saferl_ros.bundle import load_bundle
        from saferl_ros.monitor import MonitorConfig

        self.inner = inner
        self.monitor_bundle = load_bundle(monitor_bundle)
        if self.monitor_bundle.task_name != inner.task:
            raise ConfigError(f'--shield {monitor_bundle}: a {self.monitor_bundle.task_name} '
                              f'bundle cannot shield a {inner.task} policy; give a monitor '
                              f'bundle of {inner.task}')
        self.config = config or MonitorConfig()
        self.period = get_task(inner.task).control_period
        self.name, self.kind, self.task = inner.name, inner.kind, inner.task
        self.algorithm, self.variant = inner.algorithm, inner.variant
        self.inference = inner.inference
        self.monitor = None
        self.clock = 0.0

    def start_episode(self, seed_value: int) -> None:
        """Begin an episode: a fresh monitor (hold, counters) with noise seeded by the episode."""
        from dataclasses import replace

        from saferl_ros.monitor import SafetyMonitor

        self.monitor = SafetyMonitor(self.monitor_bundle, replace(self.config, seed=seed_value))
        self.clock = 0.0

    def act(self, obs, rng):
        proposal = self.inner.act(obs, rng)
        # as safety_monitor_node with its default precompute_fallback: the fallback is searched
        # for every observation (so the monitor's noise stream advances as the node's does)
        fallback = self.monitor.fallback_for(obs) if self.monitor.use_bundle_fallback else None
        verdict = self.monitor.decide(obs, proposal, self.clock, self.clock, self.clock,
                                      fallback=fallback)
        self.clock += self.period
        return verdict.action

    def episode_counts(self) -> dict:
        """Return this episode's monitor counts: decisions, replaced and kept."""
        counts = self.monitor.counters.as_dict()
        return {key: counts[key] for key in ('decisions', 'replaced', 'kept')}


def shield_overrides(config) -> dict:
    """Return the MonitorConfig fields that differ from the defaults (what --monitor-set set)."""
    from dataclasses import asdict

    from saferl_ros.monitor import MonitorConfig
    if config is None:
        return {}
    defaults = asdict(MonitorConfig())
    return {key: value for key, value in asdict(config).items() if value != defaults[key]}


# Inference settings whose non-default value makes a policy a variant of its algorithm, labelled in
# the results even when the run was trained or exported with it (not only under --set).
VARIANT_DEFAULTS = {'selection': 'minqc'}


def bundle_variant(manifest: dict) -> dict:
    """Return the VARIANT_DEFAULTS settings a bundle's manifest states away from the default."""
    details = manifest.get('algorithm_config') or {}
    variant = {}
    for key, default in VARIANT_DEFAULTS.items():
        # FISOR's manifest describes its selection and names it last in parentheses
        match = re.search(r'\(([\w-]+)\)\s*$', str(details.get(key, '')))
        if match and match.group(1) != default:
            variant[key] = match.group(1)
    return variant


def is_bundle(path) -> bool:
    """Return whether folder ``path`` holds a bundle manifest (even a link the loader refuses)."""
    return os.path.lexists(Path(path) / 'manifest.yaml')


def load_agent(path, inference=None) -> Agent:
    """
    Return the agent of a bundle folder (manifest.yaml) or a run folder (config.yaml).

    ``inference``: inference settings of a run folder to use instead of its own
    (offline_training.runs.INFERENCE_SETTINGS); a bundle's graphs were fixed at export.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f'{path}: no such folder; give a model bundle folder (e.g. '
                               'models/NAME) or a saferl-train run folder (e.g. runs/NAME)')
    if is_bundle(path):
        if inference:
            raise ConfigError(f'{path} is a bundle: its graphs were fixed at export, so '
                              f'{sorted(inference)} cannot change; evaluate its run folder with '
                              '--set, or re-export the run')
        return BundleAgent(path)
    if os.path.lexists(path / 'config.yaml'):  # open_run says what is wrong with it
        return RunAgent(path, inference)
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
    agent.start_episode(seed_value)
    episode_result = run_episode(env, lambda obs: agent.act(obs, rng), seed_value)
    row = {'seed': int(seed), 'episode': int(episode), 'reward': episode_result.reward,
           'cost': episode_result.cost, 'length': episode_result.length}
    row.update(agent.episode_counts())
    return row


def evaluate(sources: Sequence, episodes: int = 20, seeds: Sequence[int] = (0,),
             kappas: Sequence[float] = KAPPAS, progress: bool = True, shield=None,
             shield_config=None, inference=None) -> dict:
    """
    Roll out every source for ``episodes`` episodes per seed; return the results dict.

    All sources must be of one task and one algorithm (e.g. the runs of several training seeds,
    or one bundle); evaluate different algorithms separately and combine them with ``table``.
    ``shield``: a monitor bundle whose critics judge every action (:class:`ShieldedAgent`,
    ``shield_config`` a :class:`saferl_ros.monitor.MonitorConfig`); the results then record the
    share of steps whose action the monitor replaced. ``inference``: inference settings for run
    folders (load_agent); the results record them and take them into their table label.
    """
    if inference and 'fallback_candidates' in inference:
        raise ConfigError('fallback_candidates shapes only the fallback graph, which an '
                          'evaluation does not run (it rolls out the policy; --shield uses the '
                          "monitor bundle's fallback); set it at export: saferl-export "
                          '--fallback-candidates')
    agents = [load_agent(s, inference) for s in sources]
    if shield is not None:
        agents = [ShieldedAgent(agent, shield, shield_config) for agent in agents]
    tasks = {a.task for a in agents}
    algorithms = {a.algorithm for a in agents}
    if len(tasks) != 1 or len(algorithms) != 1:
        raise ConfigError(f'evaluate one task and algorithm at a time; got tasks '
                          f'{sorted(tasks)} and algorithms {sorted(algorithms)}; run saferl-eval '
                          'once per task and algorithm and combine with `saferl-eval table`')
    variants = {tuple(sorted(a.variant.items())) for a in agents}
    if len(variants) != 1:
        names = [dict(variant) for variant in sorted(variants)]
        raise ConfigError(f'the sources are different variants {names}; evaluate each variant '
                          'separately')
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
    results = {
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
    changed = {k: v for a in agents for k, v in a.inference.items()}
    if changed:
        results['inference'] = changed    # settings changed at evaluation (--set)
    variant = dict(variants.pop())
    if variant:
        # its own column in `saferl-eval table`: the run's label and the variant's settings
        results['variant'] = variant
        results['label'] = result_label(results) + ''.join(
            f'+{key}={value}' for key, value in sorted(variant.items()))
    if shield is not None:
        decisions = sum(row['decisions'] for row in rows)
        replaced = sum(row['replaced'] for row in rows)
        monitor = agents[0].monitor_bundle
        results['shield'] = {'monitor_bundle': monitor.name, 'critic': monitor.critic_kind,
                             'monitor_config': shield_overrides(shield_config),
                             'decisions': decisions, 'replaced': replaced,
                             'kept': sum(row['kept'] for row in rows),
                             'replaced_share': replaced / max(decisions, 1)}
        # its own column in `saferl-eval table`: the policy's label and the monitor's name
        results['label'] = f'{result_label(results)}+{monitor.name}'
    return results


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
    if 'shield' in results:
        shield = results['shield']
        lines.append(f'  shielded by {shield["monitor_bundle"]} ({shield["critic"]} critic): '
                     f'{shield["replaced"]} of {shield["decisions"]} actions replaced '
                     f'({100 * shield["replaced_share"]:.1f} %), {shield["kept"]} kept')
    for kappa, n in s['normalized'].items():
        lines.append(f'  kappa {float(kappa):>4g}: R_norm {n["reward"]["mean"]:.3f} +- '
                     f'{n["reward"]["std"]:.3f}, C_norm {n["cost"]["mean"]:.3f} +- '
                     f'{n["cost"]["std"]:.3f}, safe episodes {100 * n["safe_fraction"]:.0f}%')
    return '\n'.join(lines)


# --------------------------------------------------------------------------- command line

def default_results_path(sources: Sequence) -> Path:
    """Return the default results file of one source: SOURCE/eval/results.json."""
    return Path(sources[0]) / DEFAULT_RESULTS


@reports_user_errors('saferl-eval')
def main(argv=None) -> int:
    """Command-line entry point of saferl-eval."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == 'table':
        return table_main(argv[1:])
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
                             'algorithm, then +KEY=VALUE of a variant such as '
                             '+selection=feasible-maxq); replaces the whole label')
    parser.add_argument('--shield', metavar='MONITOR_BUNDLE', default=None,
                        help="apply the safety monitor's rule with this bundle's critics to "
                        'every action, as safety_monitor_node does (any policy: e.g. a BC '
                        'bundle shielded by models/fisor-ballcircle); the results record the '
                        'share of actions replaced')
    parser.add_argument('--monitor-set', dest='monitor_overrides', action='append', default=[],
                        metavar='KEY=VALUE',
                        help='with --shield: a safety monitor parameter other than its default, '
                        'e.g. min_hold=0 or threshold_v=0.5 (saferl_ros.monitor.MonitorConfig)')
    parser.add_argument('--set', dest='inference', action='append', default=[],
                        metavar='KEY=VALUE',
                        help='run folders only: act with this inference setting instead of the '
                        "run's, e.g. num_candidates=32 or selection=feasible-maxq (FISOR); "
                        'recorded in the results and their table label')
    parser.add_argument('--threads', type=int, default=1, help='torch threads for run folders')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error('--episodes must be >= 1')
    if args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    if min(args.seeds) < 0:
        parser.error(f'--seeds must be >= 0, got {min(args.seeds)}')
    if args.monitor_overrides and not args.shield:
        parser.error('--monitor-set sets the parameters of the --shield monitor; give --shield')
    shield_config = None
    if args.monitor_overrides:
        from offline_training.overrides import parse_override
        from saferl_ros.monitor import monitor_config
        try:
            overrides = dict(parse_override(text) for text in args.monitor_overrides)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error).replace('--set', '--monitor-set'))
        shield_config = monitor_config(overrides)
    if args.shield and args.update_manifest:
        parser.error("--update-manifest stores the bundle's own evaluation; drop it with --shield")
    if args.out is None and len(args.sources) > 1:
        parser.error('several sources: give -o FILE.json for their combined results')
    if args.out is None and args.inference:
        parser.error("--set: give -o FILE.json (RUN/eval/results.json keeps the run's own "
                     'evaluation)')
    out = Path(args.out) if args.out else default_results_path(args.sources)
    check_kappas(args.kappa, '--kappa')
    _check_writable(out)
    if not all(is_bundle(s) for s in args.sources):
        import torch  # only run folders need torch; bundles run on onnxruntime alone
        torch.set_num_threads(args.threads)
    inference = None
    if args.inference:
        from offline_training.overrides import parse_override
        try:
            inference = dict(parse_override(text) for text in args.inference)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    results = evaluate(args.sources, args.episodes, args.seeds, args.kappa,
                       progress=not args.no_progress, shield=args.shield,
                       shield_config=shield_config, inference=inference)
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
    # Replaced only if it is an earlier results file (with its CSV): -o naming a dataset or a
    # file of the user's by mistake loses nothing.
    if out.suffix != '.json':
        raise ConfigError(f'-o {out}: give a .json file name')
    if out.exists() or out.is_symlink():
        try:
            read_results(out)
        except ConfigError as error:
            raise ConfigError(f'-o {out}: exists and is not a results file of saferl-eval '
                              f'({str(error).split("; ")[0]}), so it is not replaced; give a new '
                              '.json name or remove it yourself') from None
    check_replaceable(out.with_suffix('.csv'), '.csv', 'task,algorithm,source,seed',
                      'a CSV that saferl-eval wrote')


def _manifest_metrics(results: dict, out: Path) -> dict:
    s = results['summary']
    return {'episodes_per_seed': results['episodes_per_seed'], 'seeds': results['seeds'],
            'std_over': s['std_over'], 'reward': s['reward'], 'cost': s['cost'],
            'normalized': s['normalized'], 'results_file': str(out),
            'created': results['created']}


if __name__ == '__main__':
    sys.exit(main())
