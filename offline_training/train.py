"""
saferl-train: train an offline safe-RL algorithm on a DSRL-format dataset.

    saferl-train ALGO --task T [--preset P] [--seed S] [--dataset PATH] [--steps N] [--out DIR]

A run lives in one folder (default ``runs/<algo>-<task>-s<seed>``) with ``config.yaml`` (the
resolved config), ``checkpoint.pt`` (model, optimisers, RNG and sampler state), ``tb/``
(TensorBoard scalars) and, when finished, ``summary.yaml``. Running the same command again
resumes from the checkpoint at the same step with the same optimiser, EMA and RNG state.
"""

import argparse
from dataclasses import asdict
import datetime
from pathlib import Path
import subprocess
import sys
import time
from typing import Dict, Optional, Tuple

import numpy as np
from offline_training.algos import ALGORITHMS, get_algorithm
from offline_training.algos.batching import check_dataset, ReplayBuffer
from offline_training.algos.infrastructure import (
    resolve_device, rng_state, set_rng_state, set_seed)
from offline_training.data.dataset import (
    DatasetError, load_dataset, resolve_dataset_path)
from saferl_ros.errors import (
    ConfigError, MissingFileError, read_yaml_mapping, reports_user_errors, require_field,
    UserError)
from saferl_ros.files import atomic_path, atomic_write_yaml, sha256_file
from saferl_ros.tasks import get_task
import torch
from tqdm import tqdm
import yaml

CHECKPOINT = 'checkpoint.pt'
CONFIG = 'config.yaml'
SUMMARY = 'summary.yaml'


def yaml_safe(value):
    """Convert tuples, numpy scalars/arrays and paths into YAML-safe Python values."""
    if isinstance(value, dict):
        return {str(k): yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [yaml_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return yaml_safe(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def code_version() -> str:
    """Return ``git describe --always --dirty`` of this source tree, or 'unknown'."""
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty'],
                             cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def default_run_dir(algo: str, task: str, seed: int) -> Path:
    """Return runs/<algo>-<task>-s<seed>."""
    return Path('runs') / f'{algo}-{task}-s{seed}'


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_yaml(data: dict, path: Path) -> None:
    atomic_write_yaml(path, yaml_safe(data))


def _load_data(dataset, data, task) -> Tuple[Dict[str, np.ndarray], dict]:
    """Return (dataset dict, provenance) from an in-memory dict or a file/the task's file."""
    if data is not None:
        check_dataset(data)
        return data, {'path': None, 'sha256': None, 'source': 'in-memory'}
    path = resolve_dataset_path(dataset, task.name)
    loaded = load_dataset(path, task.name)
    check_dataset(loaded)
    return loaded, {'path': str(path), 'sha256': sha256_file(path), 'source': 'file'}


# Config fields a resumed run may change: the step budget and inference-only settings (they shape
# the exported graphs, not the training).
RESUME_MAY_CHANGE = frozenset({'steps', 'num_candidates', 'fallback_candidates', 'clip_sampler',
                               'ddpm_temperature'})


def train(algo: str, task, preset: str = 'paper', seed: int = 0, dataset=None,
          data: Optional[Dict[str, np.ndarray]] = None, steps: Optional[int] = None,
          out=None, device: str = 'auto', log_every: int = 1000,
          checkpoint_every: int = 10_000, overrides: Optional[dict] = None,
          progress: bool = True, stop_after: Optional[int] = None) -> Path:
    """
    Train (or resume) one run and return its folder.

    ``data`` trains on an in-memory dataset dict instead of a file. ``stop_after`` stops after
    that many iterations in this call (after checkpointing), which is how tests simulate a kill.
    """
    spec = get_task(task)
    module, fixed = get_algorithm(algo)
    algo = algo.lower().replace('-', '_')
    run_dir = Path(out) if out is not None else default_run_dir(algo, spec.name, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)

    config = module.make_config(preset, **{**(overrides or {}), **fixed})
    if steps is not None:
        config.steps = int(steps)
    config = module.resolve_config(config, spec)

    set_seed(seed)
    data, provenance = _load_data(dataset, data, spec)
    arrays = module.prepare_arrays(data, config)
    buffer = ReplayBuffer(arrays, torch_device, seed=seed)
    obs_dim, act_dim = int(arrays['obs'].shape[1]), int(arrays['act'].shape[1])
    if (obs_dim, act_dim) != (spec.obs_dim, spec.act_dim):
        raise ConfigError(f'dataset has obs/act dims {obs_dim}/{act_dim} but task {spec.name} '
                          f'expects {spec.obs_dim}/{spec.act_dim}; pass the matching --task')
    model = module.build_model(obs_dim, act_dim, config).to(torch_device)
    trainer = module.make_trainer(model, config)

    run_config = {
        'algorithm': algo, 'preset': preset, 'seed': seed, 'steps': config.steps,
        'task': {'name': spec.name, 'env_id': spec.env_id, 'offline_id': spec.offline_id,
                 'horizon': spec.horizon, 'max_reward': spec.max_reward,
                 'min_reward': spec.min_reward, 'max_cost': spec.max_cost},
        'dataset': {**provenance, 'transitions': int(buffer.size),
                    'training_transitions': int(len(arrays['obs']))},
        'obs_dim': obs_dim, 'act_dim': act_dim, 'device': str(torch_device),
        'torch': str(torch.__version__), 'code_version': code_version(),
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'algo_config': asdict(config),
    }

    step = 0
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        # Load on the CPU: RNG and generator states must stay CPU tensors; load_state_dict
        # moves parameters and optimiser state to the model's device.
        fix = 'choose another --out, or delete the run folder to start over'
        state = _load_checkpoint(ckpt_path, 'cpu', fix)
        if state['algorithm'] != algo or state['seed'] != seed:
            raise ConfigError(f'{ckpt_path} belongs to {state["algorithm"]} seed '
                              f'{state["seed"]}, not {algo} seed {seed}; choose another --out '
                              'or delete it')
        saved = read_yaml_mapping(run_dir / CONFIG, fix)
        saved_algo = require_field(saved, 'algo_config', str(run_dir / CONFIG), dict, fix)
        changed = sorted(key for key, value in yaml_safe(run_config['algo_config']).items()
                         if key not in RESUME_MAY_CHANGE and saved_algo.get(key) != value)
        if changed:
            raise ConfigError(f'{run_dir} was trained with different {changed} '
                              f'({[saved_algo.get(k) for k in changed]}); resume with '
                              'the same preset and --set values, or choose another --out')
        _restore(ckpt_path, fix, (model, state['model']), (trainer, state['trainer']),
                 (buffer, state['buffer']))
        set_rng_state(state['rng'])
        step = int(state['step'])
        run_config['created'] = saved.get('created', run_config['created'])
    _write_yaml(run_config, run_dir / CONFIG)

    def save_checkpoint():
        _atomic_torch_save({'algorithm': algo, 'seed': seed, 'step': step,
                            'model': model.state_dict(), 'trainer': trainer.state_dict(),
                            'buffer': buffer.state_dict(), 'rng': rng_state()}, ckpt_path)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / 'tb'), purge_step=step if step else None)
    model.train()
    last_logs: Dict[str, float] = {}
    start_step, start_time = step, time.time()
    window_step, window_time = step, start_time
    end = config.steps if stop_after is None else min(config.steps, step + stop_after)
    bar = tqdm(total=config.steps, initial=step, desc=f'{algo} {spec.name} s{seed}',
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        while step < end:
            logs = trainer.update(buffer)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == end:
                now = time.time()
                last_logs = {k: float(v) for k, v in logs.items()}
                last_logs['perf/it_per_s'] = (step - window_step) / max(now - window_time, 1e-9)
                window_step, window_time = step, now
                for key, value in last_logs.items():
                    writer.add_scalar(key, value, step)
                bar.set_postfix({k.split('/')[-1]: f'{v:.3g}' for k, v in last_logs.items()
                                 if k.startswith('loss/')}, refresh=False)
            if step % checkpoint_every == 0 or step == end:
                save_checkpoint()
    finally:
        bar.close()
        writer.close()
    if step >= config.steps and (step > start_step or not (run_dir / SUMMARY).exists()):
        elapsed = time.time() - start_time
        _write_yaml({'step': step, 'steps_this_session': step - start_step,
                     'wall_time_s': round(elapsed, 2),
                     'it_per_s': round((step - start_step) / max(elapsed, 1e-9), 2),
                     'last_logs': last_logs}, run_dir / SUMMARY)
    return run_dir


CHECKPOINT_KEYS = ('algorithm', 'seed', 'step', 'model', 'trainer', 'buffer', 'rng')


def _load_checkpoint(path: Path, device, fix: str, keys=CHECKPOINT_KEYS) -> dict:
    """Return the checkpoint dict in ``path``; raise ConfigError if it lacks one of ``keys``."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # torch raises pickle, zip and runtime errors for a bad file
        raise ConfigError(f'{path}: not a readable checkpoint ({type(error).__name__}: '
                          f'{str(error).splitlines()[0] if str(error) else ""}); {fix}') from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f'{path}: not a saferl-train checkpoint (missing {missing}); {fix}')
    return state


def _restore(path: Path, fix: str, *pairs) -> None:
    """Load each (object, state) pair of a checkpoint; a mismatch is a ConfigError on ``path``."""
    for target, state in pairs:
        try:
            target.load_state_dict(state)
        except ConfigError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ''
            raise ConfigError(f'{path}: does not match the model its config.yaml describes '
                              f'({type(error).__name__}: {first}); {fix}') from None


def load_run(run_dir, device='cpu'):
    """
    Rebuild a trained model from a run folder: return (algo_name, config dict, model).

    ``config`` is the parsed config.yaml (``config['algo_config']`` holds the algorithm's
    resolved fields); ``model`` is in eval mode on ``device``. A missing, unreadable or
    inconsistent run folder raises a :class:`~saferl_ros.errors.UserError` that names the file.
    """
    run_dir = Path(run_dir)
    fix = 'point at a finished or checkpointed saferl-train run folder (runs/ALGO-TASK-sSEED)'
    if not run_dir.is_dir():
        raise MissingFileError(f'{run_dir} does not exist, so it is not a finished or '
                               'checkpointed saferl-train run; check the path (saferl-train '
                               'writes runs/ALGO-TASK-sSEED by default)')
    for name in (CONFIG, CHECKPOINT):
        if not (run_dir / name).exists():
            raise MissingFileError(f'{run_dir / name} is missing: {run_dir} is not a finished '
                                   'or checkpointed saferl-train run')
    where = str(run_dir / CONFIG)
    run_config = read_yaml_mapping(run_dir / CONFIG, fix)
    algo = require_field(run_config, 'algorithm', where, str, fix)
    algo_config = require_field(run_config, 'algo_config', where, dict, fix)
    dims = [require_field(run_config, key, where, int, fix) for key in ('obs_dim', 'act_dim')]
    task = require_field(run_config, 'task', where, dict, fix)
    require_field(task, 'name', f'{where} task', str, fix)
    try:
        module, _ = get_algorithm(algo)
        config = module.make_config('paper', **algo_config)
    except UserError as error:
        raise ConfigError(f'{where}: {error}') from None
    model = module.build_model(*dims, config)
    state = _load_checkpoint(run_dir / CHECKPOINT, device, fix, keys=('model', 'step'))
    _restore(run_dir / CHECKPOINT, fix, (model, state['model']))
    run_config['checkpoint_step'] = int(state['step'])
    return algo, run_config, model.to(device).eval()


def _parse_override(text: str):
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'--set expects KEY=VALUE, got {text!r}')
    key, value = text.split('=', 1)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        reason = getattr(error, 'problem', None) or error
        raise argparse.ArgumentTypeError(f'--set {key}: {value!r} is not a YAML value '
                                         f'({reason})')


@reports_user_errors('saferl-train', expected=(DatasetError,))
def main(argv=None) -> int:
    """Command-line entry point of saferl-train."""
    parser = argparse.ArgumentParser(
        prog='saferl-train', description='Train an offline safe-RL algorithm on a DSRL dataset; '
        'rerunning the same command resumes from the checkpoint.')
    parser.add_argument('algo', choices=sorted(ALGORITHMS), help='algorithm')
    parser.add_argument('--task', required=True, help='task, e.g. BallCircle')
    parser.add_argument('--preset', default='paper', help="config preset: 'paper' or 'cpu'")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--dataset', default=None,
                        help='HDF5 file (default: the task file in $DSRL_DATASET_DIR)')
    parser.add_argument('--steps', type=int, default=None, help='override the training steps')
    parser.add_argument('--out', default=None, help='run folder (default runs/ALGO-TASK-sSEED)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda[:i]'")
    parser.add_argument('--log-every', type=int, default=1000)
    parser.add_argument('--checkpoint-every', type=int, default=10_000)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        type=_parse_override, metavar='KEY=VALUE',
                        help='override a config field, e.g. --set num_candidates=32')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f'--steps must be >= 1, got {args.steps}')
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = train(args.algo, args.task, args.preset, args.seed, dataset=args.dataset,
                    steps=args.steps, out=args.out, device=args.device,
                    log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                    overrides=dict(args.overrides), progress=not args.no_progress)
    print(run_dir)
    return 0


if __name__ == '__main__':
    sys.exit(main())
