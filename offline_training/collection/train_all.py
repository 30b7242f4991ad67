"""
Train the behaviour agents of several tasks one after another; finished tasks are skipped.

Resumable: kill it at any time and run it again, each task continues from its last saved state in
``behavior_agents/<Task>/resume``. With ``--collect`` a task's dataset is collected as soon as its
agent has finished (and skipped when the dataset file already exists)::

    nice -n 10 python -m offline_training.collection.train_all --collect >> /tmp/train.log 2>&1
"""

import argparse
from pathlib import Path
import sys
import time
import traceback

from offline_training.collection.behavior import (DEFAULT_AGENT_ROOT, EXTRA_RUNS, is_finished,
                                                  preset, read_state, train_behavior)

DEFAULT_QUEUE = ('BallRun', 'BallCircle', 'CarRun', 'DroneRun', 'CarCircle', 'DroneCircle')


def train_task(task: str, agent_dir, progress: bool = True, **overrides) -> None:
    """Train (or resume) a task's main behaviour run, then its extra runs (EXTRA_RUNS)."""
    runs = [(None, Path(agent_dir))]
    runs += [(name, Path(agent_dir) / name) for name in sorted(EXTRA_RUNS.get(task, {}))]
    for run, folder in runs:
        label = task if run is None else f'{task}/{run}'
        t0 = time.time()
        config = preset(task, run, **overrides)
        state = read_state(folder)
        # A finished run trains further only when its preset asks for more steps than it has.
        if is_finished(folder) and config.total_steps <= state.get('total_steps', 0):
            print(f'[train_all] {label}: behaviour agent already finished', flush=True)
            continue
        print(f'[train_all] {label}: training (resumes if a checkpoint exists)', flush=True)
        state = train_behavior(config, folder, progress=progress)
        print(f'[train_all] {label}: {state["steps"]} steps, finished={state["finished"]}, '
              f'{time.time() - t0:.0f} s', flush=True)


def run_queue(tasks=DEFAULT_QUEUE, agent_root=DEFAULT_AGENT_ROOT, collect: bool = False,
              dataset_dir=None, seed: int = 0, progress: bool = True) -> None:
    """Train every task of ``tasks`` in order (resuming), collecting datasets if asked."""
    for task in tasks:
        agent_dir = Path(agent_root) / task
        train_task(task, agent_dir, progress)
        if collect:
            from offline_training.collection.collect import collect_task
            try:
                path = collect_task(task, agent_dir=agent_dir, out_dir=dataset_dir, seed=seed,
                                    skip_existing=True, progress=progress)
                print(f'[train_all] {task}: dataset {path}', flush=True)
            except Exception:  # noqa: B902  (a failed collection must not stop the training queue)
                traceback.print_exc()
                sys.stderr.flush()


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', nargs='+', default=list(DEFAULT_QUEUE),
                        help='tasks in training order (default: %(default)s)')
    parser.add_argument('--agent-root', default=str(DEFAULT_AGENT_ROOT))
    parser.add_argument('--collect', action='store_true',
                        help="collect each task's dataset once its agent has finished")
    parser.add_argument('--dataset-dir', default=None, help='default: datasets/ at the repo root')
    parser.add_argument('--seed', type=int, default=0, help='collection seed')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    run_queue(args.tasks, args.agent_root, args.collect, args.dataset_dir, args.seed,
              not args.no_progress)


if __name__ == '__main__':
    main()
