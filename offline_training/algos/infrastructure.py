"""
Training infrastructure shared by every algorithm: typed config presets, devices and seeding.

Nothing here is part of an algorithm's mathematics; it is what makes a run configurable,
placeable on a device and reproducible (RNG states are part of a checkpoint).
"""

from dataclasses import fields
import math
import random
import types
import typing
from typing import Iterable, Mapping, Optional, Tuple

import numpy as np
from offline_training.algos import native
from offline_training.algos.networks import soft_update
from saferl_ros.errors import ConfigError, UnknownNameError
import torch


# --------------------------------------------------------------------------- typed configs

def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f'a list of {_type_name(args[0])}'
        return f'a list of {len(args)} values'
    names = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
             type(None): 'null'}
    return names.get(annotation, getattr(annotation, '__name__', str(annotation)))


def _check_value(value, annotation):
    """Return ``value`` (numeric text as a float) if it fits ``annotation``; raise TypeError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_value(value, option)
            except TypeError:
                pass
        raise TypeError
    if annotation is type(None):
        if value is None:
            return value
        raise TypeError
    if annotation is bool or annotation is str:
        if isinstance(value, annotation):
            return value
        raise TypeError
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        items = list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = [args[0]] * len(items)
        elif len(args) == len(items):
            kinds = list(args)
        else:
            raise TypeError
        checked = [_check_value(item, kind) for item, kind in zip(items, kinds)]
        return type(value)(checked)
    return value


def config_from_preset(config_cls, presets: Mapping[str, dict], preset: str, overrides: dict,
                       label: str):
    """
    Return ``config_cls`` built from the named preset with ``overrides`` applied.

    Unknown presets and unknown field names raise KeyError (:class:`UnknownNameError`) naming
    ``label`` and the choices, and a value of the wrong type (a string for a number, a number
    for a list) raises ValueError (:class:`ConfigError`) naming the field, so a typo on the
    command line fails loudly instead of training with a default or crashing mid-run.
    """
    if preset not in presets:
        raise UnknownNameError(f'unknown {label} preset {preset!r}; choose one of '
                               f'{sorted(presets)}')
    kinds = {f.name: f.type for f in fields(config_cls)}
    defaults = {f.name: f.default for f in fields(config_cls)}
    unknown = sorted(set(overrides) - set(kinds))
    if unknown:
        raise UnknownNameError(f'unknown {label} config fields {unknown}; known fields: '
                               f'{", ".join(sorted(kinds))}')
    checked = {}
    for name, value in overrides.items():
        try:
            checked[name] = _check_value(value, kinds[name])
        except TypeError:
            raise ConfigError(f'{label} config field {name!r} should be '
                              f'{_type_name(kinds[name])}, found {type(value).__name__} '
                              f'{value!r}; give a value of that type') from None
        # NaN or inf as a learning rate, temperature or limit would train garbage for an hour
        # (or fail deep inside torch); a field whose default is infinite may be given inf
        number = checked[name]
        infinite_default = isinstance(defaults[name], float) and math.isinf(defaults[name])
        if isinstance(number, float) and not math.isfinite(number) and not infinite_default:
            raise ConfigError(f'{label} config field {name!r} is {number}; give a finite number')
    try:
        config = config_cls(**{**presets[preset], **checked})
    except ValueError as error:  # __post_init__'s consistency checks
        raise ConfigError(f'{label} config: {error}') from None
    for field in fields(config):
        value = getattr(config, field.name)
        if field.name.endswith(('batch_size', '_batch')) and isinstance(value, int) and \
                not 1 <= value <= MAX_BATCH_SIZE:
            # the batch is allocated whole each step: 1e8 rows took the machine's memory
            raise ConfigError(f'{label} config field {field.name!r} is {value}; a batch must '
                              f'hold 1 to {MAX_BATCH_SIZE} rows')
    return config


# Largest batch a config may ask for (rows per step): well above every preset (2 048 at most).
MAX_BATCH_SIZE = 1 << 17


# --------------------------------------------------------------------------- optimisers

def adam(params: Iterable[torch.nn.Parameter], lr: float,
         weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """
    Return Adam (AdamW when ``weight_decay`` is given) with torch's fused kernel where it runs.

    The fused kernel updates every tensor of a network in one call; torch's default on a CPU is
    a Python loop over the tensors, which took ~12 % of a FISOR `cpu` actor update (one step of
    that network's optimiser 4-5x faster fused, a Q ensemble's 2.7-3.6x:
    `python bench/bench_fisor_kernels.py --kernels-only`). Same algorithm and hyperparameters.
    Asked for when every parameter is float32 on a CPU or a CUDA device (what these networks
    train in); otherwise torch's default implementation.

    Loading a saved state keeps this optimiser's kernel: torch would take the saved ``fused``
    flag, so a run resumed from a checkpoint written before the fused kernel was used (or on
    another device) would silently fall back to the loop.
    """
    params = list(params)
    fused = bool(params) and all(p.dtype == torch.float32 and p.device.type in ('cpu', 'cuda')
                                 for p in params)
    if weight_decay is None:
        optimizer = torch.optim.Adam(params, lr=lr, fused=fused or None)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                      fused=fused or None)
    kernel = [(group['fused'], group['foreach']) for group in optimizer.param_groups]

    def keep_kernel(opt: torch.optim.Optimizer) -> None:
        for group, (group_fused, group_foreach) in zip(opt.param_groups, kernel):
            group['fused'], group['foreach'] = group_fused, group_foreach
            if not group_fused:
                continue
            for param in group['params']:   # the fused kernel wants its step counters there
                state = opt.state.get(param, {})
                if torch.is_tensor(state.get('step')):
                    state['step'] = state['step'].to(device=param.device, dtype=torch.float32)

    optimizer.register_load_state_dict_post_hook(keep_kernel)
    return optimizer


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
            average: Optional[Tuple[torch.nn.Module, torch.nn.Module, float]] = None) -> None:
    """
    One gradient step: clear the gradients, backpropagate ``loss`` and step ``optimizer``.

    ``average=(target, source, tau)``: then move ``target``'s parameters toward ``source``'s by
    ``tau`` (networks.soft_update: a target critic, an EMA policy). An Adam whose parameters
    are float32 on a CPU thread steps in the compiled loop (native.adam_step), with the average
    in the same pass when ``source``'s parameters are the optimizer's: inside a FISOR iteration
    the actor's step with its EMA took 530-930 us there against 880-1290 us for torch's fused
    step and soft_update (which reads every tensor's step counter back one by one). The same
    update to rounding either way; anything else takes torch's step and soft_update.
    """
    for group in optimizer.param_groups:
        for param in group['params']:
            param.grad = None
    loss.backward()
    if average is None:
        if not native.adam_step(optimizer):
            optimizer.step()
        return
    target, source, tau = average
    params = [param for group in optimizer.param_groups for param in group['params']]
    sources = list(source.parameters())
    if not (len(sources) == len(params) and all(a is b for a, b in zip(sources, params))
            and native.adam_step(optimizer, target.parameters(), tau)):
        optimizer.step()
        soft_update(target, source, tau)


class AdamTensors(typing.NamedTuple):
    """One Adam/AdamW's parameters (detached aliases) and state, for a compiled step."""

    params: list
    exp_avgs: list
    exp_avg_sqs: list
    steps: list
    betas: Tuple[float, float]
    eps: float
    weight_decay: float
    decoupled: bool


def adam_tensors(optimizer: torch.optim.Optimizer) -> Optional[AdamTensors]:
    """
    Return the tensors a compiled step updates for ``optimizer``, or None where it cannot.

    A torch Adam or AdamW with one parameter group, float hyperparameters, no step hooks and
    none of amsgrad, maximize, capturable or differentiable. Its state is created as torch
    creates it on the first step (float32 step counters, zero moments) when it has none, and
    taken from ``optimizer.state`` on every call (loading a state dict replaces those tensors).
    The parameters come as detached aliases: the compiled step updates them in place.
    """
    # (torch's step() runs step hooks; this update would not)
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or \
            len(optimizer.param_groups) != 1 or native._step_hooks(optimizer):
        return None
    group = optimizer.param_groups[0]
    if any(group.get(name) for name in ('amsgrad', 'maximize', 'capturable', 'differentiable')) \
            or not all(type(v) in (int, float) for v in (group['lr'], group['eps'],
                                                         group['weight_decay'], *group['betas'])):
        return None
    params, state = group['params'], optimizer.state
    native.initial_adam_state(state, params)
    entries = [state.get(param, {}) for param in params]
    if not all({'step', 'exp_avg', 'exp_avg_sq'} <= entry.keys() for entry in entries):
        return None
    optimizer._opt_called = True     # what torch's LR schedulers' wrapper of step() records
    return AdamTensors([param.detach() for param in params],
                       [entry['exp_avg'] for entry in entries],
                       [entry['exp_avg_sq'] for entry in entries],
                       [entry['step'] for entry in entries],
                       tuple(float(b) for b in group['betas']), float(group['eps']),
                       float(group['weight_decay']),
                       bool(group.get('decoupled_weight_decay'))
                       or type(optimizer) is torch.optim.AdamW)


def adam_update_(tensors: AdamTensors, grads, lr: torch.Tensor, average=None,
                 tau: float = 0.0) -> None:
    """
    Apply torch's Adam/AdamW update to ``tensors`` (adam_tensors), in tensor operations.

    ``grads`` pairs with the parameters. The body of a compiled training step (torch.compile
    fuses it into a few loops): torch's single-tensor algorithm (bias corrections from the
    float32 step counter, AdamW's decoupled or Adam's L2 decay), then ``average`` (tensors
    paired with the parameters) moved toward the new parameters by ``tau``
    (networks.soft_update). ``lr``: a 0-d tensor, so that a changing learning rate does not
    recompile the step. The same update to rounding.
    """
    beta1, beta2 = tensors.betas
    decay = tensors.weight_decay
    for k, (param, grad) in enumerate(zip(tensors.params, grads)):
        step = tensors.steps[k]
        step.add_(1)
        if decay and tensors.decoupled:
            param.mul_(1 - lr * decay)
        elif decay:
            grad = grad.add(param, alpha=decay)
        tensors.exp_avgs[k].lerp_(grad, 1 - beta1)
        tensors.exp_avg_sqs[k].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (tensors.exp_avg_sqs[k].sqrt() / (1 - beta2 ** step).sqrt()).add_(tensors.eps)
        param.sub_(step_size * tensors.exp_avgs[k] / denom)
        if average is not None:
            average[k].lerp_(param, tau)


# --------------------------------------------------------------------------- devices and seeding

class DeviceError(ConfigError, RuntimeError):
    """A requested torch device that this machine does not have."""


def resolve_device(device: str = 'auto') -> torch.device:
    """Return the torch device for 'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:i]'."""
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if str(device).startswith('cuda') and not torch.cuda.is_available():
        raise DeviceError(f'device {device!r} requested but CUDA is not available; '
                          "use --device cpu or 'auto'")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise DeviceError(f'unknown device {device!r} ({error}); use --device auto, cpu or '
                          'cuda[:i]') from None


# glibc's malloc hands blocks above a dynamic threshold back to the kernel when they are freed and
# trims the heap top as soon as 2x that threshold is free. A training step allocates and frees the
# same few-MB activations every iteration (BCQ-Lag scores 10 sampled next actions per state:
# [2560, 200] tensors), so every step re-maps and re-zeroes them: ~6300 page faults and a fifth of
# the CPU time in the kernel (bench/bench_allocator.py). Keeping freed memory in the heap removes
# that; the free memory kept at the top of a heap is bounded by KEEP_FREED_BYTES (blocks above
# the mmap threshold are still returned when freed).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3           # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 32 * 2**20                     # the largest value glibc accepts (64-bit)
KEEP_FREED_BYTES = 256 * 2**20
_allocator_setting = 'allocator: default malloc settings'


def allocator_setting() -> str:
    """Return what keep_freed_memory() did in this process (recorded in a run's summary)."""
    return _allocator_setting


def keep_freed_memory() -> str:
    """
    Make glibc keep freed training activations in the heap instead of unmapping them.

    Only the calling process changes: the training CLIs call it (saferl-train's main, so also
    saferl-loop, which calls it in its own process; saferl-data reshape); library functions such
    as train() do not.
    Returns a one-line description of what was done, or why nothing was (not glibc): the
    setting changes speed only, never results.
    """
    global _allocator_setting
    import ctypes
    import ctypes.util
    mallopt = None
    # find_library may find nothing in a minimal container (no ldconfig cache); glibc's soname
    # and the process's own symbols are tried too.
    for name in (ctypes.util.find_library('c'), 'libc.so.6', None):
        try:
            mallopt = ctypes.CDLL(name).mallopt
            break
        except (OSError, AttributeError, TypeError):
            continue
    if mallopt is None:
        _allocator_setting = 'allocator: not glibc (no mallopt); default malloc settings kept'
    else:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        if (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)):
            _allocator_setting = (f'allocator: glibc keeps up to {KEEP_FREED_BYTES >> 20} MiB '
                                  f'of freed memory (mmap threshold '
                                  f'{MMAP_THRESHOLD_BYTES >> 20} MiB)')
        else:
            _allocator_setting = ('allocator: mallopt refused the thresholds; default malloc '
                                  'settings kept')
    return _allocator_setting


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Return every global RNG state, so a resumed run draws the same numbers."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states saved by rng_state()."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
