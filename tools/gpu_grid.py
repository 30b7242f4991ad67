"""
Train a grid's runs on one CUDA machine within a wall-clock budget, then pack them to carry back.

    python3 tools/gpu_grid.py --grid core-hour --method fisor --budget 420 --out OUT \
        [--only CarCircle DroneRun] [--skip fisor-CarRun-s0] [--datasets datasets]

For a lent GPU machine whose minutes are few and that cannot evaluate (no PyBullet there): the
runs train there, come back as files, and `saferl-grid` evaluates them here (it skips the
training of a run whose summary.yaml says it finished). Steps:

1. an MPS daemon when the machine has one, so that the runs' small kernels share the GPU
   instead of taking turns at it (recorded either way);
2. a probe: every run's model and trainer, all at once (the contention of the real runs), time
   critic and actor iterations on the real data for --probe seconds each;
3. the steps: the grid's, or fewer when the probe says the slowest run would not finish within
   the budget (the same for every run, a multiple of 1000; printed and recorded);
4. the runs: saferl-train with the grid's preset on CUDA, one process and one thread each;
   a run still going at the deadline is stopped and left out (its log comes back);
5. packing: a copy of each finished run folder, its checkpoint slimmed to what evaluation and
   export read (the model weights and step; no optimiser state, half the bytes; the run
   folder itself keeps the full checkpoint, so a later command there can extend it), in tar
   files of at most --max-file-mb each in --pack-dir, which outlives the command on that
   machine (the first files that fit --max-out-mb are copied to OUT; a later command copies
   the rest, e.g. `cp /tmp/gpu-grid-pack/runs-4.tar $OUT/`).
"""

import argparse
from dataclasses import replace
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tarfile
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from offline_training.grid import GRIDS, Job, repo_relative  # noqa: E402
from offline_training.overrides import parse_override  # noqa: E402


def log(message: str) -> None:
    """Print a timestamped line at once (the device tool only shows what was flushed)."""
    print(f'{time.strftime("%H:%M:%S")} {message}', flush=True)


def start_mps(pipe_dir: Path) -> str:
    """Start an MPS control daemon if the machine has one; return what happened."""
    binary = shutil.which('nvidia-cuda-mps-control')
    if binary is None:
        return 'no nvidia-cuda-mps-control on this machine: runs time-slice the GPU'
    pipe_dir.mkdir(parents=True, exist_ok=True)
    os.environ['CUDA_MPS_PIPE_DIRECTORY'] = str(pipe_dir)
    os.environ['CUDA_MPS_LOG_DIRECTORY'] = str(pipe_dir)
    code = subprocess.call([binary, '-d'])
    return f'MPS daemon started ({binary}, exit {code})' if code == 0 else (
        f'MPS daemon failed to start (exit {code}): runs time-slice the GPU')


PROBE = r"""
import json, sys, time
import torch
from offline_training.algos import get_algorithm
from offline_training.algos.batching import ReplayBuffer
from offline_training.data.dataset import load_dataset, resolve_dataset_path
from saferl_ros.tasks import get_task
algo, task, preset = sys.argv[1:4]
seconds, overrides = float(sys.argv[4]), json.loads(sys.argv[5])
spec = get_task(task)
module, fixed = get_algorithm(algo)
config = module.resolve_config(module.make_config(preset, **{**overrides, **fixed}), spec)
data = load_dataset(resolve_dataset_path(None, spec.name), spec.name)
device = torch.device(sys.argv[6])
buffer = ReplayBuffer(module.prepare_arrays(data, config), device)
dims = [int(buffer.data[key].shape[1]) for key in ('obs', 'act')]
model = module.build_model(*dims, config).to(device)
trainer = module.make_trainer(model, config)
model.train()

def sync():
    if device.type == 'cuda':
        torch.cuda.synchronize()

def rate(step):
    for _ in range(5):
        step()
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(); n += 1
        if n % 20 == 0:
            sync()
    sync()
    return n / (time.perf_counter() - start)

out = {}
if getattr(config, 'schedule', None) == 'critics-first':   # FISOR: two phases, two speeds
    batch = config.critic_batch_size
    out['critic_it_s'] = rate(lambda: trainer.critic_update(buffer.sample(batch)))
    out['critic_fraction'] = config.critic_phase_cap() / config.steps
    trainer.config.critic_steps = 1          # the next update starts the actor phase
    trainer.critic_cap = 1
    trainer.update(buffer)
    out['actor_it_s'] = rate(lambda: trainer.update(buffer))
else:
    out['it_s'] = rate(lambda: trainer.update(buffer))
print('PROBE ' + json.dumps(out), flush=True)
"""


def seconds_per_step(probe: dict) -> float:
    """Return the expected seconds per iteration of a run from its probe rates."""
    if 'it_s' in probe:
        return 1.0 / probe['it_s']
    fraction = probe['critic_fraction']    # of the run's steps, from its own resolved config
    return fraction / probe['critic_it_s'] + (1 - fraction) / probe['actor_it_s']


def run_probes(jobs, grid, seconds: float, env, device: str) -> dict:
    """Probe every job at once; return {run name: rates} (a failed probe is fatal)."""
    procs = {}
    for job in jobs:
        overrides = dict(parse_override(item) for item in job.method.overrides)
        procs[job.name] = subprocess.Popen(
            [sys.executable, '-c', PROBE, job.method.algorithm, job.task, grid.preset,
             str(seconds), json.dumps(overrides), device], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    rates = {}
    for name, proc in procs.items():
        output, _ = proc.communicate()
        lines = [line for line in output.splitlines() if line.startswith('PROBE ')]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f'probe of {name} failed (exit {proc.returncode}):\n{output}')
        rates[name] = json.loads(lines[-1][len('PROBE '):])
        log(f'probe {name}: {rates[name]}')
    return rates


def stop_at_deadline(procs) -> None:
    """SIGTERM every run still going at once, then wait; kill one that ignores it."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def slim_checkpoint(run_dir: Path) -> None:
    """Keep only what evaluation and export read from the checkpoint (model weights, step)."""
    from offline_training.runs import load_checkpoint, LOAD_FIX
    import torch

    path = run_dir / 'checkpoint.pt'
    state = load_checkpoint(path, 'cpu', LOAD_FIX, keys=('model', 'step'))  # never runs code
    keep = {key: state[key] for key in ('algorithm', 'seed', 'step', 'model', 'train_cpu_s',
                                        'train_wall_s') if key in state}
    tmp = path.with_suffix('.tmp')
    torch.save(keep, tmp)
    os.replace(tmp, path)
    (run_dir / 'SLIMMED.txt').write_text(
        'checkpoint.pt holds the model weights and step only (optimiser and sampler state '
        'dropped by tools/gpu_grid.py to carry the run back from the GPU machine): it '
        'evaluates and exports, but cannot resume training.\n')


def pack_name(folder) -> str:
    """Return a run (or logs) folder's name inside the packs: its repository path if it has one."""
    relative = repo_relative(folder)
    if relative.is_absolute():          # outside the repository: RUNS_DIR_NAME/FOLDER
        folder = Path(folder).resolve()
        return f'{folder.parent.name}/{folder.name}'
    return str(relative)


def pack(run_dirs, out: Path, max_file_mb: float) -> list:
    """
    Tar slimmed copies of run folders into files of at most max_file_mb MB under ``out``.

    Each copy keeps its run's path relative to the repository, so unpacking at the repository
    root puts it where the grid looks for it; a run folder outside the repository is named
    RUNS_DIR_NAME/RUN (unpack it in the runs folder's parent).
    """
    limit = max_file_mb * 2 ** 20
    for stale in out.glob('runs-*.tar'):      # an earlier command's packs must not be mistaken
        stale.unlink()
    shutil.rmtree(out / 'stage', ignore_errors=True)
    staged = []
    for run_dir in run_dirs:
        name = pack_name(run_dir)
        copy = out / 'stage' / name
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy)
        slim_checkpoint(copy)
        staged.append((copy, name))
    groups, current, size = [], [], 0
    for run_dir in staged:
        bytes_ = sum(f.stat().st_size for f in run_dir[0].rglob('*') if f.is_file())
        if current and size + bytes_ > limit * 0.97:   # tar headers: a few KB per file
            groups.append(current)
            current, size = [], 0
        current.append(run_dir)
        size += bytes_
    if current:
        groups.append(current)
    files = []
    for k, group in enumerate(groups):
        path = out / f'runs-{k}.tar'
        with tarfile.open(path, 'w') as tar:
            for copy, arcname in group:
                tar.add(copy, arcname=arcname)
        files.append(path)
        log(f'packed {path.name}: {", ".join(copy.name for copy, _ in group)} '
            f'({path.stat().st_size / 2 ** 20:.1f} MiB)')
    return files


def main(argv=None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('--grid', default='core-hour', choices=sorted(GRIDS))
    parser.add_argument('--method', default='fisor', help="the grid's method tag to train")
    parser.add_argument('--only', nargs='*', default=None, help="tasks (default: the grid's)")
    parser.add_argument('--skip', nargs='*', default=(), help='run names to leave out')
    parser.add_argument('--budget', type=float, required=True,
                        help='wall-clock seconds from now until every run must have finished')
    parser.add_argument('--probe', type=float, default=12.0, help='seconds per probe phase')
    parser.add_argument('--margin', type=float, default=0.8,
                        help='fraction of the time left that the steps are sized to fill')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--runs-dir', type=Path, default=None,
                        help="where the run folders go (default the grid's, e.g. runs/core-hour; "
                        'outside the repository the packs unpack in its parent folder)')
    parser.add_argument('--preset', default=None, help="training preset (default the grid's)")
    parser.add_argument('--max-steps', type=int, default=None,
                        help="cap on the steps (default the grid's)")
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--pack-dir', type=Path, default=Path('/tmp/gpu-grid-pack'))
    parser.add_argument('--max-file-mb', type=float, default=16.0)
    parser.add_argument('--max-out-mb', type=float, default=60.0)
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget
    grid = GRIDS[args.grid]
    if args.preset:
        grid = replace(grid, preset=args.preset)
    if args.runs_dir:
        grid = replace(grid, runs_dir=args.runs_dir.resolve())
    method = next((m for m in grid.methods if m.tag == args.method), None)
    if method is None:
        parser.error(f'grid {args.grid} has no method {args.method!r}')
    tasks = args.only or grid.tasks
    jobs = [Job(method, task, seed) for seed in method.seeds for task in tasks
            if f'{method.tag}-{task}-s{seed}' not in set(args.skip)]
    out, pack_dir = args.out, args.pack_dir
    out.mkdir(parents=True, exist_ok=True)
    pack_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               DSRL_SUPPRESS_IMPORT_ERROR='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    log(start_mps(Path('/tmp/nvidia-mps')))
    env.update({k: os.environ[k] for k in ('CUDA_MPS_PIPE_DIRECTORY', 'CUDA_MPS_LOG_DIRECTORY')
                if k in os.environ})
    log(f'{len(jobs)} runs: {", ".join(j.name for j in jobs)}')

    rates = run_probes(jobs, grid, args.probe, env, args.device)
    per_step = max(seconds_per_step(r) for r in rates.values())
    startup = 30.0   # process start, data loading, CUDA context, the final checkpoint
    affordable = (deadline - time.time() - startup) * args.margin / per_step
    steps = int(min(args.max_steps or method.steps, affordable) // 1000 * 1000)
    log(f'slowest run {per_step * 1000:.2f} ms/iteration under contention; steps {steps} '
        f"(grid's {method.steps}; affordable {affordable:.0f})")
    if steps < 1000:
        raise SystemExit('too little time for 1000 iterations; give a longer --budget')

    procs = {}
    for job in jobs:
        run_dir = Path(grid.runs_dir) / job.name
        cmd = [sys.executable, '-m', 'offline_training.train', method.algorithm,
               '--task', job.task, '--preset', grid.preset, '--seed', str(job.seed),
               '--steps', str(steps), '--out', str(run_dir), '--threads', '1', '--no-progress',
               '--log-every', '500', '--checkpoint-every', '5000', '--device', args.device]
        for item in method.overrides:
            cmd += ['--set', item]
        logs = Path(grid.runs_dir) / 'logs'
        logs.mkdir(parents=True, exist_ok=True)
        stream = open(logs / f'{job.name}.log', 'a')
        stream.write(f'$ {" ".join(cmd[1:])}\n')
        stream.flush()
        procs[job] = (subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                       cwd=REPO), stream, time.time())
    finished, statuses = [], {}
    while procs:
        time.sleep(2)
        late = time.time() >= deadline
        if late:
            stop_at_deadline([proc for proc, _, _ in procs.values()])
        for job, (proc, stream, started) in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            if code == 0:
                finished.append(Path(grid.runs_dir) / job.name)
                statuses[job.name] = f'ok in {time.time() - started:.0f} s'
            elif late:
                statuses[job.name] = 'stopped at the deadline'
            else:
                statuses[job.name] = f'FAILED (exit {code})'
            stream.close()
            del procs[job]
            log(f'{job.name}: {statuses[job.name]}')

    files = pack(finished, pack_dir, args.max_file_mb)
    with tarfile.open(out / 'logs.tar', 'w') as tar:
        tar.add(Path(grid.runs_dir) / 'logs',
                arcname=pack_name(Path(grid.runs_dir) / 'logs'))
    sent, copied = 0.0, []
    for path in files:
        size = path.stat().st_size / 2 ** 20
        if sent + size > args.max_out_mb:
            break
        shutil.copy(path, out / path.name)
        sent += size
        copied.append(path.name)
    report = {'steps': steps, 'probe_seconds': args.probe, 'rates': rates, 'statuses': statuses,
              'packs': [f.name for f in files], 'packs_in_out': copied}
    (out / 'gpu-grid.json').write_text(json.dumps(report, indent=1))
    log(f'{len(finished)}/{len(jobs)} runs finished; {sent:.1f} MiB copied to {out}; every '
        f'pack in {pack_dir}')
    return 0 if len(finished) == len(jobs) else 1


if __name__ == '__main__':
    sys.exit(main())
