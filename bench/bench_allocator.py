"""
Benchmark the training CLIs' malloc setting: default glibc malloc against keep_freed_memory().

    python bench/bench_allocator.py [--steps 200] [--repeats 3] [--only bcq_lag,fisor]

saferl-train and saferl-data reshape call ``keep_freed_memory()`` (offline_training/algos/
infrastructure.py) so that glibc keeps the few-MB activations a training step frees instead of
unmapping and re-faulting them every step. Each case runs in fresh child processes, the two
settings interleaved (default, kept, default, kept, ...) so that a change of machine load hits
both; one thread each. Per case it prints the median CPU time per step (user + system), each
process's, the system share, the minor page faults per step, and the ratio default / kept (above
1: faster). The data are synthetic with the task's dimensions (bench_training.build_case).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CASES = [('bcq_lag', 'cpu'), ('fisor', 'cpu'), ('drcorl', 'cpu'), ('bc_all', 'paper')]
MODES = ('default', 'kept')


def child(algo: str, preset: str, mode: str, task_name: str, steps: int) -> dict:
    """Time ``steps`` updates of one case in this process; return the figures."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_training import build_case
    from offline_training.algos.infrastructure import allocator_setting, keep_freed_memory
    from saferl_ros.tasks import get_task

    torch.set_num_threads(1)
    if mode == 'kept':
        keep_freed_memory()
    _, _, trainer, buffer = build_case(algo, preset, get_task(task_name), torch.device('cpu'))
    for _ in range(5):   # warm-up: the heap grows to its working size here
        trainer.update(buffer)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        trainer.update(buffer)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {'cpu_ms': 1000 * (user + system) / steps,
            'sys_share': system / max(user + system, 1e-9),
            'faults': (after.ru_minflt - before.ru_minflt) / steps, 'wall_ms': 1000 * wall / steps,
            'setting': allocator_setting()}


def run_child(algo: str, preset: str, mode: str, task: str, steps: int) -> dict:
    """Run one measurement in a fresh interpreter (a process's malloc setting is global)."""
    cmd = [sys.executable, os.path.abspath(__file__), '--child', algo, preset, mode,
           '--task', task, '--steps', str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', default='BallCircle')
    parser.add_argument('--steps', type=int, default=200, help='timed updates per process')
    parser.add_argument('--repeats', type=int, default=3, help='processes per setting and case')
    parser.add_argument('--only', default=None, help='comma-separated algorithm names')
    parser.add_argument('--child', nargs=3, metavar=('ALGO', 'PRESET', 'MODE'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error('--steps and --repeats must be >= 1')
    if args.child:
        print(json.dumps(child(*args.child, args.task, args.steps)))
        return 0

    from offline_training.machine import machine_info
    machine = machine_info()
    print(f'CPU: {machine["cpu"]}, {machine["cores"]} logical cores, one torch thread per '
          f'process; torch {machine["torch"]}, Python {platform.python_version()}, '
          f'{platform.libc_ver()[0] or "unknown libc"} {platform.libc_ver()[1]}')
    print(f'task {args.task}, {args.steps} timed updates per process, {args.repeats} processes '
          f'per setting, settings interleaved; load average before: '
          f'{", ".join(f"{x:.2f}" for x in os.getloadavg())}\n')
    print('| algorithm | preset | setting | CPU ms/step (median) | each process | system share | '
          'page faults/step | wall ms/step | CPU ratio default/kept |')
    print('|---|---|---|---:|---|---:|---:|---:|---:|')
    only = set(args.only.split(',')) if args.only else None
    for algo, preset in CASES:
        if only and algo not in only:
            continue
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_child(algo, preset, mode, args.task, args.steps))
        median = {mode: {key: statistics.median(r[key] for r in runs[mode])
                         for key in ('cpu_ms', 'sys_share', 'faults', 'wall_ms')}
                  for mode in MODES}
        ratio = median['default']['cpu_ms'] / median['kept']['cpu_ms']
        for mode in MODES:
            m = median[mode]
            each = ' '.join(f'{r["cpu_ms"]:.1f}' for r in runs[mode])
            print(f'| {algo} | {preset} | {mode} | {m["cpu_ms"]:.1f} | {each} | '
                  f'{m["sys_share"]:.0%} | '
                  f'{m["faults"]:.0f} | {m["wall_ms"]:.1f} | '
                  f'{f"{ratio:.2f}x" if mode == "kept" else ""} |', flush=True)
    print(f'\nkept = {runs["kept"][0]["setting"]}')
    print(f'load average after: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
