"""
The results grid: every (method, task, seed) run of a results table, trained on Ray.

    saferl-grid                               # run (or resume) the grid here, one run per core
    saferl-grid --dry-run                     # print each saferl-train / saferl-eval command
    saferl-grid --only fisor-CarRun           # the runs whose name contains a string
    saferl-grid --address auto                # on a running Ray cluster (`ray start --head`)
    saferl-grid --table                       # rebuild the grid's results page

A run is one ``saferl-train`` command followed by one ``saferl-eval`` of its run folder. Both
resume or skip what is done: a finished run is not retrained and an existing results file is not
re-evaluated, so interrupting the grid (Ctrl-C, a lost machine) and starting it again loses at
most each run's checkpoint interval. Each run is a Ray task that asks for one CPU and runs with
one torch/OpenMP thread (these networks are too small to gain from more; two runs on two cores
do twice the work of one run on two threads). Locally Ray starts with ``--workers`` CPUs; with
``--address`` the runs go to an existing cluster, whose nodes need this repository at the same
path with ``runs/``, ``datasets/`` and ``docs/results/`` on a shared file system.

Grids are named (``--grid``); the default one is the grid docs/results.md reports (a ``Page``
of its runs: the offline methods). Adding a method is one line in its ``methods``. A method
may branch from another method's run of the same task and seed (``Method.branch_of``:
saferl-train --init-from the checkpoint that run kept at a step, e.g. DRCORL's end of
pretraining); Ray starts the branch once that run has finished.
A method may also train on a dataset the grid makes per task first (``Method.data`` names a
``DataStep``: one ``saferl-data`` command, e.g. OASIS's tempting variant and its reshaped file);
Ray starts the runs once their dataset is written, and a written dataset is not made again:
RUNS_DIR/data/TAG-TASK.made-by.json records the command and the source's sha256 that made it,
and files made otherwise (another preset, a newer dataset) are refused, not reused. Only runs
that still have to train need their datasets; finished runs are evaluated or skipped without.
"""

import argparse
import ctypes
from dataclasses import dataclass, replace
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from saferl_ros.errors import ConfigError, read_yaml_mapping, UserError
from saferl_ros.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
TASKS = ('BallCircle', 'CarCircle', 'DroneCircle', 'BallRun', 'CarRun', 'DroneRun')


@dataclass(frozen=True)
class Method:
    """One column of the results table: an algorithm with its steps, overrides and seeds."""

    tag: str                          # column name and run-name prefix, e.g. 'bc_safe-k5'
    algorithm: str                    # saferl-train's algorithm
    steps: int                        # training iterations
    overrides: Tuple[str, ...] = ()   # saferl-train --set KEY=VALUE items
    seeds: Tuple[int, ...] = (0,)     # training seeds
    # (method tag, step): start each run from that method's run of the same task and seed, at
    # the checkpoint it kept at that step (saferl-train --init-from); the run waits for it
    branch_of: Optional[Tuple[str, int]] = None
    # the tag of the grid's DataStep whose file the runs train on (None: the task's dataset);
    # ``{data}`` in an override is that step's RUNS_DIR/data/TAG-TASK prefix
    data: Optional[str] = None
    data_file: Optional[str] = None   # which of the step's files (a suffix; None: its first)
    tasks: Optional[Tuple[str, ...]] = None   # only these of the grid's tasks (None: all)
    # a command run after the evaluation, while the run folder is here, writing
    # RESULTS_DIR/reports/NAME-<report[0]>.json: report[1:] are its arguments (a console
    # script of this environment, or 'python' and its arguments) with ``{run}`` (the run
    # folder), ``{data}`` (the data step's prefix) and ``{out}`` filled in; e.g. DSPO's
    # discriminator check
    report: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class DataStep:
    """
    A dataset the grid makes for each task before the runs that train on it.

    One ``saferl-data`` command: ``args`` follow ``saferl-data``, with ``{source}``, ``{task}``,
    ``{preset}`` (the grid's), ``{prefix}`` (RUNS_DIR/data/TAG-TASK), ``{out}`` (the first
    file) and ``{data[TAG]}`` (the first file of a step in ``needs``) filled in. ``files``: the
    suffixes of the files it writes after the prefix; the step is done when all exist. Its source
    is the first file of the data step tagged ``source``, or the task's collected dataset when
    None.
    """

    tag: str
    args: Tuple[str, ...]
    source: Optional[str] = None
    # data steps whose files the command also reads (e.g. a generator another step saved beside
    # its file): made before this one, and their first files' sha256 recorded with its own
    needs: Tuple[str, ...] = ()
    files: Tuple[str, ...] = ('.hdf5',)
    # side files the command writes next to its first file (suffixes after that file's name,
    # e.g. reshape's '.report.json'), copied to RESULTS_DIR/data/TAG-TASK<suffix> to be kept
    keep: Tuple[str, ...] = ()

    @property
    def inputs(self) -> Tuple[str, ...]:
        """Return the tags of the data steps this one reads: its source, then its needs."""
        return ((self.source,) if self.source is not None else ()) + self.needs


@dataclass(frozen=True)
class Job:
    """One run of the grid: a method on a task with a training seed."""

    method: Method
    task: str
    seed: int

    @property
    def name(self) -> str:
        """Return the run name, LABEL-TASK-sSEED (also the run and results file names)."""
        return f'{self.method.tag}-{self.task}-s{self.seed}'

    @property
    def parent_name(self) -> Optional[str]:
        """Return the name of the run this one branches from (Method.branch_of), if any."""
        if self.method.branch_of is None:
            return None
        return f'{self.method.branch_of[0]}-{self.task}-s{self.seed}'


@dataclass(frozen=True)
class Page:
    """A further results page of a grid: only some of its methods, with its own notes."""

    path: Path                          # the markdown page, e.g. docs/results.md
    methods: Tuple[str, ...]            # the method tags it shows
    notes_path: Optional[Path] = None   # markdown appended below its tables


@dataclass
class Grid:
    """What runs (methods x tasks x seeds) and where its files go."""

    name: str
    methods: Tuple[Method, ...]
    tasks: Tuple[str, ...] = TASKS
    preset: str = 'cpu'
    device: str = 'cpu'
    eval_episodes: int = 20
    eval_seeds: Tuple[int, ...] = (0,)
    checkpoint_every: int = 2000
    runs_dir: Path = REPO / 'runs'
    results_dir: Path = REPO / 'docs' / 'results' / 'runs'
    table_path: Path = REPO / 'docs' / 'results.md'
    runs_page: Optional[Path] = REPO / 'docs' / 'results' / 'runs.md'   # None: not rebuilt
    notes_path: Optional[Path] = REPO / 'docs' / 'results' / 'NOTES.md'
    datasets_dir: Optional[Path] = None   # $DSRL_DATASET_DIR for the runs (None: the default)
    description: str = ''
    data_steps: Tuple[DataStep, ...] = ()  # datasets made per task (Method.data names one)
    kappas: Tuple[float, ...] = (5, 10)    # the results page's tables
    paper: str = 'fisor'                   # whose published rows stand beside ours
    pages: Tuple[Page, ...] = ()           # further pages built from some methods' results
    # a column trained for one threshold (tag ending in -kK) only in the table of κ = K
    match_kappa: bool = False
    # (grid name, method tag): another grid's results shown beside this grid's on its page
    # (e.g. DSPO's reference columns, FISOR and BC-Safe trained with cost labels)
    references: Tuple[Tuple[str, str], ...] = ()

    def jobs(self) -> List[Job]:
        """
        Return the runs in the order they are started.

        Every method's first seed on every task comes first (one complete table as early as
        possible), then the further seeds; within a round, tasks in the grid's order.
        """
        rounds = max(len(m.seeds) for m in self.methods)
        return [Job(method, task, method.seeds[k])
                for k in range(rounds)
                for task in self.tasks
                for method in self.methods
                if k < len(method.seeds) and (method.tasks is None or task in method.tasks)]


BASELINES_SHORT = (
    Method('bc_all', 'bc_all', 10_000),
    Method('bc_safe-k5', 'bc_safe', 10_000, ('cost_limit=5',)),
    Method('bc_safe-k10', 'bc_safe', 10_000, ('cost_limit=10',)),
    Method('bcq_lag-k5', 'bcq_lag', 5_000, ('cost_limit=5',)),
)


def own_folders(name: str) -> dict:
    """Return a grid's file places derived from its name (runs/NAME, docs/results/NAME...)."""
    results = REPO / 'docs' / 'results'
    return {'runs_dir': REPO / 'runs' / name, 'results_dir': results / name,
            'table_path': results / f'{name}.md', 'runs_page': results / f'{name}-runs.md',
            'notes_path': None}


GRIDS: Dict[str, Grid] = {
    # The grid of 21 Nov 2026 (docs/results/short.md): FISOR's joint schedule at 12 000
    # iterations (about 12 CPU-minutes), baselines at 5 000-10 000. Its runs and results files
    # keep their first places (runs/, docs/results/runs/).
    'short': Grid(
        'short',
        (Method('fisor', 'fisor', 12_000, ('schedule=joint',), seeds=(0, 1, 2)),
         *BASELINES_SHORT),
        table_path=REPO / 'docs' / 'results' / 'short.md',
        notes_path=REPO / 'docs' / 'results' / 'short-notes.md',
        # its runs page (docs/results/runs.md) was written by the tool before saferl-grid, with
        # columns this one does not make, from run folders that are gone: kept as it is
        runs_page=None,
        description='FISOR joint schedule, 12 000 iterations; baselines 5 000-10 000'),
    # About one core-hour per FISOR and BCQ-Lag run (FISOR's 'cpu' preset, critics-first: 40 000
    # critic iterations at ~40 it/s, then 60 000 actor iterations at ~24 it/s; BCQ-Lag ~14 it/s);
    # BC converges long before its 100 000 steps (~4 CPU-minutes).
    'core-hour': Grid(
        'core-hour',
        (Method('fisor', 'fisor', 100_000, seeds=(0, 1, 2)),
         # DRCORL's 'cpu' preset (kappa 10): 60k behaviour + 50k critic + 50k warm-start +
         # 2k adaptation iterations, about one core-hour
         Method('drcorl', 'drcorl', 162_000, seeds=(0, 1, 2)),
         # the same runs' stages 1-3, adapted with the official code's branch rule (one
         # simulator episode per iteration): online interaction, labelled so
         Method('drcorl-rollout', 'drcorl', 162_000, ('cost_estimate=rollout',), seeds=(0, 1, 2),
                branch_of=('drcorl', 160_000)),
         # the same runs' stages 1-3, then 50 000 critic-only TD iterations on the warm-started
         # policy (the critics evaluate it, not the behaviour policy) and the offline rule's
         # estimate over the data's initial states (docs/algorithms.md "DRCORL"), 15-20
         # CPU-minutes more: offline, its own column
         Method('drcorl-settled', 'drcorl', 212_000,
                ('critic_settle_steps=50000', 'estimate_states=initial'), seeds=(0, 1, 2),
                branch_of=('drcorl', 160_000)),
         Method('bc_all', 'bc_all', 100_000),
         Method('bc_safe-k5', 'bc_safe', 100_000, ('cost_limit=5',)),
         Method('bc_safe-k10', 'bc_safe', 100_000, ('cost_limit=10',)),
         Method('bcq_lag-k5', 'bcq_lag', 50_000, ('cost_limit=5',))),
        **{**own_folders('core-hour'),
           'notes_path': REPO / 'docs' / 'results' / 'core-hour-notes.md'},
        # docs/results.md: the offline methods (drcorl-rollout interacts with the simulator
        # while it trains, so it stays on core-hour.md)
        pages=(Page(REPO / 'docs' / 'results.md',
                    ('fisor', 'drcorl', 'drcorl-settled', 'bc_all', 'bc_safe-k5', 'bc_safe-k10',
                     'bcq_lag-k5'),
                    REPO / 'docs' / 'results' / 'NOTES.md'),),
        description='about one core-hour per FISOR (critics-first), DRCORL and BCQ-Lag run'),
    # FISOR's 'cpu' preset trained on one lent H200 by tools/gpu_grid.py (30 Nov 2026): 13 runs
    # sharing the GPU through MPS for about 5 minutes reached 36 000 iterations each (BallCircle
    # s0 and CarRun s0, trained after them beside the CUDA tests, 34 000). No DroneCircle run:
    # its dataset (64 MB) did not fit the machine's transfer limit. Evaluated here on the CPU.
    'h200': Grid(
        'h200',
        (Method('fisor', 'fisor', 34_000, seeds=(0, 1, 2)),),
        tasks=tuple(task for task in TASKS if task != 'DroneCircle'),
        **own_folders('h200'),
        description="FISOR 'cpu' preset (critics-first), 34 000-36 000 iterations on one H200"),
    # OASIS's protocol (its Table 1): each task's "tempting" variant (saferl-data tempting: 90 %
    # of the trajectories with cost return in [0, 30] removed), kappa = 20. OASIS is BCQ-Lag on
    # the file OASIS generates from the tempting data (one generator per task, generator seed 0,
    # its 'cpu' preset: about 1-1.5 CPU-hours); the baselines train on the tempting data itself.
    # Budgets as the core-hour grid's.
    'oasis': Grid(
        'oasis',
        (Method('oasis', 'oasis', 50_000, ('cost_limit=20',), seeds=(0, 1, 2), data='oasis-k20'),
         Method('bcq_lag-k20', 'bcq_lag', 50_000, ('cost_limit=20',), seeds=(0, 1, 2),
                data='tempting'),
         Method('fisor', 'fisor', 100_000, seeds=(0, 1, 2), data='tempting'),
         Method('bc_all', 'bc_all', 100_000, data='tempting'),
         Method('bc_safe-k20', 'bc_safe', 100_000, ('cost_limit=20',), data='tempting'),
         # ablation: OASIS with the same generator, its start states drawn as its training
         # windows were (--start-states training) instead of from any state of the data
         Method('oasis-training-starts', 'oasis', 50_000, ('cost_limit=20',),
                data='oasis-k20-training-starts'),
         # the data-efficiency check (the paper's Fig. 6, BallCircle): OASIS and BCQ-Lag on
         # 2 400 and 12 000 transitions (2 % and 10 % of the tempting file) drawn at random
         # as whole windows / trajectories from the generated and the tempting data
         *(Method(f'{tag}-n{n}', algorithm, 50_000, ('cost_limit=20',), data=f'{source}-n{n}',
                  tasks=('BallCircle',))
           for n in (2400, 12_000)
           for tag, algorithm, source in (('oasis', 'oasis', 'oasis-k20'),
                                          ('bcq_lag-k20', 'bcq_lag', 'tempting')))),
        data_steps=(
            DataStep('tempting', ('tempting', '{source}', '--task', '{task}', '-o', '{out}')),
            DataStep('oasis-k20', ('reshape', '{source}', '--task', '{task}', '--kappa', '20',
                                   '--preset', '{preset}', '--no-progress', '-o', '{out}'),
                     source='tempting',
                     # the generated returns against the conditions (json) and their picture
                     keep=('.report.json', '.conditions.png')),
            DataStep('oasis-k20-training-starts',
                     ('reshape', '{source}', '--task', '{task}', '--kappa', '20', '--preset',
                      '{preset}', '--start-states', 'training', '--generator',
                      '{data[oasis-k20]}.generator.pt', '--no-progress', '-o', '{out}'),
                     source='tempting', needs=('oasis-k20',),
                     keep=('.report.json', '.conditions.png')),
            *(DataStep(f'{source}-n{n}', ('subset', '{source}', '--task', '{task}',
                                          '--transitions', str(n), '-o', '{out}'), source=source)
              for n in (2400, 12_000) for source in ('oasis-k20', 'tempting'))),
        kappas=(20,), paper='oasis',
        **{**own_folders('oasis'), 'notes_path': REPO / 'docs' / 'results' / 'oasis-notes.md'},
        description="OASIS's protocol: tempting datasets, kappa 20; OASIS (BCQ-Lag on its "
                    'generated data, generator cpu preset) beside BCQ-Lag, FISOR, BC-All and '
                    'BC-Safe on the tempting data'),
    # DSPO's evaluation: per task and kappa, split-demos of the collected dataset (the 12 safe
    # demonstrations of highest reward, the other trajectories without costs, 20 % of them kept
    # out with their costs for the discriminator's check), then DSPO ('cpu' preset: 8000
    # discriminator + 80 000 diffusion + 100 000 BC iterations, about 40-50 CPU-minutes) beside
    # BC-All on the cost-free set and BC on the demonstrations alone. FISOR and BC-Safe on the
    # full labelled data, the reference with cost labels, are the core-hour grid's runs.
    'dspo': Grid(
        'dspo',
        tuple(method for kappa in (10, 5) for method in (
            Method(f'dspo-k{kappa}', 'dspo', 188_000, ('demos={data}-demos.hdf5',),
                   seeds=(0, 1, 2), data=f'split-k{kappa}',
                   # z_tau against the held-out trajectories' true safety (AUC, correlations)
                   report=('discriminator', 'python', '-m',
                           'offline_training.discriminator_quality', '{run}',
                           '{data}-heldout.hdf5', '--kappa', str(kappa), '-o', '{out}')),
            Method(f'bc_all-unlabelled-k{kappa}', 'bc_all', 100_000, data=f'split-k{kappa}'),
            Method(f'bc_all-demos-k{kappa}', 'bc_all', 100_000, data=f'split-k{kappa}',
                   data_file='-demos.hdf5'))),
        data_steps=tuple(
            DataStep(f'split-k{kappa}', ('split-demos', '{source}', '--task', '{task}', '--kappa',
                                         str(kappa), '--holdout', '0.2', '-o', '{prefix}'),
                     files=('-unlabelled.hdf5', '-demos.hdf5', '-heldout.hdf5'))
            for kappa in (10, 5)),
        kappas=(10, 5), paper='none', match_kappa=True,
        references=(('core-hour', 'fisor'), ('core-hour', 'bc_safe-k10'),
                    ('core-hour', 'bc_safe-k5')),
        **{**own_folders('dspo'), 'notes_path': REPO / 'docs' / 'results' / 'dspo-notes.md'},
        description='DSPO (cpu preset) on a cost-free split with 12 safe demonstrations per '
                    'kappa, beside BC-All on the cost-free set and BC on the demonstrations'),
    # The paper's settings for a GPU machine: FISOR's 'paper' preset (joint schedule) at 1M
    # iterations, the baselines at OSRL's 100 000 steps.
    'paper': Grid(
        'paper',
        (Method('fisor', 'fisor', 1_000_000, seeds=(0, 1, 2)),
         Method('bc_all', 'bc_all', 100_000),
         Method('bc_safe-k5', 'bc_safe', 100_000, ('cost_limit=5',)),
         Method('bc_safe-k10', 'bc_safe', 100_000, ('cost_limit=10',)),
         Method('bcq_lag-k5', 'bcq_lag', 100_000, ('cost_limit=5',))),
        preset='paper', device='cuda', checkpoint_every=10_000,
        **own_folders('paper'),
        description="the paper's settings (FISOR 'paper' preset, 1M iterations) on CUDA"),
}
DEFAULT_GRID = 'core-hour'


def repo_relative(path) -> Path:
    """
    Return ``path`` relative to the repository when it lies inside it.

    The commands run in the repository folder, so relative paths work, and the results files
    they write (which record their sources) name no path of the machine that ran them.
    """
    try:
        return Path(path).resolve().relative_to(REPO)
    except ValueError:
        return Path(path)


def fill_placeholders(items: Sequence[str], job: Job, grid: Grid, **values) -> List[str]:
    """Return ``items`` with ``{data}`` (the job's data step prefix) and ``{KEY}`` of values."""
    if job.method.data is not None:
        values['data'] = repo_relative(data_prefix(job.method.data, job.task, grid))
    filled = []
    for item in items:
        for key, value in values.items():
            item = item.replace(f'{{{key}}}', str(value))
        filled.append(item)
    return filled


def report_command(job: Job, grid: Grid) -> Optional[Tuple[List[str], Path]]:
    """Return (the run's report command, the file it writes), or None if it has none."""
    if job.method.report is None:
        return None
    out = repo_relative(Path(grid.results_dir) / 'reports' /
                        f'{job.name}-{job.method.report[0]}.json')
    run = repo_relative(Path(grid.runs_dir) / job.name)
    return fill_placeholders(job.method.report[1:], job, grid, run=run, out=out), out


def commands(job: Job, grid: Grid) -> Tuple[List[str], List[str], Path]:
    """Return (train command, evaluation command, results file) of one run."""
    run_dir = repo_relative(Path(grid.runs_dir) / job.name)
    train = ['saferl-train', job.method.algorithm, '--task', job.task, '--preset', grid.preset,
             '--seed', str(job.seed), '--steps', str(job.method.steps), '--out', str(run_dir),
             '--threads', '1', '--no-progress', '--log-every', '500',
             '--checkpoint-every', str(grid.checkpoint_every), '--device', grid.device]
    overrides = fill_placeholders(job.method.overrides, job, grid)
    if job.method.data is not None:
        train += ['--dataset', str(repo_relative(data_path(job.method.data, job.task, grid,
                                                           job.method.data_file)))]
    for item in overrides:
        train += ['--set', item]
    if job.method.branch_of is not None:
        from offline_training.runs import kept_checkpoint_path
        train += ['--init-from', str(kept_checkpoint_path(
            repo_relative(Path(grid.runs_dir) / job.parent_name), job.method.branch_of[1]))]
    results = repo_relative(Path(grid.results_dir) / f'{job.name}.json')
    evaluate = ['saferl-eval', str(run_dir), '--episodes', str(grid.eval_episodes),
                '--seeds', *map(str, grid.eval_seeds), '--threads', '1', '--no-progress',
                '-o', str(results)]
    return train, evaluate, results


def data_prefix(tag: str, task: str, grid: Grid) -> Path:
    """Return where the grid's data step ``tag`` writes for ``task``: RUNS_DIR/data/TAG-TASK."""
    return Path(grid.runs_dir) / 'data' / f'{tag}-{task}'


def data_path(tag: str, task: str, grid: Grid, file: Optional[str] = None) -> Path:
    """Return a file the data step ``tag`` makes for ``task`` (suffix ``file``; its first)."""
    file = data_step(tag, grid).files[0] if file is None else file
    return Path(str(data_prefix(tag, task, grid)) + file)


def data_files(step: 'DataStep', task: str, grid: Grid) -> List[Path]:
    """Return every file one data step makes for one task."""
    return [data_path(step.tag, task, grid, file) for file in step.files]


def data_step(tag: str, grid: Grid) -> DataStep:
    """Return the grid's data step tagged ``tag`` (ConfigError if it has none)."""
    for step in grid.data_steps:
        if step.tag == tag:
            return step
    raise ConfigError(f'grid {grid.name!r} has no data step {tag!r} (it has '
                      f'{", ".join(s.tag for s in grid.data_steps) or "none"})')


def data_source(step: DataStep, task: str, grid: Grid) -> Path:
    """
    Return the file one data step reads for one task.

    A step without a source reads the task's collected dataset, found as the runs find it
    (the grid's datasets_dir first); DatasetNotFoundError if there is none.
    """
    if step.source is not None:
        return data_path(step.source, task, grid)
    from offline_training.data.dataset import dataset_dirs, resolve_dataset_path
    dirs = ([Path(grid.datasets_dir)] if grid.datasets_dir is not None else []) + dataset_dirs()
    return resolve_dataset_path(task=task, dirs=dirs)


def data_stamp_path(step: DataStep, task: str, grid: Grid) -> Path:
    """Return the record of what made a data step's files (command, source sha256)."""
    return Path(str(data_prefix(step.tag, task, grid)) + '.made-by.json')


def _check_stamp(stamp: Path, made_by: dict) -> str:
    """
    Return the status of a data step whose files exist (made by this command, from this data).

    Files made by another command or from other data (another preset, a newer dataset) are
    not silently reused; files without a record (made before records were kept) are adopted,
    and the status says so.
    """
    if not stamp.is_file():
        atomic_write_json(stamp, dict(made_by, adopted=True))
        return 'done already (no record of what made it: adopted as made by this command)'
    try:
        before = json.loads(stamp.read_text())
    except (OSError, ValueError):
        before = {}
    if before.get('command') == made_by['command'] and \
            before.get('source_sha256') == made_by['source_sha256'] and \
            before.get('needs_sha256') == made_by.get('needs_sha256'):
        return 'done already'
    if before.get('command') != made_by['command']:
        what = 'another command: ' + ' '.join(before.get('command') or ['?'])
    elif before.get('source_sha256') != made_by['source_sha256']:
        what = 'another version of its source'
    else:
        what = f'another version of its inputs ({", ".join(made_by.get("needs_sha256") or ())})'
    prefix = str(repo_relative(stamp))[:-len('.made-by.json')]
    return (f'FAILED: its files were made by {what}; delete them ({prefix}*) to make them '
            'again with this one, or run the grid as it was')


def data_command(step: DataStep, task: str, grid: Grid) -> List[str]:
    """Return the saferl-data command of one data step for one task (data_source's errors)."""
    source = data_source(step, task, grid)
    fill = {'source': str(repo_relative(source)), 'task': task, 'preset': grid.preset,
            'prefix': str(repo_relative(data_prefix(step.tag, task, grid))),
            'out': str(repo_relative(data_path(step.tag, task, grid))),
            'data': {tag: str(repo_relative(data_path(tag, task, grid))) for tag in step.needs}}
    return ['saferl-data', *(arg.format(**fill) for arg in step.args)]


def data_steps_needed(jobs: Sequence[Job], grid: Grid) -> List[Tuple[DataStep, str]]:
    """Return the (data step, task) pairs that ``jobs`` need, each after its source."""
    needed: List[Tuple[DataStep, str]] = []

    def add(tag: str, task: str) -> None:
        step = data_step(tag, grid)
        for before in step.inputs:
            add(before, task)
        if (step, task) not in needed:
            needed.append((step, task))

    for job in jobs:
        if job.method.data is not None:
            add(job.method.data, job.task)
    return needed


def still_to_train(jobs: Sequence[Job], grid: Grid) -> List[Job]:
    """
    Return the jobs that will train: neither evaluated (results file) nor trained already.

    Only they need their data steps: a grid whose runs are done makes no dataset again (the
    runs folder and its datasets need not be on this machine).
    """
    return [job for job in jobs if not (REPO / commands(job, grid)[2]).exists()
            and not trained_already(job, grid)]


def needs_report(job: Job, grid: Grid) -> bool:
    """Return whether an evaluated (or trained) run still lacks its report and can make it."""
    report = report_command(job, grid)
    return (report is not None and not (REPO / report[1]).exists()
            and (Path(grid.runs_dir) / job.name).is_dir())


def needing_data(jobs: Sequence[Job], grid: Grid) -> List[Job]:
    """Return the jobs that read their data steps: those still to train or to report on."""
    training = {job.name for job in still_to_train(jobs, grid)}
    return [job for job in jobs if job.name in training or needs_report(job, grid)]


def data_step_name(step: DataStep, task: str) -> str:
    """Return a data step's name in the grid's statuses and logs."""
    return f'data-{step.tag}-{task}'


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when its parent (the Ray worker) dies; no-op elsewhere."""
    try:
        libc = ctypes.CDLL('libc.so.6', use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def log_path(job: Job, grid: Grid) -> Path:
    """Return the log file of one run (both commands' output, appended across attempts)."""
    return Path(grid.runs_dir) / 'logs' / f'{job.name}.log'


def trained_already(job: Job, grid: Grid) -> bool:
    """Return whether the run's summary.yaml says it trained all of the method's steps."""
    summary = Path(grid.runs_dir) / job.name / 'summary.yaml'
    try:
        return int(read_yaml_mapping(summary, 'retrain the run')['step']) >= job.method.steps
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return False


def branch_source_missing(job: Job, grid: Grid) -> Optional[str]:
    """
    Return why a branching run cannot start (its source checkpoint is missing), else None.

    A branch already begun resumes from its own copy; a new one needs the checkpoint its parent
    kept, which a parent trained before checkpoints were kept, trained elsewhere or deleted
    does not have.
    """
    from offline_training.runs import kept_checkpoint_path

    if (Path(grid.runs_dir) / job.name / 'checkpoint.pt').exists():
        return None
    parent_dir = Path(grid.runs_dir) / job.parent_name
    kept = kept_checkpoint_path(parent_dir, job.method.branch_of[1])
    if kept.is_file():
        return None
    return (f'it branches from {job.parent_name} at step {job.method.branch_of[1]}, but '
            f'{repo_relative(kept)} does not exist (that run was trained before it kept '
            'checkpoints, elsewhere, or not at all); retrain it (delete its folder and '
            f'{repo_relative(Path(grid.results_dir) / (job.parent_name + ".json"))}), then '
            'rerun')


def check_branches(grid: Grid) -> None:
    """
    Raise ConfigError unless every Method.branch_of names an earlier method of the grid.

    That method must have every seed of the branching one, so that the parent's run of each
    task and seed is started first.
    """
    seen = {}
    for method in grid.methods:
        if method.branch_of is not None:
            parent = seen.get(method.branch_of[0])
            if parent is None or not set(method.seeds) <= set(parent.seeds):
                raise ConfigError(f'grid {grid.name!r}: method {method.tag!r} branches from '
                                  f'{method.branch_of[0]!r}, which is not an earlier method of '
                                  'the grid with all of its seeds; list that method first')
        seen[method.tag] = method


def check_data_steps(grid: Grid) -> None:
    """
    Raise ConfigError unless every Method.data, DataStep.source and DataStep.needs names one.

    A data step's source and needs must be earlier steps of the grid (so that none waits on
    itself).
    """
    seen = set()
    for step in grid.data_steps:
        if step.tag in seen:
            raise ConfigError(f'grid {grid.name!r}: two data steps are tagged {step.tag!r}')
        for tag in step.inputs:
            if tag not in seen:
                raise ConfigError(f'grid {grid.name!r}: data step {step.tag!r} reads {tag!r}, '
                                  'which is not an earlier data step of the grid; list it first')
        seen.add(step.tag)
    for method in grid.methods:
        if method.data is None and any('{data}' in item for item in method.overrides):
            raise ConfigError(f'grid {grid.name!r}: method {method.tag!r} has {{data}} in an '
                              'override but trains on no data step (set Method.data)')
        if method.data is not None and method.data not in seen:
            raise ConfigError(f'grid {grid.name!r}: method {method.tag!r} trains on data step '
                              f'{method.data!r}, which the grid does not have')
        files = data_step(method.data, grid).files if method.data is not None else ()
        if method.data_file is not None and method.data_file not in files:
            raise ConfigError(f'grid {grid.name!r}: method {method.tag!r} trains on file '
                              f'{method.data_file!r} of data step {method.data!r}, which writes '
                              f'only {", ".join(files) or "nothing (no data step)"}')


def reference_files(grid: Grid) -> List[Path]:
    """Return the results files of the grid's references (Grid.references) that exist."""
    files = []
    for name, tag in grid.references:
        other = GRIDS[name]
        files += [Path(other.results_dir) / f'{job.name}.json' for job in other.jobs()
                  if job.method.tag == tag and job.task in grid.tasks]
    return [path for path in files if path.is_file()]


def check_pages(grid: Grid) -> None:
    """Raise ConfigError unless every page shows only methods of the grid (or references)."""
    tags = {method.tag for method in grid.methods}
    for name, tag in grid.references:
        if name not in GRIDS or tag not in {method.tag for method in GRIDS[name].methods}:
            raise ConfigError(f'grid {grid.name!r}: reference {name}/{tag} names no method of '
                              f'a grid (grids: {", ".join(sorted(GRIDS))})')
        if name == grid.name or tag in tags:
            # its runs would pool with the grid's own column of that name in one cell
            raise ConfigError(f'grid {grid.name!r}: reference {name}/{tag} is the grid itself '
                              f'or shares a column name with one of its methods; rename one')
    for page in grid.pages:
        unknown = [tag for tag in page.methods if tag not in tags]
        if unknown or not page.methods:
            raise ConfigError(f'grid {grid.name!r}: page {repo_relative(page.path)} shows '
                              f'{", ".join(unknown) or "no method"}, not among the grid\'s '
                              f'methods ({", ".join(sorted(tags))})')


def _run_commands(cmds: Sequence[List[str]], log: Path, grid: Grid) -> Optional[str]:
    """Run commands one after another (one thread each), output to ``log``; return a failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    if grid.datasets_dir is not None:
        env['DSRL_DATASET_DIR'] = str(grid.datasets_dir)
    bin_dir = Path(sys.executable).parent
    with open(log, 'a') as stream:
        for cmd in cmds:
            stream.write(f'$ {" ".join(cmd)}\n')
            stream.flush()
            code = subprocess.call([str(bin_dir / cmd[0])] + cmd[1:], stdout=stream,
                                   stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   preexec_fn=_die_with_parent)
            if code != 0:
                return f'FAILED (exit {code}; log: {repo_relative(log)})'
    return None


def run_data_step(step: DataStep, task: str, grid: Grid, *after) -> Tuple[str, str]:
    """
    Make one data step's file for one task unless it exists; return (name, status).

    ``after``: the Ray result of the step it reads (Ray starts this one once it is finished).
    saferl-data writes each file in one rename, so a file that exists is complete; the files of
    a step interrupted between two of them are removed and the step made again.
    """
    from offline_training.data.dataset import DatasetError
    from saferl_ros.files import sha256_file

    name = data_step_name(step, task)
    outputs = data_files(step, task, grid)
    for tag in step.inputs:
        if not data_path(tag, task, grid).is_file():
            role = 'source' if tag == step.source else 'input'
            return name, (f'FAILED: its {role} {repo_relative(data_path(tag, task, grid))} '
                          "was not made (see that step's log)")
    try:
        cmd = data_command(step, task, grid)
    except DatasetError as error:
        return name, f'FAILED: {error}'
    made_by = {'command': cmd, 'source_sha256': sha256_file(data_source(step, task, grid))}
    if step.needs:
        made_by['needs_sha256'] = {tag: sha256_file(data_path(tag, task, grid))
                                   for tag in step.needs}
    stamp = data_stamp_path(step, task, grid)
    if all(out.is_file() for out in outputs):
        return name, _check_stamp(stamp, made_by)
    for out in outputs:         # the files of a step interrupted between two of them
        out.unlink(missing_ok=True)
    outputs[0].parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    failure = _run_commands([cmd], Path(grid.runs_dir) / 'logs' / f'{name}.log', grid)
    missing = [str(repo_relative(out)) for out in outputs if not out.is_file()]
    if failure is None and missing:
        failure = f'FAILED: the command did not write {", ".join(missing)}'
    if failure is None:
        atomic_write_json(stamp, made_by)
        failure = keep_side_files(step, task, grid)
    return name, failure or f'ok in {time.time() - start:.0f} s'


def keep_side_files(step: DataStep, task: str, grid: Grid) -> Optional[str]:
    """Copy a data step's side files (DataStep.keep) into the results; return a failure."""
    import shutil

    kept = Path(grid.results_dir) / 'data'
    for suffix in step.keep:
        side = Path(str(data_files(step, task, grid)[0]) + suffix)
        if not side.is_file():
            return f'FAILED: the command did not write {repo_relative(side)}'
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(side, kept / f'{step.tag}-{task}{suffix}')
    return None


def run_job(job: Job, grid: Grid, *after) -> Tuple[str, str]:
    """
    Train (or resume) one run and evaluate it unless its results exist; return a status.

    ``after``: the Ray results of the run this one branches from and of the data step it trains
    on (Ray starts it once they are finished; their values are not needed).
    """
    train, evaluate, results = commands(job, grid)
    report = report_command(job, grid)
    if (REPO / results).exists():
        if not needs_report(job, grid):
            return job.name, 'done already'
        # evaluated before its report existed (or its report failed): the report alone
        failure = _run_report(report, job, grid)
        return job.name, failure or 'report made'
    log = log_path(job, grid)
    if trained_already(job, grid):
        # e.g. trained on a GPU machine by tools/gpu_grid.py, whose slimmed checkpoint can be
        # evaluated but not resumed
        train = None
    elif (Path(grid.runs_dir) / job.name / 'SLIMMED.txt').exists():
        return job.name, (f'FAILED: trained on another machine to fewer than '
                          f'{job.method.steps} steps and slimmed (cannot resume); evaluate it '
                          f'under a grid whose method has as many steps as it trained (e.g. '
                          f'h200), or delete {repo_relative(Path(grid.runs_dir) / job.name)} '
                          'to retrain')
    if train is not None and job.method.branch_of is not None:
        problem = branch_source_missing(job, grid)
        if problem:
            return job.name, f'FAILED: {problem}'
    # Ray hands over the results of the tasks this one waited for: a data step that failed
    # (e.g. its files were made by another command) means its file is not this run's to use.
    failed = [f'{name}: {status}' for name, status in after
              if name.startswith('data-') and status.startswith('FAILED')]
    if train is not None and failed:
        return job.name, f'FAILED: its data step failed ({failed[0]})'
    if train is not None and job.method.data is not None:
        data = data_path(job.method.data, job.task, grid, job.method.data_file)
        if not data.is_file():
            return job.name, (f'FAILED: its dataset {repo_relative(data)} was not made (see '
                              f'{repo_relative(log.parent)}/data-{job.method.data}-'
                              f'{job.task}.log)')
    start = time.time()
    # a report left from an earlier training of this run would describe another model
    failure = (_run_commands(list(filter(None, (train, evaluate))), log, grid)
               or (report and _run_report(report, job, grid)))
    return job.name, failure or f'ok in {time.time() - start:.0f} s'


def _run_report(report: Tuple[List[str], Path], job: Job, grid: Grid) -> Optional[str]:
    """Run a job's report command (replacing any earlier report); return a failure."""
    (REPO / report[1]).unlink(missing_ok=True)
    (REPO / report[1]).parent.mkdir(parents=True, exist_ok=True)
    failure = _run_commands([report[0]], log_path(job, grid), grid)
    return failure and f'FAILED (its report: {failure[len("FAILED ("):]}'


def run_grid(jobs: Sequence[Job], grid: Grid, workers: int = 2,
             address: Optional[str] = None, echo=print) -> Dict[str, str]:
    """
    Run ``jobs`` (and the data steps they need) as Ray tasks of one CPU each.

    Return {run or data step name: status}. Without ``address`` a local Ray instance with
    ``workers`` CPUs runs them; with it, the cluster at that address. Statuses are echoed as
    they finish. On Ctrl-C the runs in flight are cancelled (their training processes stop with
    their Ray workers; rerunning resumes them) and KeyboardInterrupt propagates.
    """
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # Ray lowers its workers' priority (nice 15) by default; on a machine shared with other
        # work that starves the runs. Local runs keep this command's priority (use `nice` on it).
        os.environ.setdefault('RAY_worker_niceness', '0')
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    statuses: Dict[str, str] = {}
    pending: Dict[object, str] = {}
    try:
        remote_step = ray.remote(num_cpus=1, max_retries=0)(run_data_step)
        remote_job = ray.remote(num_cpus=1, max_retries=0)(run_job)
        # Each Ray task waits for the results it is given: a data step for the one it reads, a
        # run for the run it branches from and for the data step it trains on.
        data_refs = {}
        for step, task in data_steps_needed(needing_data(jobs, grid), grid):
            source = data_refs.get((step.source, task))
            ref = remote_step.remote(step, task, grid, *([source] if source else []))
            data_refs[(step.tag, task)] = ref
            pending[ref] = data_step_name(step, task)
        refs = {}
        for job in jobs:
            after = [ref for ref in (refs.get(job.parent_name),
                                     data_refs.get((job.method.data, job.task))) if ref]
            refs[job.name] = remote_job.remote(job, grid, *after)
            pending[refs[job.name]] = job.name
        total = len(pending)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                name, status = ray.get(done[0])
            except ray.exceptions.RayError as error:
                status = f'FAILED (Ray: {type(error).__name__}: {error})'
            statuses[name] = status
            echo(f'{time.strftime("%H:%M:%S")} [{len(statuses)}/{total}] {name}: {status}')
    except KeyboardInterrupt:
        for ref in list(pending):
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.shutdown()
    return statuses


def finished_rows(runs_page: Path) -> Dict[str, str]:
    """Return the finished runs' rows of an existing runs page, by run name."""
    rows = {}
    if runs_page.is_file():
        for line in runs_page.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            if line.startswith('| ') and len(cells) == 9 and cells[3].isdigit():
                rows[cells[0]] = line
    return rows


def runs_table(grid: Grid, kept: Optional[Dict[str, str]] = None) -> str:
    """
    Return a markdown table of the grid's runs: budget, data, machine and code of each.

    A run whose folder is not here (trained on another machine, or not unpacked) keeps its row
    from ``kept`` (the page's earlier finished rows) rather than turning "not finished".
    """
    lines = ['| run | preset | overrides | steps | training CPU | it/s | dataset (sha256) | '
             'machine | code |',
             '|---|---|---|---:|---:|---:|---|---|---|']
    for job in grid.jobs():
        run_dir = Path(grid.runs_dir) / job.name
        overrides = ', '.join(job.method.overrides) or '–'
        if not (run_dir / 'summary.yaml').is_file() and job.name in (kept or {}):
            lines.append(kept[job.name])
            continue
        if not (run_dir / 'summary.yaml').is_file():
            lines.append(f'| {job.name} | {grid.preset} | {overrides} | not finished | | | | | |')
            continue
        config = read_yaml_mapping(run_dir / 'config.yaml', 'retrain the run')
        summary = read_yaml_mapping(run_dir / 'summary.yaml', 'retrain the run')
        data = config.get('dataset', {})
        # runs from before summaries recorded them: wall time of the last session, no machine
        cpu = summary.get('train_cpu_s')
        budget = f'{cpu / 60:.1f} min' if cpu is not None else (
            f'{summary["wall_time_s"] / 60:.1f} min (wall)')
        machine = summary.get('machine', {}).get('cpu', '?')
        if str(config.get('device', 'cpu')).startswith('cuda'):
            machine += f" + {summary.get('machine', {}).get('gpu') or 'a CUDA GPU'}"
        lines.append(
            f'| {job.name} | {config["preset"]} | {overrides} | {summary["step"]} | {budget} | '
            f'{summary["it_per_s"]:.1f} | `{Path(data.get("path", "?")).name}` '
            f'({str(data.get("sha256", ""))[:8]}) | {machine} | '
            f'{config.get("code_version", "?")} |')
    return (f'Grid `{grid.name}`: {grid.description}. One run per core, one torch thread each; '
            'training CPU excludes evaluation.\n\n' + '\n'.join(lines) + '\n')


def write_tables(grid: Grid) -> int:
    """Write the grid's runs table and build its results page (wraps `saferl-eval table`)."""
    if grid.runs_page is not None:
        runs_page = Path(grid.runs_page)
        runs_page.parent.mkdir(parents=True, exist_ok=True)
        # Runs made on another machine (or not unpacked here) keep their finished rows; the
        # results page is rebuilt from the results files alone.
        runs_page.write_text(f'# The runs of grid `{grid.name}`\n\n<!-- generated by '
                             f'`saferl-grid --grid {grid.name} --table` -->\n\n'
                             + runs_table(grid, kept=finished_rows(runs_page)))
    files = sorted(Path(grid.results_dir).glob('*.json'))     # not reports/ (Method.report)
    if not files:
        print(f'saferl-grid: error: no results files in {repo_relative(grid.results_dir)}; '
              f'run `saferl-grid --grid {grid.name}` first', file=sys.stderr)
        return 2
    code = table_command(grid, files + reference_files(grid), grid.table_path, grid.notes_path)
    for page in grid.pages:
        names = {job.name for job in grid.jobs() if job.method.tag in page.methods}
        shown = [path for path in files if path.stem in names]
        if not shown:
            print(f'error: no results files of {", ".join(page.methods)} in '
                  f'{repo_relative(grid.results_dir)} for {repo_relative(page.path)}',
                  file=sys.stderr)
            code = code or 1
            continue
        code = table_command(grid, shown, page.path, page.notes_path) or code
    return code


def table_command(grid: Grid, files: Sequence[Path], out: Path, notes: Optional[Path]) -> int:
    """Build one results page from results files with `saferl-eval table`; its exit status."""
    cmd = [str(Path(sys.executable).parent / 'saferl-eval'), 'table',
           *(str(repo_relative(path)) for path in files),
           '-o', str(repo_relative(out)), '--kappa', *(f'{k:g}' for k in grid.kappas)]
    if notes is not None:
        cmd += ['--notes', str(repo_relative(notes))]
    if grid.paper != 'fisor':
        cmd += ['--paper', grid.paper]
    if grid.match_kappa:
        cmd.append('--match-kappa')
    return subprocess.call(cmd, cwd=REPO)


def main(argv=None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('--grid', default=DEFAULT_GRID, choices=sorted(GRIDS),
                        help=f'which grid (default {DEFAULT_GRID!r})')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help="local Ray CPUs: runs at a time (default: this machine's cores)")
    parser.add_argument('--address', default=None,
                        help="a Ray cluster's address ('auto' for the local `ray start` one)")
    parser.add_argument('--only', nargs='*', default=None,
                        help='run only the runs whose name contains one of these strings')
    parser.add_argument('--dry-run', action='store_true', help='print the commands only')
    parser.add_argument('--table', action='store_true', help="only rebuild the grid's tables")
    parser.add_argument('--preset', default=None, help="training preset (default the grid's)")
    parser.add_argument('--device', default=None, choices=('cpu', 'cuda', 'auto'),
                        help="'cpu', 'cuda' or 'auto'")
    parser.add_argument('--runs-dir', type=Path, default=None)
    parser.add_argument('--results-dir', type=Path, default=None)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f'--workers must be >= 1 (got {args.workers})')
    grid = GRIDS[args.grid]
    changes = {key: value for key, value in (
        ('preset', args.preset), ('device', args.device), ('runs_dir', args.runs_dir),
        ('results_dir', args.results_dir)) if value is not None}
    grid = replace(grid, **changes)
    if args.preset is not None:
        # refused here, not by every run after Ray has started them all
        from offline_training.algos import get_algorithm
        lacking = sorted({m.algorithm for m in grid.methods
                          if args.preset not in get_algorithm(m.algorithm)[0].PRESETS})
        if lacking:
            parser.error(f'--preset {args.preset!r}: {", ".join(lacking)} of grid '
                         f'{grid.name!r} have no such preset (paper, cpu and test exist for all)')
    check_branches(grid)
    check_data_steps(grid)
    check_pages(grid)
    if args.table:
        return write_tables(grid)
    todo = [job for job in grid.jobs()
            if args.only is None or any(s in job.name for s in args.only)]
    if not todo:
        parser.error(f'no run of grid {grid.name!r} matches --only {" ".join(args.only)}')
    if args.dry_run:
        from offline_training.data.dataset import DatasetError
        for step, task in data_steps_needed(todo, grid):
            try:
                print(' '.join(data_command(step, task, grid)))
            except DatasetError as error:
                print(f'# {data_step_name(step, task)}: {error}')
        for job in todo:
            train, evaluate, _ = commands(job, grid)
            report = report_command(job, grid)
            print(' '.join(train))
            print(' '.join(evaluate))
            if report is not None:
                print(' '.join(report[0]))
        return 0
    steps = data_steps_needed(needing_data(todo, grid), grid)
    print(f'grid {grid.name!r}: {len(todo)} runs'
          + (f' after {len(steps)} data steps' if steps else '') + ', '
          + (f'Ray cluster {args.address}' if args.address else f'{args.workers} local CPUs'),
          flush=True)
    try:
        statuses = run_grid(todo, grid, args.workers, args.address,
                            echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print('interrupted: runs keep their checkpoints; the same command resumes them',
              file=sys.stderr)
        return 130
    failed = [name for name, status in statuses.items() if status.startswith('FAILED')]
    print(f'{len(statuses) - len(failed)} of {len(statuses)} runs'
          + (' and data steps' if steps else '') + ' ok'
          + (f'; failed: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
