"""
saferl-train: train an offline safe-RL algorithm on a DSRL-format dataset.

    saferl-train ALGO --task T [--preset P] [--seed S] [--dataset PATH] [--steps N] [--out DIR]

A run lives in one folder (default ``runs/<algo>-<task>-s<seed>``; the format is in runs.py).
Running the same command again resumes from the checkpoint at the same step with the same
optimiser, EMA and RNG state.
"""

import argparse
from dataclasses import fields, MISSING
from pathlib import Path
import shutil
import sys
import time
from typing import Dict, Optional, Tuple

import numpy as np
from offline_training.algos import ALGORITHMS, get_algorithm, native
from offline_training.algos.batching import check_dataset, ReplayBuffer
from offline_training.algos.infrastructure import (
    allocator_setting, keep_freed_memory, resolve_device, rng_state, set_rng_state, set_seed)
from offline_training.algos.protocol import reads_costs
from offline_training.data.dataset import (
    DatasetError, describe_generated, file_generated_info, load_dataset, resolve_dataset_path)
from offline_training.machine import machine_info
from offline_training.overrides import parse_override
from offline_training.runs import (
    check_model_size, check_resume, CHECKPOINT, CHECKPOINTS, CONFIG, default_run_dir,
    keep_checkpoint_copy, kept_checkpoint_path, load_checkpoint, new_run_config, restore,
    RESUME_FIX, SUMMARY, write_checkpoint, write_yaml)
from saferl_ros.errors import (ConfigError, MissingFileError, read_yaml_mapping,
                               reports_user_errors, UserError)
from saferl_ros.files import atomic_path, sha256_file
from saferl_ros.tasks import get_task
import torch
from tqdm import tqdm


def _load_data(dataset, data, task) -> Tuple[Dict[str, np.ndarray], dict]:
    """Return (dataset dict, provenance) from an in-memory dict or a file/the task's file."""
    if data is not None:
        check_dataset(data)
        return data, {'path': None, 'sha256': None, 'source': 'in-memory'}
    from saferl_ros.dataset_keys import DSRL_KEYS    # training reads only these keys

    path = resolve_dataset_path(dataset, task.name)
    loaded = load_dataset(path, task.name, keys=DSRL_KEYS)
    check_dataset(loaded)
    provenance = {'path': str(path), 'sha256': sha256_file(path), 'source': 'file'}
    generated = file_generated_info(path)
    if generated is not None:
        # Never silently: the run's config records it and the user sees it.
        print(f'saferl-train: note: {path}: {describe_generated(generated)}', file=sys.stderr)
        provenance['source'] = 'generated'
        provenance['generated'] = {k: v for k, v in generated.items() if k != 'model'}
    return loaded, provenance


def train(algo: str, task, preset: str = 'paper', seed: int = 0, dataset=None,
          data: Optional[Dict[str, np.ndarray]] = None, steps: Optional[int] = None,
          out=None, device: str = 'auto', log_every: int = 1000,
          checkpoint_every: int = 10_000, overrides: Optional[dict] = None,
          progress: bool = True, stop_after: Optional[int] = None, eval_every: int = 0,
          eval_episodes: int = 5, init_from=None) -> Path:
    """
    Train (or resume) one run and return its folder.

    ``data`` trains on an in-memory dataset dict instead of a file. ``stop_after`` stops after
    that many iterations in this call (after checkpointing), which is how tests simulate a kill.
    ``eval_every`` > 0 evaluates the policy every that many steps for ``eval_episodes`` episodes
    (offline_training.periodic_eval: TensorBoard, eval_curve.csv, a checkpoint kept each time).
    ``init_from`` starts a new run folder from another run's checkpoint (a kept
    RUN/checkpoints/step_<N>.pt or RUN/checkpoint.pt): it resumes from there as if it were its
    own, changing only what the algorithm allows at that step (``resume_may_change``).
    """
    spec = get_task(task)
    module, fixed = get_algorithm(algo)
    algo = algo.lower().replace('-', '_')
    run_dir = Path(out) if out is not None else default_run_dir(algo, spec.name, seed)
    torch_device = resolve_device(device)

    config = module.make_config(preset, **{**(overrides or {}), **fixed})
    if steps is not None:
        config.steps = int(steps)
    config = module.resolve_config(config, spec)
    # the layer sizes are checked on the meta device before anything is allocated
    check_model_size(module, (spec.obs_dim, spec.act_dim), config, f'{algo} config',
                     'lower the layer sizes given with --set')

    set_seed(seed)
    data, provenance = _load_data(dataset, data, spec)
    if getattr(module, 'REQUIRES_GENERATED', False) and provenance['source'] == 'file':
        raise ConfigError(f'{algo} trains on a generated dataset, but {provenance["path"]} is '
                          f'collected data; run `saferl-data reshape {provenance["path"]} '
                          f'--task {spec.name} -o OUT.hdf5` and pass --dataset OUT.hdf5')
    if reads_costs(module, config) and np.isnan(np.asarray(data['costs'])).any():
        raise ConfigError(f'{algo} learns from cost labels but the dataset has none (NaN costs,'
                          ' e.g. the unlabelled set of saferl-data split-demos); give it the '
                          'labelled dataset, or train an algorithm without costs (dspo, bc_all)')
    arrays = module.prepare_arrays(data, config)
    buffer = ReplayBuffer(arrays, torch_device, seed=seed)
    obs_dim, act_dim = int(arrays['obs'].shape[1]), int(arrays['act'].shape[1])
    if (obs_dim, act_dim) != (spec.obs_dim, spec.act_dim):
        raise ConfigError(f'dataset has obs/act dims {obs_dim}/{act_dim} but task {spec.name} '
                          f'expects {spec.obs_dim}/{spec.act_dim}; pass the matching --task')
    model = module.build_model(obs_dim, act_dim, config).to(torch_device)
    trainer = module.make_trainer(model, config)

    run_config = new_run_config(algo, preset, seed, spec, config, obs_dim, act_dim, torch_device,
                                {**provenance, 'transitions': int(buffer.size),
                                 'training_transitions': int(len(arrays['obs']))})

    made_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)    # only once the inputs are known to be good
    ckpt_path = run_dir / CHECKPOINT
    try:
        new_branch = init_from is not None and branch_from(Path(init_from), run_dir, algo, seed,
                                                           provenance['sha256'])
    except UserError:
        if made_dir and not any(run_dir.iterdir()):   # a refused branch leaves no empty folder
            run_dir.rmdir()
        raise
    step = 0
    train_cpu_s = 0.0          # CPU seconds spent training (not evaluating), over all sessions
    train_wall_s = 0.0         # wall seconds likewise
    if ckpt_path.exists():
        defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
        may_change = getattr(module, 'resume_may_change', None)
        try:
            state, saved = check_resume(run_dir, algo, seed, run_config['algo_config'],
                                        defaults,
                                        may_change and (lambda at: may_change(config, at)))
        except UserError as error:
            if not new_branch:
                raise
            # a branch this run cannot continue: leave no copy behind to block the next try
            for made in (ckpt_path, run_dir / CONFIG):
                made.unlink(missing_ok=True)
            raise ConfigError(f'--init-from {init_from}: this run cannot continue it: '
                              f'{str(error).splitlines()[0]} (a branch may change only the '
                              'fields its algorithm lets change at that step, e.g. DRCORL '
                              'stage-4 fields from a checkpoint at or before the end of '
                              'pretraining)') from None
        restore(ckpt_path, RESUME_FIX, (model, state['model']), (trainer, state['trainer']),
                (buffer, state['buffer']))
        set_rng_state(state['rng'])
        step = int(state['step'])
        train_cpu_s = float(state.get('train_cpu_s', 0.0))
        train_wall_s = float(state.get('train_wall_s', 0.0))
        run_config['created'] = saved.get('created', run_config['created'])
        if 'initialised_from' in saved:
            run_config['initialised_from'] = saved['initialised_from']
    write_yaml(run_config, run_dir / CONFIG)

    evaluator = None
    if eval_every:
        from offline_training.periodic_eval import PeriodicEvaluator
        evaluator = PeriodicEvaluator(run_dir, algo, spec, config, eval_every, eval_episodes)
        evaluator.resume_at(step, ckpt_path if ckpt_path.exists() else None)

    # Steps whose checkpoint the algorithm wants kept (e.g. DRCORL's end of pretraining, from
    # which another adaptation rule can be tried with --init-from without retraining stages 1-3).
    milestones = {int(m) for m in getattr(module, 'milestones', lambda _: ())(config)}
    if step in milestones and ckpt_path.exists() and \
            not kept_checkpoint_path(run_dir, step).is_file():
        keep_checkpoint_copy(ckpt_path, run_dir, step)   # killed between checkpoint and copy

    def save_checkpoint():
        write_checkpoint({'algorithm': algo, 'seed': seed, 'step': step,
                          'model': model.state_dict(), 'trainer': trainer.state_dict(),
                          'buffer': buffer.state_dict(), 'rng': rng_state(),
                          'train_cpu_s': train_cpu_s + time.process_time() - cpu_mark,
                          'train_wall_s': train_wall_s + time.time() - start_time},
                         ckpt_path)
        if evaluator is not None:
            evaluator.keep_checkpoint(step, ckpt_path)
        if step in milestones:
            keep_checkpoint_copy(ckpt_path, run_dir, step)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir / 'tb'), purge_step=step if step else None)
    model.train()
    last_logs: Dict[str, float] = {}
    start_step, start_time = step, time.time()
    window_step, window_time = step, start_time
    cpu_mark = time.process_time()   # train_cpu_s + process_time() - cpu_mark: training CPU
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
            if evaluator is not None and evaluator.due(step):
                cpu, wall = time.process_time(), time.time()
                evaluator(step, model, writer, train_cpu_s + cpu - cpu_mark,
                          train_wall_s + wall - start_time)
                # Evaluation time counts neither as training CPU time nor in it/s.
                cpu_mark += time.process_time() - cpu
                window_time += time.time() - wall
                start_time += time.time() - wall
            if step % checkpoint_every == 0 or step == end or step in milestones or (
                    evaluator is not None and evaluator.due(step)):
                save_checkpoint()
    finally:
        bar.close()
        writer.close()
        getattr(trainer, 'close', lambda: None)()
    if step >= config.steps and (step > start_step or not (run_dir / SUMMARY).exists()):
        elapsed = time.time() - start_time
        # Training time over every session of the run (evaluation during training excluded)
        # and the machine of this last session, for the results' budget columns.
        write_yaml({'step': step, 'steps_this_session': step - start_step,
                    'wall_time_s': round(elapsed, 2),
                    'it_per_s': round((step - start_step) / max(elapsed, 1e-9), 2),
                    'train_cpu_s': round(train_cpu_s + time.process_time() - cpu_mark, 1),
                    'train_wall_s': round(train_wall_s + time.time() - start_time, 1),
                    'machine': machine_info(), 'allocator': allocator_setting(),
                    'kernels': native.run_summary(),
                    'compiled_steps': getattr(trainer, 'compiled_status',
                                              'compiled steps: none for this algorithm'),
                    'last_logs': last_logs}, run_dir / SUMMARY)
    return run_dir


def branch_from(checkpoint: Path, run_dir: Path, algo: str, seed: int,
                dataset_sha256: str) -> bool:
    """
    Make ``run_dir`` a copy of the run that wrote ``checkpoint``, stopped at that checkpoint.

    The checkpoint and its run's config.yaml are copied (the run's own folder is untouched);
    config.yaml records where the run came from. The source run must have trained on the
    dataset this run trains on (``dataset_sha256``): the replay state and every model in the
    checkpoint belong to it. A ``run_dir`` already branched from the same checkpoint path is
    left as it is and False returned (rerunning the command resumes it, even when the source
    run has trained on or gone since); any other run there is refused. Return True when the
    branch was made now.
    """
    checkpoint = Path(checkpoint)
    source_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS \
        else checkpoint.parent
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        saved = read_yaml_mapping(run_dir / CONFIG, RESUME_FIX) if (run_dir / CONFIG).is_file() \
            else {}
        branched = (saved.get('initialised_from') or {}).get('checkpoint')
        if branched is None or Path(branched).resolve() != checkpoint.resolve():
            what = f'was branched from {branched}' if branched else 'was not branched from it'
            raise ConfigError(f'--init-from {checkpoint}: {run_dir} already holds a run that '
                              f'{what}; choose another --out')
        return False
    if not checkpoint.is_file() or checkpoint.is_symlink():
        raise MissingFileError(f'--init-from {checkpoint}: not a checkpoint file; give a kept '
                               f'RUN/{CHECKPOINTS}/step_<N>.pt or RUN/{CHECKPOINT}')
    if not (source_dir / CONFIG).is_file():
        raise MissingFileError(f'--init-from {checkpoint}: {source_dir / CONFIG} is missing, so '
                               'the run it belongs to is unknown; give a checkpoint inside a '
                               'saferl-train run folder')
    origin = {'checkpoint': str(checkpoint), 'sha256': sha256_file(checkpoint)}
    source = read_yaml_mapping(source_dir / CONFIG, RESUME_FIX)
    source_data = (source.get('dataset') or {}).get('sha256')
    if source_data != dataset_sha256:
        raise ConfigError(f'--init-from {checkpoint}: its run trained on another dataset '
                          f'(sha256 {str(source_data)[:12]}, this one '
                          f'{str(dataset_sha256)[:12]}); give the same --dataset as that run')
    state = load_checkpoint(checkpoint, 'cpu', RESUME_FIX, keys=('algorithm', 'seed', 'step'))
    if state['algorithm'] != algo or state['seed'] != seed:
        raise ConfigError(f'--init-from {checkpoint} is {state["algorithm"]} seed '
                          f'{state["seed"]}, not {algo} seed {seed}; pass the same algorithm and '
                          '--seed')
    source['initialised_from'] = {**origin, 'step': int(state['step'])}
    write_yaml(source, run_dir / CONFIG)
    with atomic_path(ckpt_path) as tmp:
        shutil.copyfile(checkpoint, tmp)
    return True


@reports_user_errors('saferl-train', expected=(DatasetError,))
def main(argv=None) -> int:
    """Command-line entry point of saferl-train."""
    parser = argparse.ArgumentParser(
        prog='saferl-train', description='Train an offline safe-RL algorithm on a DSRL dataset; '
        'rerunning the same command resumes from the checkpoint.')
    parser.add_argument('algo', choices=sorted(ALGORITHMS), help='algorithm')
    parser.add_argument('--task', required=True, help='task, e.g. BallCircle')
    parser.add_argument('--preset', default='paper',
                        help="config preset: 'paper', 'cpu' or 'test' (tiny networks)")
    parser.add_argument('--seed', type=int, default=0, help='training seed, >= 0 (default 0)')
    parser.add_argument('--dataset', default=None,
                        help='HDF5 file (default: the task file in $DSRL_DATASET_DIR)')
    parser.add_argument('--steps', type=int, default=None, help='override the training steps')
    parser.add_argument('--out', default=None, help='run folder (default runs/ALGO-TASK-sSEED)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda[:i]'")
    parser.add_argument('--log-every', type=int, default=1000, metavar='N',
                        help='log the losses every N >= 1 steps (and at the end)')
    parser.add_argument('--checkpoint-every', type=int, default=10_000, metavar='N',
                        help='write RUN/checkpoint.pt every N >= 1 steps (and at the end)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        type=parse_override, metavar='KEY=VALUE',
                        help='override a config field, e.g. --set num_candidates=32')
    parser.add_argument('--eval-every', type=int, default=0, metavar='K',
                        help='evaluate the policy in the simulator every K steps (default: '
                        'never); curve in RUN/eval_curve.csv, checkpoints kept in '
                        'RUN/checkpoints/')
    parser.add_argument('--eval-episodes', type=int, default=5,
                        help='episodes per evaluation during training (default 5)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    parser.add_argument('--init-from', default=None, metavar='CHECKPOINT',
                        help="start this run from another run's checkpoint (e.g. DRCORL's "
                        'RUN/checkpoints/step_<N>.pt kept at the end of pretraining) with '
                        'changed --set values the algorithm allows there; needs --out')
    args = parser.parse_args(argv)
    if args.init_from and not args.out:
        parser.error("--init-from needs --out: the new run's folder")
    if args.eval_every < 0 or args.eval_episodes < 1:
        parser.error('--eval-every must be >= 0 and --eval-episodes >= 1')
    if args.steps is not None and args.steps < 1:
        parser.error(f'--steps must be >= 1, got {args.steps}')
    if args.seed < 0:
        parser.error(f'--seed must be >= 0, got {args.seed}')
    for option, value in (('--log-every', args.log_every),
                          ('--checkpoint-every', args.checkpoint_every)):
        if value < 1:
            parser.error(f'{option} must be >= 1, got {value}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    run_dir = train(args.algo, args.task, args.preset, args.seed, dataset=args.dataset,
                    steps=args.steps, out=args.out, device=args.device,
                    log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                    overrides=dict(args.overrides), progress=not args.no_progress,
                    eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                    init_from=args.init_from)
    print(run_dir)
    return 0


if __name__ == '__main__':
    sys.exit(main())
