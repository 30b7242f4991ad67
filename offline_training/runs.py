"""
The run-folder format of ``saferl-train``: what a run folder holds and how it is read back.

A run lives in one folder (default ``runs/<algo>-<task>-s<seed>``) with ``config.yaml`` (the
resolved config), ``checkpoint.pt`` (model, optimisers, RNG and sampler state), ``tb/``
(TensorBoard scalars) and, when finished, ``summary.yaml``. Training (train.py) writes it;
export, evaluation and the feasibility picture read it through :func:`open_run`, the one place
that turns a run folder back into its algorithm, its config and its model.
"""

from dataclasses import asdict, dataclass, fields
import datetime
import os
from pathlib import Path
import pickle
import re
import stat
import subprocess
from types import ModuleType
from typing import Callable, Iterable, Optional, Tuple
import zipfile

import numpy as np
from offline_training.algos import get_algorithm
from saferl_ros.errors import (
    ConfigError, MissingFileError, read_yaml_mapping, require_field, short_repr, UserError)
from saferl_ros.files import atomic_path, atomic_write_yaml, file_kind
from saferl_ros.tasks import get_task
import torch
from torch import nn

CHECKPOINT = 'checkpoint.pt'
CONFIG = 'config.yaml'
SUMMARY = 'summary.yaml'
CHECKPOINTS = 'checkpoints'   # RUN/checkpoints/step_<N>.pt: copies kept at chosen steps
CHECKPOINT_KEYS = ('algorithm', 'seed', 'step', 'model', 'trainer', 'buffer', 'rng')
# Config fields a resumed run may change: the step budget, inference-only settings (they shape
# the exported graphs, not the training) and how FISOR's gradient steps execute (compiled or
# eager: the same update to rounding).
INFERENCE_SETTINGS = frozenset({'num_candidates', 'fallback_candidates', 'clip_sampler',
                                'ddpm_temperature', 'selection'})
RESUME_MAY_CHANGE = INFERENCE_SETTINGS | {'steps', 'compiled_steps'}
RESUME_FIX = 'choose another --out, or delete the run folder to start over'
# Most layers (or residual blocks) one network of a run may have: the models here have 2-6, and
# a config file asking for thousands would take minutes to build before its size is known.
MAX_LAYERS = 64
LOAD_FIX = 'point at a finished or checkpointed saferl-train run folder (runs/ALGO-TASK-sSEED)'
# The only Python objects a checkpoint holds besides tensors and plain values (dicts, lists,
# tuples, str, numbers): the uint32 numpy array of numpy's global RNG state
# (rng_state()['numpy']). torch.load(weights_only=True) refuses every other global, so a file
# cannot run code when loaded. The last entry is numpy 1.x's name of the function that rebuilds
# an array (checkpoints written before numpy 2.0).
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
CHECKPOINT_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _RECONSTRUCT,
                      (_RECONSTRUCT, 'numpy.core.multiarray._reconstruct')]


def kept_checkpoint_path(run_dir, step: int) -> Path:
    """Return where the copy of a run's checkpoint at ``step`` is kept."""
    return Path(run_dir) / CHECKPOINTS / f'step_{int(step):09d}.pt'


def keep_checkpoint_copy(checkpoint: Path, run_dir, step: int) -> Path:
    """Copy the checkpoint just written at ``step`` to RUN/checkpoints/step_<N>.pt (atomic)."""
    import shutil
    target = kept_checkpoint_path(run_dir, step)
    target.parent.mkdir(exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(checkpoint, tmp)
    return target


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


def new_run_config(algo: str, preset: str, seed: int, spec, config, obs_dim: int, act_dim: int,
                   device, dataset: dict) -> dict:
    """
    Return the config.yaml of a new run: what was trained, on what, where, with which code.

    ``spec`` is the task's TaskSpec, ``config`` the algorithm's resolved config dataclass (its
    fields go to ``algo_config``), ``dataset`` the dataset's provenance and sizes.
    """
    return {
        'algorithm': algo, 'preset': preset, 'seed': seed, 'steps': config.steps,
        'task': {'name': spec.name, 'env_id': spec.env_id, 'offline_id': spec.offline_id,
                 'horizon': spec.horizon, 'max_reward': spec.max_reward,
                 'min_reward': spec.min_reward, 'max_cost': spec.max_cost},
        'dataset': dataset,
        'obs_dim': obs_dim, 'act_dim': act_dim, 'device': str(device),
        'torch': str(torch.__version__), 'code_version': code_version(),
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'algo_config': asdict(config),
    }


def write_yaml(data: dict, path: Path) -> None:
    """Write ``data`` (made YAML-safe) to ``path`` atomically."""
    atomic_write_yaml(path, yaml_safe(data))


def write_checkpoint(state: dict, path: Path) -> None:
    """Write a checkpoint dict (the keys of CHECKPOINT_KEYS) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _check_checkpoint_archive(path: Path, fix: str) -> None:
    """Refuse anything but a regular file in the uncompressed zip format torch.save writes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingFileError(f'{path}: missing; {fix}') from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f'{path} is {file_kind(mode)}, not a regular file; {fix}')
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist()
                      if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ConfigError(f'{path}: not a readable checkpoint (not the zip archive torch.save '
                          f'writes: {short_repr(str(error))}); {fix}') from None
    if packed:  # torch.save stores; a compressed member could inflate without bound
        raise ConfigError(f'{path}: not a readable checkpoint (member {short_repr(packed[0])} '
                          f'is compressed, which torch.save never does); {fix}')


def load_checkpoint(path: Path, device, fix: str, keys=CHECKPOINT_KEYS) -> dict:
    """
    Return the checkpoint dict in ``path``; raise ConfigError if it lacks one of ``keys``.

    The file is loaded with ``torch.load(weights_only=True)``, allowing only
    CHECKPOINT_GLOBALS besides tensors and plain values: a file that names any other Python
    object (a tampered checkpoint that would run code) is refused before anything is built.
    It must be a regular file in torch.save's uncompressed zip format, so loading it takes
    memory in proportion to its size.
    """
    path = Path(path)
    _check_checkpoint_archive(path, fix)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r'GLOBAL ([\w.]+)', str(error))
        if found:
            raise ConfigError(f'{path}: refused: it names the Python object {found.group(1)}, '
                              'which no saferl-train checkpoint holds and which could run code '
                              'if loaded (the file was tampered with or is not a checkpoint); '
                              f'{fix}') from None
        raise ConfigError(f'{path}: not a readable checkpoint ({_unpickler_reason(error)}); '
                          f'{fix}') from None
    except Exception as error:  # torch raises pickle, zip and runtime errors for a bad file
        raise ConfigError(f'{path}: not a readable checkpoint ({type(error).__name__}: '
                          f'{_unpickler_reason(error)}); {fix}') from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(f'{path}: not a saferl-train checkpoint (missing {missing}); {fix}')
    step = state.get('step', 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f'{path}: its step is {str(step)[:40]!r}, not an integer >= 0 (the '
                          f'file was tampered with or is not a checkpoint); {fix}')
    return state


def _unpickler_reason(error: BaseException) -> str:
    """Return the line of a torch.load error that says what was wrong, cut short."""
    text = str(error)
    if 'WeightsUnpickler error:' in text:  # skip torch's advice to load it unsafely
        text = text.split('WeightsUnpickler error:', 1)[1]
    reason = next((line.strip() for line in text.splitlines() if line.strip()), '')
    return reason if len(reason) <= 160 else reason[:157] + '...'


def restore(path: Path, fix: str, *pairs) -> None:
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


def check_resume(run_dir: Path, algo: str, seed: int, algo_config: dict,
                 defaults: Optional[dict] = None,
                 may_change_at: Optional[Callable[[int], Iterable[str]]] = None
                 ) -> Tuple[dict, dict]:
    """
    Return (checkpoint state, saved config.yaml) of a run folder that this run may resume.

    The checkpoint must be of the same algorithm and seed, and the saved algorithm config may
    differ from ``algo_config`` only in RESUME_MAY_CHANGE; otherwise raise ConfigError. A field
    the saved config lacks (added to the algorithm after the run was made) counts as unchanged
    when this run leaves it at its default (``defaults``: the config class's field defaults).
    ``may_change_at(step)`` adds the fields the algorithm lets a run change at the checkpoint's
    step (e.g. DRCORL's adaptation-stage fields before that stage begins). The
    checkpoint is loaded on the CPU: RNG and generator states must stay CPU tensors, and
    ``load_state_dict`` moves parameters and optimiser state to the model's device.
    """
    ckpt_path = run_dir / CHECKPOINT
    state = load_checkpoint(ckpt_path, 'cpu', RESUME_FIX)
    if state['algorithm'] != algo or state['seed'] != seed:
        raise ConfigError(f'{ckpt_path} belongs to {state["algorithm"]} seed '
                          f'{state["seed"]}, not {algo} seed {seed}; choose another --out '
                          'or delete it')
    saved = read_yaml_mapping(run_dir / CONFIG, RESUME_FIX)
    saved_algo = require_field(saved, 'algo_config', str(run_dir / CONFIG), dict, RESUME_FIX)
    defaults = yaml_safe(defaults or {})
    may_change = RESUME_MAY_CHANGE | frozenset(may_change_at(int(state['step']))
                                               if may_change_at else ())
    changed = sorted(key for key, value in yaml_safe(algo_config).items()
                     if key not in may_change and saved_algo.get(key, defaults.get(key))
                     != value)
    if changed:
        raise ConfigError(f'{run_dir} was trained with different {changed} '
                          f'({[saved_algo.get(k) for k in changed]}); resume with '
                          'the same preset and --set values, or choose another --out')
    return state, saved


@dataclass
class Run:
    """A run folder read back: its algorithm (name and module), configs and trained model."""

    algorithm: str
    module: ModuleType   # the algorithm module (offline_training.algos.get_algorithm)
    run_config: dict     # the parsed config.yaml, plus 'checkpoint_step'
    config: object       # the algorithm's config dataclass, rebuilt from 'algo_config'
    model: nn.Module     # in eval mode

    @property
    def task(self) -> str:
        """Return the task name the run was trained on."""
        return self.run_config['task']['name']

    def export_plan(self):
        """Return the algorithm's export plan of this run's model (graphs, critic, details)."""
        return self.module.export_plan(self.model, self.config)


def _config_fields(config) -> dict:
    """Return a config dataclass's fields by name (an empty dict for anything else)."""
    try:
        return asdict(config)
    except TypeError:
        return {}


def max_model_values() -> int:
    """
    Return the most parameters and buffer values a run's model may have.

    A bundle file holds at most saferl_ros.bundle.MAX_BUNDLE_FILE_BYTES, so a model whose
    float32 weights alone are larger could never be exported (paper-size models have < 5 M).
    """
    from saferl_ros.bundle import MAX_BUNDLE_FILE_BYTES  # read at call time
    return MAX_BUNDLE_FILE_BYTES // 4


def check_model_size(module: ModuleType, dims, config, where: str, fix: str) -> int:
    """
    Return the number of values of the model ``module`` builds for ``dims`` and ``config``.

    The model is built on torch's ``meta`` device (shapes only, no memory), so dimensions or
    layer sizes from a config file are checked before anything is allocated: a model that
    cannot be built, or has more than :func:`max_model_values`, raises ConfigError on ``where``.
    """
    depth = {key: value for key, value in _config_fields(config).items()
             if (isinstance(value, (list, tuple)) and len(value) > MAX_LAYERS)
             or (key.endswith(('blocks', 'layers')) and isinstance(value, int)
                 and value > MAX_LAYERS)}
    if depth:  # a deep model takes long to build even on the meta device
        key, value = next(iter(depth.items()))
        size = len(value) if isinstance(value, (list, tuple)) else value
        raise ConfigError(f'{where}: algo_config field {key!r} asks for {size} layers, more than '
                          f'the {MAX_LAYERS} a run may have; {fix}')
    try:
        with torch.random.fork_rng(devices=[]), torch.device('meta'):
            shapes = module.build_model(*dims, config)
    except (RuntimeError, ValueError, TypeError, OverflowError) as error:
        first = (str(error).strip().splitlines() or [''])[0]
        raise ConfigError(f'{where}: cannot build the model it describes '
                          f'({type(error).__name__}: {short_repr(first)}); {fix}') from None
    values = sum(t.numel() for t in (*shapes.parameters(), *shapes.buffers()))
    limit = max_model_values()
    if values > limit:
        raise ConfigError(f'{where}: obs_dim {dims[0]}, act_dim {dims[1]} and the layer sizes of '
                          f'algo_config describe a model of {values} values, more than the '
                          f'{limit} a run may have (saferl_ros.bundle.MAX_BUNDLE_FILE_BYTES / 4: '
                          f'no bundle could hold it); {fix}')
    return values


def open_run(run_dir, device='cpu', checkpoint=None, inference=None) -> Run:
    """
    Read a run folder: rebuild its algorithm config and model and load the checkpoint's weights.

    ``checkpoint``: another checkpoint file of the same run to take the weights from (e.g. one
    kept at a milestone, RUN/checkpoints/step_<N>.pt) instead of the run's last.
    ``inference``: settings of INFERENCE_SETTINGS to use instead of the run's (e.g.
    ``{'num_candidates': 32}``); they change how the trained model acts, never its weights, and
    are recorded in the returned run_config under 'inference' (those that differ from the
    run's).

    A missing, unreadable or inconsistent run folder raises a
    :class:`~saferl_ros.errors.UserError` that names the file.
    """
    run_dir = Path(run_dir)
    fix = LOAD_FIX
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
    for key, dim in zip(('obs_dim', 'act_dim'), dims):
        if isinstance(dim, bool) or dim < 1:
            raise ConfigError(f'{where}: field {key!r} is {dim!r}, expected a positive integer; '
                              f'{fix}')
    task = require_field(run_config, 'task', where, dict, fix)
    name = require_field(task, 'name', f'{where} task', str, fix)
    try:
        spec = get_task(name)
    except KeyError as error:
        raise ConfigError(f'{where}: {error.args[0]}; {fix}') from None
    if tuple(dims) != (spec.obs_dim, spec.act_dim):
        # a model of one task evaluated or exported as another's (a hand-edited config.yaml)
        raise ConfigError(f'{where}: obs_dim {dims[0]} and act_dim {dims[1]} do not match task '
                          f'{spec.name} ({spec.obs_dim} and {spec.act_dim}); {fix}')
    inference = dict(inference or {})
    not_inference = sorted(set(inference) - INFERENCE_SETTINGS)
    if not_inference:
        raise ConfigError(f'{not_inference} are not inference settings; a trained run may change '
                          f'only {sorted(INFERENCE_SETTINGS)} (retrain to change the others)')
    try:
        module, _ = get_algorithm(algo)
    except UserError as error:
        raise ConfigError(f'{where}: {error}') from None
    own = INFERENCE_SETTINGS & {field.name for field in fields(module.CONFIG)}
    if set(inference) - own:
        raise ConfigError(f'{run_dir} is {algo}, which has no {sorted(set(inference) - own)}; '
                          f'its inference settings are {sorted(own) or "none"}')
    try:
        config = module.make_config('paper', **algo_config)
    except UserError as error:
        raise ConfigError(f'{where}: {error}') from None
    if inference:
        try:
            changed = module.make_config('paper', **{**algo_config, **inference})
        except UserError as error:
            raise ConfigError(f'inference settings {inference}: {error}') from None
        # only what differs from the run's own settings counts as changed
        inference = {key: value for key, value in inference.items()
                     if getattr(changed, key) != getattr(config, key)}
        config = changed
    check_model_size(module, dims, config, where, fix)
    model = module.build_model(*dims, config)
    weights = run_dir / CHECKPOINT if checkpoint is None else Path(checkpoint)
    if not weights.is_file():
        raise MissingFileError(f'{weights} is missing or not a file; pass a checkpoint of '
                               f'{run_dir} (e.g. {run_dir / "checkpoints"}/step_<N>.pt)')
    state = load_checkpoint(weights, device, fix, keys=('model', 'step'))
    seed = run_config.get('seed')
    if checkpoint is not None and (state.get('algorithm', algo) != algo or
                                   state.get('seed', seed) != seed):
        raise ConfigError(f'{weights} is {state.get("algorithm")} seed {state.get("seed")}, '
                          f'but {run_dir} is {algo} seed {seed}; pass a checkpoint of that run')
    restore(weights, fix, (model, state['model']))
    run_config['checkpoint_step'] = int(state['step'])
    if inference:
        run_config['inference'] = inference
    return Run(algo, module, run_config, config, model.to(device).eval())


def load_run(run_dir, device='cpu'):
    """
    Rebuild a trained model from a run folder: return (algo_name, config dict, model).

    ``config`` is the parsed config.yaml (``config['algo_config']`` holds the algorithm's
    resolved fields); ``model`` is in eval mode on ``device``. See :func:`open_run`.
    """
    run = open_run(run_dir, device)
    return run.algorithm, run.run_config, run.model
