#!/usr/bin/env python3
"""
Train and evaluate every run behind docs/results.md, resumably, on N parallel CPU workers.

    python tools/run_results.py --workers 2            # run (or resume) the whole grid
    python tools/run_results.py --dry-run              # print the commands only
    python tools/run_results.py --preset paper --fisor-steps 1000000 --device cuda --workers 8 \
        --runs-dir runs/paper --results-dir docs/results/paper-runs   # on a GPU machine

Each job is one `saferl-train` command followed by one `saferl-eval` of that run folder
(20 episodes, evaluation seed 0). Both commands resume or skip what is already done: a finished
run is not retrained and an existing results file is not re-evaluated, so killing this script
and starting it again loses at most the checkpoint interval of the jobs in flight.

Results go to docs/results/runs/NAME.json; logs to runs/logs/NAME.log. Build the table with
`python tools/run_results.py --table` (wraps `saferl-eval table`).
"""

import argparse
from concurrent.futures import as_completed, ThreadPoolExecutor
from dataclasses import dataclass
import os
from pathlib import Path
import subprocess
import sys
import time
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TASKS = ('BallCircle', 'CarCircle', 'DroneCircle', 'BallRun', 'CarRun', 'DroneRun')
RESULTS_DIR = REPO / 'docs' / 'results' / 'runs'
LOG_DIR = REPO / 'runs' / 'logs'

# The grid. Steps are what two CPU cores allow in one working session (see docs/results.md);
# every run uses the 'cpu' preset. BC-Safe is trained once per kappa (it keeps trajectories with
# cost return <= kappa); BCQ-Lag targets kappa = 5, FISOR's threshold for these tasks.
FISOR_STEPS = 12_000
FISOR_SEEDS = (0, 1, 2)
BASELINES = (
    # (run tag, algorithm, steps, extra --set overrides)
    ('bc_all', 'bc_all', 10_000, ()),
    ('bc_safe-k5', 'bc_safe', 10_000, ('cost_limit=5',)),
    ('bc_safe-k10', 'bc_safe', 10_000, ('cost_limit=10',)),
    ('bcq_lag-k5', 'bcq_lag', 5_000, ('cost_limit=5',)),
)
EVAL_EPISODES = 20


@dataclass
class Grid:
    """Where and how the grid runs; the defaults are the grid behind docs/results.md."""

    preset: str = 'cpu'
    fisor_steps: int = FISOR_STEPS
    baseline_steps: Optional[int] = None     # None: each baseline's steps in BASELINES
    device: str = 'cpu'
    runs_dir: Path = REPO / 'runs'
    results_dir: Path = RESULTS_DIR


def jobs(grid: Grid = Grid()):
    """Return the job list: per task FISOR seed 0 and the baselines, then FISOR seeds 1 and 2."""
    out = []
    for task in TASKS:
        out.append(('fisor', 'fisor', task, 0, grid.fisor_steps, ()))
        for tag, algo, steps, sets in BASELINES:
            out.append((tag, algo, task, 0, grid.baseline_steps or steps, sets))
    for seed in FISOR_SEEDS[1:]:
        for task in TASKS:
            out.append(('fisor', 'fisor', task, seed, grid.fisor_steps, ()))
    return out


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


def commands(job, grid: Grid = Grid()):
    """Return (name, train command, eval command, results path) of one job."""
    tag, algo, task, seed, steps, sets = job
    name = f'{tag}-{task}-s{seed}'
    run_dir = repo_relative(Path(grid.runs_dir) / name)
    train = ['saferl-train', algo, '--task', task, '--preset', grid.preset, '--seed', str(seed),
             '--steps', str(steps), '--out', str(run_dir), '--threads', '1', '--no-progress',
             '--log-every', '500', '--checkpoint-every', '2000', '--device', grid.device]
    for item in sets:
        train += ['--set', item]
    results = repo_relative(Path(grid.results_dir) / f'{name}.json')
    evaluate = ['saferl-eval', str(run_dir), '--episodes', str(EVAL_EPISODES), '--seeds', '0',
                '--threads', '1', '--no-progress', '-o', str(results)]
    return name, train, evaluate, results


def run_job(job, grid: Grid = Grid(), dry_run=False):
    """Train (or resume) one run and evaluate it unless its results exist; return a status."""
    name, train, evaluate, results = commands(job, grid)
    if dry_run:
        print(' '.join(train))
        print(' '.join(evaluate))
        return name, 'dry-run'
    if (REPO / results).exists():
        return name, 'done already'
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    bin_dir = Path(sys.executable).parent
    start = time.time()
    with open(LOG_DIR / f'{name}.log', 'a') as log:
        for cmd in (train, evaluate):
            log.write(f'$ {" ".join(cmd)}\n')
            log.flush()
            cmd = [str(bin_dir / cmd[0])] + cmd[1:]
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            if code != 0:
                return name, f'FAILED (exit {code}, see {LOG_DIR / (name + ".log")})'
    return name, f'ok in {time.time() - start:.0f} s'


def runs_table() -> str:
    """Return a markdown table of every run of the grid: preset, steps, time, data, machine."""
    import yaml
    sys.path.insert(0, str(REPO))
    from offline_training.machine import machine_info
    machine = machine_info()
    lines = ['| run | algorithm | task | seed | preset | overrides | steps | wall time | it/s | '
             'V_h feasible fraction (last batch) | dataset (sha256) | code |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for job in jobs():
        name = commands(job)[0]
        run_dir = REPO / 'runs' / name
        if not (run_dir / 'summary.yaml').is_file():
            lines.append(f'| {name} | {job[1]} | {job[2]} | {job[3]} | cpu | '
                         f'{", ".join(job[5]) or "–"} | not finished | | | | | |')
            continue
        config = yaml.safe_load(open(run_dir / 'config.yaml'))
        summary = yaml.safe_load(open(run_dir / 'summary.yaml'))
        logs = summary.get('last_logs', {})
        feasible = logs.get('value/feasible_fraction')
        data = config.get('dataset', {})
        lines.append(
            f'| {name} | {config["algorithm"]} | {config["task"]["name"]} | {config["seed"]} | '
            f'{config["preset"]} | {", ".join(job[5]) or "–"} | {summary["step"]} | '
            f'{summary["wall_time_s"] / 60:.1f} min | {summary["it_per_s"]:.1f} | '
            f'{"–" if feasible is None else f"{feasible:.2f}"} | '
            f'`{Path(data.get("path", "?")).name}` ({str(data.get("sha256", ""))[:8]}) | '
            f'{config.get("code_version", "?")} |')
    return (f'Machine: {machine["cpu"]}, {machine["cores"]} cores, {machine["platform"]}, '
            f'torch {machine.get("torch", "?")}; two runs at a time, one torch thread each.\n\n'
            + '\n'.join(lines) + '\n')


def table():
    """Build docs/results.md from every results file (wraps `saferl-eval table`)."""
    (REPO / 'docs' / 'results' / 'runs.md').write_text(
        '# The runs behind docs/results.md\n\n<!-- generated by `python tools/run_results.py '
        '--table` -->\n\n' + runs_table())
    files = sorted(str(p.relative_to(REPO)) for p in RESULTS_DIR.glob('*.json'))
    cmd = [str(Path(sys.executable).parent / 'saferl-eval'), 'table', *files,
           '-o', 'docs/results.md', '--kappa', '5', '10', '--notes', 'docs/results/NOTES.md']
    return subprocess.call(cmd, cwd=REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=2, help='parallel jobs (one core each)')
    parser.add_argument('--dry-run', action='store_true', help='print the commands only')
    parser.add_argument('--table', action='store_true', help='only rebuild docs/results.md')
    parser.add_argument('--only', nargs='*', default=None,
                        help='run only the jobs whose name contains one of these strings')
    parser.add_argument('--preset', default='cpu', help="training preset ('cpu' or 'paper')")
    parser.add_argument('--fisor-steps', type=int, default=FISOR_STEPS,
                        help=f'FISOR iterations per run (default {FISOR_STEPS})')
    parser.add_argument('--baseline-steps', type=int, default=None,
                        help='iterations of every baseline run (default: per baseline, above)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'auto'")
    parser.add_argument('--runs-dir', type=Path, default=REPO / 'runs')
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.table:
        return table()
    grid = Grid(args.preset, args.fisor_steps, args.baseline_steps, args.device, args.runs_dir,
                args.results_dir)
    todo = [j for j in jobs(grid)
            if args.only is None or any(s in commands(j, grid)[0] for s in args.only)]
    if args.dry_run:
        for job in todo:
            run_job(job, grid, dry_run=True)
        return 0
    failed = 0
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for future in as_completed([pool.submit(run_job, job, grid) for job in todo]):
            name, status = future.result()
            print(f'{time.strftime("%H:%M:%S")} {name}: {status}', flush=True)
            failed += status.startswith('FAILED')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
