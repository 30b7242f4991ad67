"""
Benchmark training throughput (iterations per second) of every algorithm and preset.

    python bench/bench_training.py [--task BallCircle] [--threads 2] [--seconds 20] [--device all]

One iteration is one call of the algorithm's update (FISOR: two actor updates on halves of the
batch plus the four critic/value updates; BC: one step; BCQ-Lag: VAE, both critics and the actor).
The data is a synthetic dataset with the task's dimensions held on the device, exactly as
saferl-train holds a real one. Prints the machine and a Markdown table.
"""

import argparse
import os
import platform
import time

from offline_training.algos import get_algorithm
from offline_training.algos.batching import ReplayBuffer
from offline_training.algos.infrastructure import set_seed
from offline_training.data.synthetic import synthetic_dataset
from saferl_ros.tasks import get_task
import torch

# (label, algorithm, preset)
CASES = [
    ('FISOR', 'fisor', 'paper'),
    ('FISOR', 'fisor', 'cpu'),
    ('BC-All', 'bc_all', 'paper'),
    ('BC-Safe', 'bc_safe', 'paper'),
    ('BCQ-Lag', 'bcq_lag', 'paper'),
    ('BCQ-Lag', 'bcq_lag', 'cpu'),
]


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (or platform)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def build_case(algo: str, preset: str, task, device: torch.device):
    """Return (config, model, trainer, buffer) of one algorithm/preset on synthetic task data."""
    set_seed(0)
    module, fixed = get_algorithm(algo)
    overrides = dict(fixed)
    if algo == 'bc_safe':
        overrides['cost_limit'] = 1e9   # keep every synthetic episode
    config = module.resolve_config(module.make_config(preset, **overrides), task)
    data = synthetic_dataset(task.name, episodes=-(-100_000 // task.horizon),
                             max_length=task.horizon, fixed_length=True, terminal_fraction=0)
    buffer = ReplayBuffer(module.prepare_arrays(data, config), device)
    model = module.build_model(task.obs_dim, task.act_dim, config).to(device)
    trainer = module.make_trainer(model, config)
    model.train()
    return config, model, trainer, buffer


def bench_case(algo: str, preset: str, task, device: torch.device, seconds: float,
               min_iters: int) -> dict:
    """Time one algorithm/preset; return its figures."""
    config, model, trainer, buffer = build_case(algo, preset, task, device)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()
    for _ in range(3):   # warm-up: allocator, caches, cuDNN/cuBLAS handles
        trainer.update(buffer)
    sync()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        trainer.update(buffer)
        iters += 1
        if device.type == 'cuda' and iters % 50 == 0:
            sync()
    sync()
    elapsed = time.perf_counter() - start
    rate = iters / elapsed
    return {'it_per_s': rate, 'iters': iters, 'steps': config.steps,
            'hours_full_run': config.steps / rate / 3600,
            'params': sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', default='BallCircle')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--seconds', type=float, default=20.0, help='timing per case')
    parser.add_argument('--min-iters', type=int, default=5)
    parser.add_argument('--device', default='all', help="'cpu', 'cuda' or 'all' (both if any)")
    parser.add_argument('--only', default=None, help='comma-separated algorithm names')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    devices = []
    if args.device in ('cpu', 'all'):
        devices.append(torch.device('cpu'))
    if args.device in ('cuda', 'all') and torch.cuda.is_available():
        devices.append(torch.device('cuda'))
    if not devices:
        parser.error(f'device {args.device!r} is not available')

    print(f'CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {args.threads}')
    print(f'torch {torch.__version__}, Python {platform.python_version()}, '
          f'CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}')
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
    print(f'task {task.name} (obs {task.obs_dim}, act {task.act_dim}), '
          f'{args.seconds:g} s per case, load average before: {load}\n')
    print('| algorithm | preset | device | it/s | trainable params | steps | hours for steps |')
    print('|---|---|---|---:|---:|---:|---:|')
    only = set(args.only.split(',')) if args.only else None
    for device in devices:
        for label, algo, preset in CASES:
            if only and algo not in only:
                continue
            r = bench_case(algo, preset, task, device, args.seconds, args.min_iters)
            print(f'| {label} | {preset} | {device.type} | {r["it_per_s"]:.1f} | '
                  f'{r["params"]:,} | {r["steps"]:,} | {r["hours_full_run"]:.1f} |', flush=True)
    print(f'\nload average after: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
