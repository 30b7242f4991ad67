"""
Pieces shared by every offline algorithm: networks, diffusion, critics, replay buffer, seeding.

Everything here exists once; fisor.py, bc.py and bcq_lag.py import it. Initialisations follow the
reference code each algorithm was written against (jaxrl5 for FISOR, torch defaults for OSRL).
"""

from dataclasses import fields
import math
import random
import types
import typing
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import ConfigError, UnknownNameError
import torch
from torch import nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- devices and seeding

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
    try:
        return config_cls(**{**presets[preset], **checked})
    except ValueError as error:  # __post_init__'s consistency checks
        raise ConfigError(f'{label} config: {error}') from None


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


# --------------------------------------------------------------------------- schedules, targets

def cosine_decay(step: int, decay_steps: int, alpha: float = 0.0) -> float:
    """Return the cosine-decay factor at ``step`` (optax.cosine_decay_schedule, 1 -> alpha)."""
    progress = min(max(step, 0), decay_steps) / max(decay_steps, 1)
    return alpha + (1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_lr_scheduler(optimizer: torch.optim.Optimizer, decay_steps: int):
    """Return a LambdaLR that decays the optimizer's learning rate with cosine_decay."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_decay(step, decay_steps))


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak-average ``source`` into ``target``: theta' <- (1 - tau) theta' + tau theta."""
    target_params = list(target.parameters())
    source_params = list(source.parameters())
    torch._foreach_lerp_(target_params, source_params, tau)


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Return IQL's expectile loss |tau - 1(u < 0)| u^2 per element (upper expectile, tau > .5)."""
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return weight * u.pow(2)


def reversed_expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Return FISOR's reversed expectile |tau - 1(u > 0)| u^2 per element (a lower expectile)."""
    weight = torch.where(u > 0, 1.0 - tau, tau)
    return weight * u.pow(2)


# --------------------------------------------------------------------------- networks

def init_linear(layer: nn.Linear, kind: str = 'xavier_uniform') -> nn.Linear:
    """Initialise a Linear layer as flax would: 'xavier_uniform' or 'lecun_normal', zero bias."""
    if kind == 'xavier_uniform':
        nn.init.xavier_uniform_(layer.weight)
    elif kind == 'lecun_normal':
        # flax's lecun_normal is a truncated normal with variance 1 / fan_in.
        std = 1.0 / math.sqrt(layer.in_features) / 0.87962566103423978
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    elif kind != 'torch':
        raise ValueError(f'unknown init {kind!r}: use xavier_uniform, lecun_normal or torch')
    if kind != 'torch' and layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def mlp(dims: Sequence[int], activation: Callable[[], nn.Module] = nn.ReLU,
        output_activation: Optional[Callable[[], nn.Module]] = None,
        init: str = 'torch') -> nn.Sequential:
    """
    Build Linear layers through ``dims`` with ``activation`` between them.

    ``output_activation`` (e.g. nn.Tanh) follows the last layer when given.
    """
    if len(dims) < 2:
        raise ValueError(f'mlp needs at least input and output sizes, got {list(dims)}')
    layers = []
    for i in range(len(dims) - 1):
        layers.append(init_linear(nn.Linear(dims[i], dims[i + 1]), init))
        if i < len(dims) - 2:
            layers.append(activation())
        elif output_activation is not None:
            layers.append(output_activation())
    return nn.Sequential(*layers)


class VectorizedLinear(nn.Module):
    """
    ``ensemble_size`` independent Linear layers evaluated in one batched matmul.

    Input [E, B, in] (or [B, in], broadcast to every member), output [E, B, out].
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int,
                 init: str = 'xavier_uniform'):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ensemble_size = ensemble_size
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_features))
        for member in range(ensemble_size):
            layer = init_linear(nn.Linear(in_features, out_features), init)
            with torch.no_grad():
                self.weight[member].copy_(layer.weight.T)
                self.bias[member, 0].copy_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.ensemble_size, -1, -1)
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """An ensemble of MLPs with a scalar output: input [B, in] -> output [E, B]."""

    def __init__(self, in_dim: int, hidden: Sequence[int], ensemble_size: int,
                 activation: Callable[[], nn.Module] = nn.ReLU, init: str = 'xavier_uniform'):
        super().__init__()
        dims = [in_dim, *hidden, 1]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(VectorizedLinear(dims[i], dims[i + 1], ensemble_size, init))
            if i < len(dims) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)
        self.ensemble_size = ensemble_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class QEnsemble(nn.Module):
    """``num_heads`` Q(s, a) networks; forward returns [num_heads, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256),
                 num_heads: int = 2, init: str = 'xavier_uniform'):
        super().__init__()
        self.net = EnsembleMLP(obs_dim + act_dim, hidden, num_heads, init=init)
        self.num_heads = num_heads

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], dim=-1))


class ValueNet(nn.Module):
    """A state-value network V(s); forward returns [B]."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256),
                 init: str = 'xavier_uniform'):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, 1], nn.ReLU, init=init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


# --------------------------------------------------------------------------- diffusion

def vp_beta_schedule(timesteps: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    """Return the discrete VP betas of jaxrl5: 1 - exp(-b_min/T - (b_max-b_min)(2t-1)/2T^2)."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64)
    alpha = torch.exp(-b_min / timesteps - 0.5 * (b_max - b_min) * (2 * t - 1) / timesteps ** 2)
    return (1.0 - alpha).float()


class DiffusionSchedule(nn.Module):
    """The discrete DDPM noise schedule (betas, alphas, cumulative alpha-bars) as buffers."""

    def __init__(self, timesteps: int = 5, b_min: float = 0.1, b_max: float = 10.0):
        super().__init__()
        betas = vp_beta_schedule(timesteps, b_min, b_max)
        alphas = 1.0 - betas
        self.timesteps = timesteps
        self.register_buffer('betas', betas)
        self.register_buffer('alphas', alphas)
        self.register_buffer('alpha_bars', torch.cumprod(alphas, dim=0))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Noise clean actions: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (t: int [B])."""
        alpha_bar = self.alpha_bars[t].unsqueeze(-1)
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * eps


def ddpm_sample(eps_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                schedule: DiffusionSchedule, obs: torch.Tensor, noise: torch.Tensor,
                clip: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """
    Run the DDPM reverse chain with explicit noise; return actions [B, N, act_dim].

    obs: [B, obs_dim]; noise: [B, N, T + 1, act_dim] where noise[:, :, 0] is x_T and
    noise[:, :, k] (k = 1..T) is the draw of the k-th denoising step (t = T - k). The draw of the
    last step (t = 0) is multiplied by zero, exactly as jaxrl5's sampler does, so the output does
    not depend on it. With ``clip`` the sample is clipped to [-1, 1] after every step.
    eps_model(x_t [M, act_dim], obs [M, obs_dim], t [M, 1] float) -> predicted noise [M, act_dim].
    """
    steps = schedule.timesteps
    if noise.dim() != 4 or noise.shape[2] != steps + 1:
        raise ValueError(f'noise must have shape [batch, candidates, {steps + 1}, act_dim] '
                         f'(x_T plus one draw per denoising step), got {tuple(noise.shape)}')
    batch, num, _, act_dim = noise.shape
    if obs.shape[0] != batch:
        raise ValueError(f'obs batch {obs.shape[0]} does not match noise batch {batch}')
    obs_rep = obs.unsqueeze(1).expand(batch, num, obs.shape[-1]).reshape(batch * num, -1)
    x = noise[:, :, 0].reshape(batch * num, act_dim)
    for k in range(steps):
        t = steps - 1 - k
        t_input = torch.full((batch * num, 1), float(t), dtype=x.dtype, device=x.device)
        eps = eps_model(x, obs_rep, t_input)
        alpha, alpha_bar, beta = schedule.alphas[t], schedule.alpha_bars[t], schedule.betas[t]
        x = (x - beta / (1.0 - alpha_bar).sqrt() * eps) / alpha.sqrt()
        if t > 0:
            z = noise[:, :, k + 1].reshape(batch * num, act_dim)
            x = x + beta.sqrt() * temperature * z
        if clip:
            x = x.clamp(-1.0, 1.0)
    return x.reshape(batch, num, act_dim)


class FourierFeatures(nn.Module):
    """Learnable Fourier features of the (integer) time step: [cos(2 pi W t), sin(2 pi W t)]."""

    def __init__(self, out_dim: int = 64, in_dim: int = 1, std: float = 0.2):
        super().__init__()
        if out_dim % 2:
            raise ValueError(f'FourierFeatures out_dim must be even, got {out_dim}')
        self.kernel = nn.Parameter(torch.randn(out_dim // 2, in_dim) * std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2.0 * math.pi * t @ self.kernel.T
        return torch.cat([torch.cos(f), torch.sin(f)], dim=-1)


class MLPResNetBlock(nn.Module):
    """Dropout -> LayerNorm -> Dense(4 h) -> mish -> Dense(h), plus the residual (jaxrl5)."""

    def __init__(self, hidden: int, dropout: float = 0.1, layer_norm: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # flax's LayerNorm epsilon is 1e-6.
        self.norm = nn.LayerNorm(hidden, eps=1e-6) if layer_norm else nn.Identity()
        self.fc1 = init_linear(nn.Linear(hidden, 4 * hidden), 'lecun_normal')
        self.fc2 = init_linear(nn.Linear(4 * hidden, hidden), 'lecun_normal')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.mish(self.fc1(self.norm(self.dropout(x)))))
        return x + y


class MLPResNet(nn.Module):
    """Dense(h) -> blocks x MLPResNetBlock -> mish -> Dense(out) (jaxrl5's ln_resnet)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, num_blocks: int = 3,
                 dropout: float = 0.1, layer_norm: bool = True):
        super().__init__()
        self.inp = init_linear(nn.Linear(in_dim, hidden), 'xavier_uniform')
        self.blocks = nn.ModuleList(
            [MLPResNetBlock(hidden, dropout, layer_norm) for _ in range(num_blocks)])
        self.out = init_linear(nn.Linear(hidden, out_dim), 'xavier_uniform')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(F.mish(x))


class EpsilonNet(nn.Module):
    """
    Noise predictor eps_theta(a_t, s, t) of the diffusion policy (IDQL's DDPM module).

    The integer step t goes through learnable Fourier features and an MLP (mish) to a condition
    vector; concat[a_t, s, cond] goes through an MLPResNet that outputs the predicted noise.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, num_blocks: int = 3,
                 dropout: float = 0.1, time_dim: int = 64,
                 cond_hidden: Sequence[int] = (128, 128)):
        super().__init__()
        self.time_features = FourierFeatures(time_dim)
        self.cond = mlp([time_dim, *cond_hidden], nn.Mish, init='xavier_uniform')
        self.body = MLPResNet(act_dim + obs_dim + cond_hidden[-1], act_dim, hidden, num_blocks,
                              dropout)

    def forward(self, x_t: torch.Tensor, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.cond(self.time_features(t))
        return self.body(torch.cat([x_t, obs, cond], dim=-1))


# --------------------------------------------------------------------------- data on the device

class ReplayBuffer:
    """
    A dataset held as tensors on one device, sampled in whole batches (no per-item Python).

    ``generator`` (a torch.Generator on the same device) makes the batch indices reproducible
    independently of the other random draws; its state is part of a checkpoint.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], device: torch.device, seed: int = 0):
        if not arrays:
            raise ValueError('ReplayBuffer needs at least one array')
        sizes = {key: len(value) for key, value in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f'ReplayBuffer arrays have different lengths: {sizes}')
        self.size = next(iter(sizes.values()))
        if self.size == 0:
            raise ConfigError('ReplayBuffer got an empty dataset; give a dataset with '
                              'transitions')
        self.device = torch.device(device)
        self.data = {key: torch.as_tensor(np.asarray(value, dtype=np.float32)).to(self.device)
                     for key, value in arrays.items()}
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        """Return ``batch_size`` uniform indices (with replacement)."""
        return torch.randint(0, self.size, (batch_size,), device=self.device,
                             generator=self.generator)

    def sample(self, batch_size: int) -> Dict[str, torch.Tensor]:
        """Return a dict of [batch_size, ...] tensors drawn uniformly with replacement."""
        idx = self.sample_indices(batch_size)
        return {key: value.index_select(0, idx) for key, value in self.data.items()}

    def state_dict(self) -> dict:
        """Return the sampler state (the data itself is rebuilt from the dataset)."""
        return {'generator': self.generator.get_state(), 'size': self.size}

    def load_state_dict(self, state: dict) -> None:
        """Restore the sampler state saved by state_dict()."""
        if state['size'] != self.size:
            raise ConfigError(f'checkpoint was trained on {state["size"]} transitions but the '
                              f'dataset has {self.size}; resume with the same dataset')
        self.generator.set_state(state['generator'].cpu())


def check_dataset(data: Mapping[str, np.ndarray], keys: Iterable[str] = DSRL_KEYS) -> int:
    """Check that ``data`` has the DSRL keys with one row per transition; return the size."""
    missing = [key for key in keys if key not in data]
    if missing:
        raise UnknownNameError(f'dataset is missing {missing}; expected the DSRL keys '
                               f'{list(keys)} (load it with '
                               'offline_training.data.dataset.load_dataset)')
    sizes = {key: len(data[key]) for key in keys}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f'dataset arrays differ in length: {sizes}')
    return next(iter(sizes.values()))


def clip_actions(actions: np.ndarray, limit: float = 1.0 - 1e-5) -> np.ndarray:
    """Clip dataset actions into the open interval (-1, 1), as FISOR's loader does."""
    return np.clip(np.asarray(actions, dtype=np.float32), -limit, limit)
