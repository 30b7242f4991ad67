"""
saferl-loop: the whole loop in one command, deploy -> record -> merge -> retrain -> evaluate.

    saferl-loop config/loop_ballcircle.yaml                      # run or resume the loop
    saferl-loop config/loop_ballcircle.yaml --set iterations=1 --set deploy_episodes=2

A loop config (YAML, keys in :class:`LoopConfig`, docs/loop.md) names a task, an algorithm and
its preset, the bundle that controls the robot in iteration 0 and, optionally, the bundle whose
critics monitor every deployment. Iteration k then runs five stages, each one of the project's
commands:

1. deploy: ``saferl-bringup`` runs the current bundle under the safety monitor in the simulator
   for ``deploy_episodes`` episodes; the recorder writes ``iter-k/recordings``;
2. merge: ``saferl-data merge`` adds the recordings to the previous dataset (iteration 0: the
   base dataset) -> ``iter-k/dataset.hdf5``;
3. train: ``saferl-train`` trains a fresh run on the merged data -> ``iter-k/run``;
4. evaluate: ``saferl-eval`` of that run -> ``iter-k/eval/results.json``;
5. export: ``saferl-export`` -> ``iter-k/bundle``, which iteration k + 1 deploys.

Each iteration trains a fresh run rather than extending the previous one: a run's schedule is
laid out over its total steps (FISOR's critics-first schedule trains the critics for the first
part of the steps and the actor for the rest; learning-rate decay spans them all), so adding
steps to a finished run is not the schedule the preset describes, and a checkpoint's sampler
state belongs to the dataset it was trained on (saferl-train refuses to resume on one of another
size). A fresh run on the merged data is the same experiment each iteration, on more data.

Every stage writes its outputs atomically (a hidden ``.partial`` folder renamed into place, or
the command's own atomic writes) and then records itself in ``OUT/state.json``; rerunning the
same command skips the recorded stages and continues. An interrupted stage (Ctrl-C, SIGTERM, a
failure) is not recorded and runs again; a partial recording or evaluation is never trusted,
and an interrupted training resumes from its last checkpoint (saferl-train's own resume).
``OUT/report.md`` and ``OUT/report.png`` (offline_training.loop_report) are rewritten after
every stage.

The deployment runs ``python -m saferl_ros.bringup`` as a child process: the training layer
never imports rclpy (docs/architecture.md), and the DDS participants end with their process.
The other stages call their command's ``main(argv)`` in this process.
"""

import argparse
from dataclasses import asdict, dataclass, field, fields, MISSING, replace
from datetime import datetime, timezone
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

from offline_training.algos import ALGORITHMS, get_algorithm
from offline_training.overrides import parse_override
from offline_training.results import kappa_entry
from saferl_ros import graph
from saferl_ros.errors import (
    ConfigError, MissingFileError, read_yaml_mapping, reports_user_errors, UserError)
from saferl_ros.files import atomic_write_json, sha256_file
from saferl_ros.paths import resolve_path
from saferl_ros.tasks import get_task

PROG = 'saferl-loop'
FORMAT = 'saferl_loop/1'
STATE = 'state.json'
LOCK = '.lock'
STAGES = ('deploy', 'merge', 'train', 'evaluate', 'export')
# Outputs inside iter-k/, one per stage: a stage recorded as done must still have its output.
RECORDINGS, DATASET, RUN, EVAL, BUNDLE = 'recordings', 'dataset.hdf5', 'run', 'eval', 'bundle'
OUTPUTS = {'deploy': RECORDINGS, 'merge': DATASET, 'train': RUN, 'evaluate': EVAL,
           'export': BUNDLE}
RESULTS = 'results.json'
DEPLOY_LOG = 'deploy.log'
DEFAULT_DEPLOY_CONFIG = 'package://saferl_ros/config/sim.yaml'
# Config keys that may change between runs of one output folder: more (or fewer) iterations
# extend (or stop) the loop; threads change speed, not results; the folder itself may move.
MAY_CHANGE = frozenset({'iterations', 'threads', 'output'})
# Training checkpoints this often, so that an interrupted training loses little (a checkpoint
# of these networks takes well under a second).
CHECKPOINT_EVERY = 2000
# How long a deployment interrupted by Ctrl-C may take to stop in order (the monitor's safe
# action, the recorder closing its files) before it is killed.
STOP_GRACE_S = 30.0
CONFIG_FIX = 'see config/loop_ballcircle.yaml and docs/loop.md'


class StageError(UserError, RuntimeError):
    """A stage's command failed; its own message (above) says why."""


# --------------------------------------------------------------------------- the config

@dataclass(frozen=True)
class LoopConfig:
    """
    What a loop runs: the keys of a loop config file (docs/loop.md).

    Paths of bundles follow the project's rule (``package://saferl_ros/...``, absolute, or
    relative to the current folder, else to the package); ``output`` and ``base_dataset`` are
    relative to the current folder.
    """

    task: str                            # a task of saferl_ros.tasks, e.g. BallCircle
    algorithm: str                       # a registered algorithm (offline_training.algos)
    start_bundle: str                    # the controller of iteration 0
    output: str                          # the loop's folder (state, iterations, report)
    preset: str = 'cpu'                  # the algorithm's config preset
    monitor_bundle: Optional[str] = None  # whose critics judge every deployed action
    base_dataset: Optional[str] = None   # iteration 0 merges into it (default: the task's file)
    iterations: int = 3
    deploy_episodes: int = 10            # simulator episodes per deployment
    deploy_horizon: int = 0              # steps per deployed episode (0: the task's horizon)
    deploy_config: str = DEFAULT_DEPLOY_CONFIG   # the ROS 2 parameters file of the deployment
    # The monitor's parameters (saferl_ros.monitor.MonitorConfig names, e.g. {threshold_v: 3,
    # threshold_q: 3}): set on safety_monitor_node in every deployment, and passed to a shielded
    # evaluation as saferl-eval --monitor-set, so both judge with the same rule.
    monitor_set: Dict[str, object] = field(default_factory=dict)
    train_steps: Optional[int] = None    # training steps per iteration (None: the preset's)
    train_set: Dict[str, object] = field(default_factory=dict)   # saferl-train --set values
    eval_episodes: int = 20
    eval_shield: bool = False            # evaluate under the monitor (saferl-eval --shield)
    seed: int = 0                        # training and evaluation seed; deployments seed + 1 + k
    threads: int = 1                     # torch threads of training and evaluation

    def as_dict(self) -> dict:
        """Return the config as plain data (the state file keeps it)."""
        return asdict(self)

    def deploy_seed(self, iteration: int) -> int:
        """
        Return the simulator and controller seed of iteration ``iteration``'s deployment.

        Each deployment starts from new states (episode k of seed s starts from
        ``episode_seed(s, k)``), none of them the evaluation's (seed ``seed``).
        """
        return self.seed + 1 + iteration


REQUIRED = tuple(f.name for f in fields(LoopConfig)
                 if f.default is MISSING and f.default_factory is MISSING)
# The YAML types each key accepts (bool is checked apart: YAML's true is no count).
KINDS = {'task': (str,), 'algorithm': (str,), 'start_bundle': (str,), 'output': (str,),
         'preset': (str,), 'monitor_bundle': (str, type(None)),
         'base_dataset': (str, type(None)), 'iterations': (int,), 'deploy_episodes': (int,),
         'deploy_horizon': (int,), 'deploy_config': (str,), 'monitor_set': (dict, type(None)),
         'train_steps': (int, type(None)),
         'train_set': (dict, type(None)), 'eval_episodes': (int,), 'eval_shield': (bool,),
         'seed': (int,), 'threads': (int,)}
# Smallest value of each count.
MINIMUM = {'iterations': 1, 'deploy_episodes': 1, 'deploy_horizon': 0, 'train_steps': 1,
           'eval_episodes': 1, 'seed': 0, 'threads': 1}


def config_defaults() -> dict:
    """Return {key: default} of the loop config's optional keys."""
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory()
            for f in fields(LoopConfig) if f.name not in REQUIRED}


def _kind_names(kinds) -> str:
    names = {str: 'a string', int: 'an integer', bool: 'a boolean (true or false)',
             dict: 'a mapping', type(None): 'null'}
    return ' or '.join(names[k] for k in kinds)


def read_config(path, overrides=()) -> LoopConfig:
    """
    Read and validate a loop config file (plus ``--set`` overrides); return the LoopConfig.

    Every problem raises a one-line :class:`UserError` naming the file, the key and the fix:
    unknown, missing or mistyped keys, an unknown task, algorithm, preset or training field,
    bundles that are missing, unverifiable, of another task or without the critic the monitor
    needs, a missing dataset, counts out of range.
    """
    where = str(path)
    data = read_yaml_mapping(path, f'write a mapping of loop keys ({CONFIG_FIX})')
    data = {**data, **dict(overrides)}
    known = [f.name for f in fields(LoopConfig)]
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(f'{where}: unknown key {unknown[0]!r}; the keys are '
                          f'{", ".join(known)} ({CONFIG_FIX})')
    for key in REQUIRED:
        if data.get(key) is None:
            raise ConfigError(f'{where}: key {key!r} is missing; add it ({CONFIG_FIX})')
    for key, value in data.items():
        kinds = KINDS[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ConfigError(f'{where}: key {key!r} should be {_kind_names(kinds)}, found '
                              f'{type(value).__name__} {value!r}; give a value of that type')
        if key in MINIMUM and value is not None and value < MINIMUM[key]:
            raise ConfigError(f'{where}: key {key!r} is {value}; give at least {MINIMUM[key]}')
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f'{where}: key {key!r} is empty; give a value ({CONFIG_FIX})')
    for key in ('train_set', 'monitor_set'):
        if data.get(key) is None:
            data[key] = {}
    return check_config(LoopConfig(**data), where)


def _key_error(where: str, key: str, error: Exception, fix: str = '') -> ConfigError:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ConfigError(f'{where}: key {key!r}: {message}' + (f'; {fix}' if fix else ''))


def check_config(config: LoopConfig, where: str) -> LoopConfig:
    """
    Check the config's names, bundles and files; raise a one-line ConfigError if wrong.

    Return the config with its monitor_set values as the monitor reads them.
    """
    try:
        spec = get_task(config.task)
    except UserError as error:
        raise _key_error(where, 'task', error) from None
    if config.algorithm.lower().replace('-', '_') not in ALGORITHMS:
        raise ConfigError(f"{where}: key 'algorithm' is {config.algorithm!r}, not a "
                          f'registered algorithm; choose one of {", ".join(sorted(ALGORITHMS))}')
    module, fixed = get_algorithm(config.algorithm)
    try:
        module.make_config(config.preset, **fixed)
    except UserError as error:
        raise _key_error(where, 'preset', error) from None
    if 'steps' in config.train_set:
        raise ConfigError(f"{where}: key 'train_set' sets steps; give the training steps as "
                          "the key 'train_steps'")
    try:
        module.make_config(config.preset, **{**config.train_set, **fixed})
    except UserError as error:
        raise _key_error(where, 'train_set', error, 'fix or remove that field') from None
    start = check_bundle(config.start_bundle, 'start_bundle', spec.name, where)
    if config.monitor_bundle is not None:
        monitor = check_bundle(config.monitor_bundle, 'monitor_bundle', spec.name, where,
                               critic=True)
        judges = [(monitor.name, monitor.critic_kind)]
    else:
        if config.eval_shield:
            raise ConfigError(f"{where}: key 'eval_shield' is true but no 'monitor_bundle' is "
                              'given; set monitor_bundle or eval_shield: false')
        # Without a monitor bundle every deployment is monitored by the deployed bundle's own
        # critics: the start bundle and the algorithm's bundles must have one.
        if start.critic_kind == 'none':
            raise ConfigError(f"{where}: key 'monitor_bundle' is not set, and the start bundle "
                              f'{start.name!r} has no critic to monitor itself; set '
                              'monitor_bundle (e.g. models/fisor-ballcircle)')
        trained_kind = algorithm_critic(config.algorithm, spec.name)
        if trained_kind == 'none':
            raise ConfigError(f"{where}: key 'monitor_bundle' is not set, and "
                              f'{config.algorithm} bundles have no critic to monitor '
                              'themselves; set monitor_bundle (e.g. models/fisor-ballcircle)')
        judges = [(start.name, start.critic_kind),
                  (f'the {config.algorithm} bundles the loop exports', trained_kind)]
    monitor_set = check_monitor_set(config.monitor_set, where, judges)
    check_deploy_config(config.deploy_config, where)
    if config.base_dataset is not None and not Path(config.base_dataset).is_file():
        raise ConfigError(f"{where}: key 'base_dataset': {config.base_dataset} is not a file; "
                          'give a DSRL-format HDF5 file, or remove the key to use the '
                          f"task's dataset")
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{where}: key 'output': {output} exists and is not a folder; give "
                          'a folder for the loop')
    return replace(config, monitor_set=monitor_set)


def check_monitor_set(values: dict, where: str, monitors) -> dict:
    """
    Return key 'monitor_set' with its values as the monitor reads them.

    YAML's string '1e9' becomes the number; the values are checked as the monitor checks them
    and against the critic kind of each of ``monitors`` ((bundle name, critic kind) pairs:
    every critic that will judge with them).
    """
    from saferl_ros.monitor import check_applies, monitor_config

    for name in values:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: key 'monitor_set' has the name {name!r}; give "
                              'monitor parameter names, e.g. threshold_v')
    try:
        config = monitor_config(values)
        for name, kind in monitors:
            check_applies(values, kind, name)
    except UserError as error:
        raise _key_error(where, 'monitor_set', error, 'fix or remove that parameter') from None
    return {name: getattr(config, name) for name in values}


def check_bundle(value: str, key: str, task: str, where: str, critic: bool = False):
    """Return the verified bundle that config key ``key`` names (a one-line error otherwise)."""
    from saferl_ros.bundle import load_bundle

    try:
        bundle = load_bundle(resolve_path(value, f'key {key!r}'))
    except UserError as error:
        raise _key_error(where, key, error) from None
    if bundle.task_name != task:
        raise ConfigError(f'{where}: key {key!r}: {value} is a {bundle.task_name} bundle, the '
                          f'loop runs {task}; give a {task} bundle')
    if critic and bundle.critic_kind == 'none':
        raise ConfigError(f'{where}: key {key!r}: {value} ({bundle.algorithm}) has no critic '
                          'to judge actions with; give a bundle with a critic (e.g. '
                          'models/fisor-ballcircle)')
    return bundle


def algorithm_critic(algorithm: str, task: str) -> str:
    """Return the critic kind of the algorithm's bundles (from a tiny untrained model's plan)."""
    from offline_training.export import build_test_model

    _, plan = build_test_model(task, algorithm=algorithm, train_steps=0)
    return plan.critic['kind']


def check_deploy_config(value: str, where: str) -> Path:
    """Return the deployment's parameters file; it must start the simulated loop's four nodes."""
    from saferl_ros.bringup import load_parameters

    try:
        path = resolve_path(value, "key 'deploy_config'")
        nodes = load_parameters(path)
    except UserError as error:
        raise _key_error(where, 'deploy_config', error) from None
    missing = [name for name in graph.SIM_LOOP if name not in nodes]
    if missing:
        raise ConfigError(f"{where}: key 'deploy_config': {value} starts no {missing[0]}; give "
                          'a parameters file of the simulated loop (config/sim.yaml)')
    return path


# --------------------------------------------------------------------------- paths

def shown(path) -> str:
    """
    Return ``path`` as the commands get it: relative to the current folder when inside it.

    The commands record the paths they are given (the recording's bundle, the dataset's
    sources, the run's dataset): relative paths keep the machine's folders out of those files.
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def child_env() -> dict:
    """Return the environment of a stage's child process: this process's code first."""
    import saferl_ros

    root = str(Path(saferl_ros.__file__).resolve().parents[1])
    paths = [root] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(dict.fromkeys(paths))}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


# --------------------------------------------------------------------------- the loop

class Loop:
    """One loop's output folder: its state, its stages and the order they run in."""

    def __init__(self, config: LoopConfig, echo: Callable[[str], None] = print,
                 collect_missing: bool = False):
        self.config = config
        # Collect the task's dataset from the committed behaviour agents when none is found.
        self.collect_missing = collect_missing
        self.out = Path(config.output)
        self.echo = echo
        self.spec = get_task(config.task)
        self.start_bundle = resolve_path(config.start_bundle, "key 'start_bundle'")
        self.monitor = (None if config.monitor_bundle is None
                        else resolve_path(config.monitor_bundle, "key 'monitor_bundle'"))
        self.deploy_config = resolve_path(config.deploy_config, "key 'deploy_config'")
        self.state: dict = {}

    # ----------------------------------------------------------------- state

    @property
    def state_path(self) -> Path:
        """Return OUT/state.json."""
        return self.out / STATE

    def iteration_dir(self, k: int) -> Path:
        """Return OUT/iter-k."""
        return self.out / f'iter-{k}'

    def load_state(self) -> None:
        """Read the state file (or start one); refuse a folder made by another config."""
        if not self.state_path.exists():
            self.state = {'format': FORMAT, 'created': _now(), 'config': self.config.as_dict(),
                          'base_dataset': self.resolve_base_dataset(), 'stages': {}}
            return
        fix = 'delete the folder to start over, or give another output'
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f'{self.state_path}: not a readable state file ({error}); '
                              f'{fix}') from None
        if not isinstance(state, dict) or state.get('format') != FORMAT or \
                not isinstance(state.get('stages'), dict):
            raise ConfigError(f'{self.state_path}: not a {FORMAT} state file; {fix}')
        # A key the state file lacks (added to the loop after it was written) had its default.
        saved = {**config_defaults(), **state.get('config', {})}
        now = self.config.as_dict()
        changed = sorted(key for key in now
                         if key not in MAY_CHANGE and saved.get(key) != now[key])
        if changed:
            key = changed[0]
            raise ConfigError(f'{self.out}: this loop was run with {key}={saved.get(key)!r}, now '
                              f'{now[key]!r}; only {", ".join(sorted(MAY_CHANGE))} may change '
                              'between runs: restore it, or give another output folder')
        state['config'] = now
        for key in state['stages']:
            iteration, _, stage = key.partition('/')
            output = self.out / iteration / OUTPUTS.get(stage, '?')
            if not output.exists():
                raise ConfigError(f'{self.state_path} records {key} as done, but {output} is '
                                  f'missing; restore it, or {fix}')
        self.state = state

    def save_state(self) -> None:
        """Write the state file atomically."""
        atomic_write_json(self.state_path, self.state)

    def resolve_base_dataset(self) -> str:
        """Return the dataset iteration 0 extends: the config's, else the task's file."""
        from offline_training.data.dataset import DatasetError, resolve_dataset_path

        if self.config.base_dataset is not None:
            return shown(self.config.base_dataset)
        try:
            return shown(resolve_dataset_path(None, self.spec.name))
        except DatasetError as error:
            if not self.collect_missing:
                raise ConfigError(f"key 'base_dataset' is not set and "
                                  f'{error.problems[0].message} Or set base_dataset: PATH, or '
                                  'rerun with --collect-missing') from None
        from offline_training.data.cli import main as data_main

        self.echo(f'{PROG}: no {self.spec.name} dataset found: collecting it from the committed '
                  f'behaviour agents (saferl-data collect --task {self.spec.name}; about a '
                  'minute for a Ball task, up to 15 for CarCircle)')
        _check(data_main(['collect', '--task', self.spec.name]), 'collect the base dataset',
               'saferl-data collect')
        return shown(resolve_dataset_path(None, self.spec.name))

    def done(self, key: str) -> bool:
        """Return whether stage ``key`` (``iter-k/stage``) is recorded as done."""
        return key in self.state['stages']

    # ----------------------------------------------------------------- running

    def run(self) -> int:
        """Run every stage not yet done, in order; return how many ran."""
        from offline_training.loop_report import write_report

        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        with _locked(self.out / LOCK):
            try:
                self.load_state()
            except UserError:
                if created:   # e.g. no base dataset: leave no empty loop folder behind
                    shutil.rmtree(self.out, ignore_errors=True)
                raise
            self.save_state()
            ran = 0
            for k in range(self.config.iterations):
                for stage in STAGES:
                    key = f'iter-{k}/{stage}'
                    if self.done(key):
                        self.echo(f'{PROG}: {key}: done earlier, skipped')
                        continue
                    self.iteration_dir(k).mkdir(parents=True, exist_ok=True)
                    self.echo(f'{PROG}: {key}: start')
                    started = time.monotonic()
                    facts = getattr(self, stage)(k)
                    seconds = time.monotonic() - started
                    self.state['stages'][key] = {'finished': _now(),
                                                 'seconds': round(seconds, 1), **facts}
                    self.save_state()
                    ran += 1
                    self.echo(f'{PROG}: {key}: done in {seconds:.1f} s')
                    write_report(self.out, self.state)
            if not (self.out / 'report.md').exists():
                write_report(self.out, self.state)
        return ran

    # ----------------------------------------------------------------- the stages

    def deployed_bundle(self, k: int) -> Path:
        """Return the bundle iteration ``k`` deploys: the start bundle, then the last export."""
        return self.start_bundle if k == 0 else self.iteration_dir(k - 1) / BUNDLE

    def deploy(self, k: int) -> dict:
        """Run the bundle under the monitor in the simulator; record ``iter-k/recordings``."""
        from saferl_ros.recorder import INDEX, read_index, RECORDING

        folder = self.iteration_dir(k)
        final, partial = folder / RECORDINGS, folder / f'.{RECORDINGS}.partial'
        # A partial recording (an interrupted deployment), or a finished one the state does not
        # list (killed between the rename and the state write), is not trusted: deploy again.
        for stale in (partial, final):
            shutil.rmtree(stale, ignore_errors=True)
        # The config's own strings for its bundles (the bringup resolves them by the same
        # rule, from the same folder), so the recording names no folder of this machine.
        bundle = self.config.start_bundle if k == 0 else shown(self.deployed_bundle(k))
        label = self.config.start_bundle if k == 0 else f'iter-{k - 1}/{BUNDLE}'
        monitor = self.config.monitor_bundle or bundle
        seed = self.config.deploy_seed(k)
        safe_action = [0.0] * self.spec.act_dim
        settings = {
            f'{graph.SIM}.task': self.spec.name, f'{graph.SIM}.seed': seed,
            f'{graph.SIM}.safe_action': safe_action,
            f'{graph.CONTROLLER}.bundle': bundle, f'{graph.CONTROLLER}.seed': seed,
            f'{graph.MONITOR}.bundle': monitor, f'{graph.MONITOR}.seed': seed,
            f'{graph.MONITOR}.safe_action': safe_action,
            f'{graph.RECORDER}.task': self.spec.name, f'{graph.RECORDER}.bundle': bundle,
            f'{graph.RECORDER}.monitor_bundle': monitor,
            f'{graph.RECORDER}.output_dir': shown(partial), f'{graph.RECORDER}.run_name': 'run',
        }
        if self.config.deploy_horizon:
            settings[f'{graph.SIM}.horizon'] = self.config.deploy_horizon
        for name, value in self.config.monitor_set.items():
            settings[f'{graph.MONITOR}.{name}'] = value
        episodes = self.config.deploy_episodes
        cmd = [sys.executable, '-m', 'saferl_ros.bringup', shown(self.deploy_config),
               '--episodes', str(episodes)]
        for name, value in settings.items():
            cmd += ['--set', f'{name}={json.dumps(value)}']
        self.echo(f'{PROG}: iter-{k}/deploy: {label} monitored by {monitor}, {episodes} '
                  f'episodes (seed {seed}), log {shown(folder / DEPLOY_LOG)}')
        log = folder / DEPLOY_LOG
        with open(log, 'w') as stream:
            stream.write('$ ' + ' '.join(cmd[1:]) + '\n')
            stream.flush()
            code = _follow(subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT,
                                            env=child_env()),
                           partial / 'run' / INDEX, episodes, f'deploy iter-{k}')
        lines = log.read_text(errors='replace').splitlines()
        if code == 130:
            # Ctrl-C reached the bringup alone (the loop itself ignored it, e.g. started in the
            # background): it stopped in order, and the loop stops as if interrupted.
            raise KeyboardInterrupt
        if code != 0:
            for line in lines[-15:]:
                print(f'  | {line}', file=sys.stderr)
            raise StageError(f'iter-{k} deploy: saferl-bringup ended with exit status {code} '
                             f'(last lines above, all in {log}); fix the cause and rerun: '
                             'finished stages are kept')
        recording = partial / 'run'
        index = read_index(recording)
        # A stopped bringup (SIGTERM exits 0) keeps its episode in progress, marked partial.
        complete = [e for e in index['episodes'] if not e.get('partial')]
        if len(complete) != episodes or not (recording / RECORDING).is_file():
            raise StageError(f'iter-{k} deploy: the recording in {recording} holds '
                             f'{len(complete)} complete episodes of {episodes} (was the '
                             f'bringup stopped? see {log}); rerun to deploy again')
        # The bringup's table: reward, cost and fallback steps per episode, latency, counters.
        table = [i for i, line in enumerate(lines) if line.lstrip().startswith('episode ')]
        for line in lines[table[-1]:] if table else []:
            if not line.startswith('recording: '):   # it names the partial folder
                self.echo(f'  {line}')
        os.replace(recording, final)
        shutil.rmtree(partial, ignore_errors=True)
        self.echo(f'  recording: {shown(final)}')
        return {'bundle': label, 'bundle_sha256': index['attrs'].get('bundle_sha256'),
                'monitor_bundle': monitor,
                'monitor_bundle_sha256': index['attrs'].get('monitor_bundle_sha256'),
                'seed': seed, 'episodes': len(index['episodes']),
                'steps': sum(int(e['steps']) for e in index['episodes']),
                'recordings': f'iter-{k}/{RECORDINGS}'}

    def merge(self, k: int) -> dict:
        """Merge the recordings into the previous dataset -> ``iter-k/dataset.hdf5``."""
        from offline_training.data.cli import main as data_main
        from offline_training.data.dataset import MANIFEST_SUFFIX

        folder = self.iteration_dir(k)
        previous = (self.state['base_dataset'] if k == 0
                    else shown(self.iteration_dir(k - 1) / DATASET))
        out = folder / DATASET
        code = data_main(['merge', shown(folder / RECORDINGS), '--dataset', previous,
                          '--task', self.spec.name, '-o', shown(out)])
        _check(code, f'iter-{k} merge', 'saferl-data merge')
        manifest = json.loads(Path(str(out) + MANIFEST_SUFFIX).read_text())
        return {'dataset': f'iter-{k}/{DATASET}', 'previous': previous,
                'transitions': manifest['transitions'],
                'trajectories': manifest['trajectories'], 'sha256': manifest['sha256']}

    def train(self, k: int) -> dict:
        """Train a fresh run on the merged dataset -> ``iter-k/run`` (resumes its checkpoint)."""
        from offline_training.train import main as train_main

        folder = self.iteration_dir(k)
        config = self.config
        argv = [config.algorithm, '--task', self.spec.name, '--preset', config.preset,
                '--seed', str(config.seed), '--dataset', shown(folder / DATASET),
                '--out', shown(folder / RUN), '--threads', str(config.threads),
                '--checkpoint-every', str(CHECKPOINT_EVERY)]
        if config.train_steps is not None:
            argv += ['--steps', str(config.train_steps)]
        for name, value in config.train_set.items():
            argv += ['--set', f'{name}={json.dumps(value)}']
        _check(train_main(argv), f'iter-{k} train', 'saferl-train')
        summary = read_yaml_mapping(folder / RUN / 'summary.yaml',
                                    f'delete {folder / RUN} and rerun the loop')
        return {'run': f'iter-{k}/{RUN}', 'steps': int(summary['step']),
                'train_cpu_s': summary.get('train_cpu_s')}

    def evaluate(self, k: int) -> dict:
        """Evaluate the run in the simulator -> ``iter-k/eval/results.json``."""
        from offline_training.evaluate import main as eval_main

        folder = self.iteration_dir(k)
        final, partial = folder / EVAL, folder / f'.{EVAL}.partial'
        for stale in (partial, final):
            shutil.rmtree(stale, ignore_errors=True)
        config = self.config
        argv = [shown(folder / RUN), '--episodes', str(config.eval_episodes),
                '--seeds', str(config.seed), '--threads', str(config.threads),
                '-o', shown(partial / RESULTS)]
        if config.eval_shield:
            argv += ['--shield', shown(self.monitor)]
            for name, value in config.monitor_set.items():
                argv += ['--monitor-set', f'{name}={json.dumps(value)}']
        _check(eval_main(argv), f'iter-{k} evaluate', 'saferl-eval')
        os.replace(partial, final)
        results = json.loads((final / RESULTS).read_text())
        facts = {'results': f'iter-{k}/{EVAL}/{RESULTS}', 'episodes': results['summary']
                 ['episodes'], 'shielded': config.eval_shield}
        for kappa in (5, 10):
            normalized = kappa_entry(results['summary']['normalized'], kappa)
            facts[f'reward_norm_k{kappa}'] = normalized['reward']['mean']
            facts[f'cost_norm_k{kappa}'] = normalized['cost']['mean']
        return facts

    def export(self, k: int) -> dict:
        """Export the run as a verified bundle -> ``iter-k/bundle`` (the next deployment's)."""
        from offline_training.export import main as export_main

        folder = self.iteration_dir(k)
        name = f'{self.out.resolve().name}-iter{k}'
        _check(export_main([shown(folder / RUN), '-o', shown(folder / BUNDLE), '--force',
                            '--name', name]), f'iter-{k} export', 'saferl-export')
        return {'bundle': f'iter-{k}/{BUNDLE}', 'name': name,
                'manifest_sha256': sha256_file(folder / BUNDLE / 'manifest.yaml')}


def _check(code: int, stage: str, command: str) -> None:
    if code != 0:
        raise StageError(f'{stage}: {command} ended with exit status {code} (its message is '
                         'above); fix the cause and rerun: finished stages are kept')


def _follow(process: subprocess.Popen, index_file: Path, episodes: int, label: str) -> int:
    """
    Wait for the deployment, counting its recorded episodes on a progress bar; return its code.

    The recorder rewrites its index atomically after every episode, so reading it is safe. On
    KeyboardInterrupt the child is asked to stop in order (SIGINT: the monitor's safe action,
    the recording closed), killed after STOP_GRACE_S, and the interrupt goes on.
    """
    from tqdm import tqdm

    bar = tqdm(total=episodes, desc=label, unit='episode', dynamic_ncols=True, file=sys.stderr)
    try:
        while process.poll() is None:
            try:
                count = len(json.loads(index_file.read_text())['episodes'])
            except (OSError, ValueError, KeyError, TypeError):
                count = 0
            bar.update(max(0, min(count, episodes) - bar.n))
            time.sleep(0.5)
    except KeyboardInterrupt:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    finally:
        bar.close()
    return process.returncode


class _locked:
    """Hold an exclusive lock on a file: two loops must not write one folder at once."""

    def __init__(self, path: Path):
        self.path = path
        self.stream = None

    def __enter__(self):
        import fcntl

        self.stream = open(self.path, 'w')
        try:
            fcntl.flock(self.stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.stream.close()
            raise ConfigError(f'{self.path.parent}: another saferl-loop is running on this '
                              'folder; wait for it, or give another output') from None
        return self

    def __exit__(self, *exc):
        self.stream.close()


class _TermAsInterrupt:
    """SIGTERM stops the loop as Ctrl-C does (the stage in progress is not recorded)."""

    def _raise(self, signum, frame):
        raise KeyboardInterrupt

    def __enter__(self):
        import threading

        self.saved = None
        if threading.current_thread() is threading.main_thread():
            self.saved = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            signal.signal(signal.SIGTERM, self.saved)


@reports_user_errors(PROG)
def main(argv=None) -> int:
    """Command-line entry point of saferl-loop."""
    parser = argparse.ArgumentParser(
        prog=PROG, description='Run (or resume) the whole loop: deploy a bundle under the '
        'safety monitor in the simulator, record, merge into the dataset, retrain, evaluate, '
        'export, and again (docs/loop.md).')
    parser.add_argument('config', help='loop config (YAML), e.g. config/loop_ballcircle.yaml')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        type=parse_override, metavar='KEY=VALUE',
                        help='override a config key, e.g. --set iterations=1 (VALUE is YAML)')
    parser.add_argument('--collect-missing', action='store_true',
                        help="without base_dataset and without the task's dataset, collect it "
                        'first from the committed behaviour agents (saferl-data collect; '
                        '`make loop` passes this)')
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        raise MissingFileError(f'{args.config}: no such loop config file; give a YAML file '
                               f'({CONFIG_FIX})')
    config = read_config(args.config, dict(args.overrides))
    loop = Loop(config, collect_missing=args.collect_missing)
    with _TermAsInterrupt():
        try:
            ran = loop.run()
        except KeyboardInterrupt:
            print(f'{PROG}: interrupted; finished stages are recorded in {loop.state_path}: '
                  'rerun the same command to continue', file=sys.stderr)
            return 130
    done = sum(loop.done(f'iter-{k}/{stage}') for k in range(config.iterations)
               for stage in STAGES)
    print(f'{PROG}: {ran} stage(s) run, {done} of {config.iterations * len(STAGES)} done; '
          f'report {loop.out / "report.md"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
