"""
OASIS: conditional distribution shaping of an offline dataset (Yao et al., NeurIPS 2024).

OASIS changes the data, not the learner. On the raw dataset it trains
- a conditional diffusion model over state windows tau = [s_0, ..., s_{L-1}] conditioned on the
  source trajectory's normalised returns y = [C, R], with condition dropout p for
  classifier-free guidance (trajectory_diffusion.py; Eqs. 5-8);
- an inverse dynamics model f(s, s') -> a, trained jointly: loss 0.5 (denoise + inverse);
- reward and cost labellers r(s, a, s'), c(s, a, s') (see ``Labeller`` for the model chosen).
Then it generates windows from start states of the data under conditions with cost <= kappa
(Algorithm 1: guidance w, first state pinned), keeps their first ``keep_states`` states, labels
them and writes a DSRL file marked as generated. The policy is BCQ-Lag trained on that file:
registered as ``oasis`` (this module's protocol functions are BCQ-Lag's, refusing data that is
not generated), i.e. ``saferl-train oasis --dataset OUT.hdf5``.

``reshape(data, task, config)`` runs the whole data step; ``saferl-data reshape`` is its CLI.
"""

from copy import deepcopy
from dataclasses import asdict, dataclass, replace
import hashlib
from pathlib import Path
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from offline_training.algos import bcq_lag
from offline_training.algos.infrastructure import (adam, config_from_preset, descend, rng_state,
                                                   set_rng_state, set_seed)
from offline_training.algos.networks import mlp, soft_update
from offline_training.algos.trajectory_diffusion import (first_state_pin, TrajectoryDiffusion,
                                                         TrajectoryDiffusionConfig)
from offline_training.data.trajectories import trajectory_returns
from offline_training.runs import load_checkpoint, write_checkpoint
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import ConfigError
from saferl_ros.tasks import get_task
import torch
from torch import nn
import torch.nn.functional as F
from tqdm import tqdm, trange

NAME = 'oasis'
GENERATOR_FORMAT = 'saferl-oasis-generator-1'
GENERATOR_CHECKPOINT_FORMAT = 'saferl-oasis-generator-checkpoint-1'
# Generator training keeps its state every this many steps (about 2-3 CPU-minutes on the
# 'cpu' preset): an interrupted reshape resumes, losing at most that much.
GENERATOR_CHECKPOINT_EVERY = 500
# Config fields that generation or the labellers read, not the generator's training: a
# resumed generator may differ in them (e.g. another kappa for the same generator).
NOT_TRAINING = frozenset({'keep_states', 'guidance', 'noise_scale', 'kappa', 'num_starts',
                          'conditions', 'sample_batch', 'label_hidden', 'label_steps',
                          'label_batch', 'label_lr', 'holdout_fraction'})

# The official code's generation conditions, (reward return, cost return) per task, kappa = 20
# (official code, Generation/dataset_generation.py). Other kappas scale the costs by kappa/20.
OFFICIAL_CONDITIONS: Dict[str, Tuple[Tuple[float, float], ...]] = {
    'BallCircle': ((600, 10), (625, 15), (625, 20)),
    'CarCircle': ((325, 10), (325, 15), (350, 20)),
    'DroneCircle': ((500, 10), (500, 15), (550, 20)),
    'BallRun': ((400, 10), (400, 15), (450, 20)),
    'CarRun': ((400, 10), (400, 15), (425, 20)),
    'DroneRun': ((275, 10), (275, 15), (300, 20)),
}
# Where generation's pinned start states are drawn (OASISConfig.start_states).
START_STATES = ('data', 'training')
# The inverse dynamics' hidden width (official ``embedding_dim``) and generator steps per task.
INVERSE_HIDDEN = {'BallCircle': 32, 'CarCircle': 32, 'BallRun': 64, 'CarRun': 64,
                  'DroneCircle': 128, 'DroneRun': 128}
LONG_TASKS = ('DroneCircle', 'DroneRun')


@dataclass
class OASISConfig:
    """OASIS's data step; defaults are the official code's values (the paper gives few)."""

    # generator: windows, schedule, guidance (Sec. 4.3, Eq. 8; L, p and w from the code)
    horizon: int = 32                      # L states per window
    keep_states: int = 17                  # generated windows are clipped to their first states
    denoise_steps: int = 20                # K (Table 2 ablates 10/20/40)
    guidance: float = 2.0                  # w
    cond_dropout: float = 0.1              # p
    pin_first_state: bool = True           # x_k[0] = x_0[0] (footnote 1: optional)
    noise_scale: float = 0.5               # official sampler: 0.5 N(0, I) start and step noise
    clip_x0: float = 10.0
    hidden: int = 256                      # MLP-ResNet width (the code: a U-Net, dim 128)
    num_blocks: int = 3
    time_dim: int = 64
    cond_hidden: int = 128
    inverse_hidden: Optional[int] = None   # official per task (INVERSE_HIDDEN); 64 otherwise
    parameterization: str = 'x0'           # the network's output (trajectory_diffusion.py)
    # generator optimisation (official: AdamW 3e-5, wd 1e-4, clip 0.25, warm-up 500, EMA)
    steps: Optional[int] = None            # 200k, 600k for Drone tasks (resolve_config)
    batch_size: int = 256
    lr: float = 3e-5
    weight_decay: float = 1e-4
    grad_clip: float = 0.25
    warmup: int = 500
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_start: int = 2000
    cost_sample_offset: Optional[float] = 70.0   # trajectory weight max(offset - C, 0); None: 1
    # labellers (our choice: MLPs on (s, a, s'); see Labeller)
    label_hidden: Tuple[int, ...] = (256, 256)
    label_steps: int = 20_000
    label_batch: int = 256
    label_lr: float = 1e-3
    holdout_fraction: float = 0.1          # trajectories held out to measure label error
    # generation (Sec. 5: three cost conditions <= kappa; 4000 start states in the code)
    kappa: float = 20.0
    num_starts: int = 4000
    # where the pinned start states come from: 'data' (the code: uniform over the data's states)
    # or 'training' (ours: the first states of windows drawn as the generator trained on them,
    # trajectory weight max(cost_sample_offset - C, 0); docs/algorithms.md "OASIS")
    start_states: str = 'data'
    conditions: Optional[Tuple[Tuple[float, float], ...]] = None   # (reward, cost) returns
    sample_batch: int = 1000

    def __post_init__(self):
        self.label_hidden = tuple(int(h) for h in self.label_hidden)
        if self.conditions is not None:
            self.conditions = tuple((float(r), float(c)) for r, c in self.conditions)
        if not 2 <= self.keep_states <= self.horizon:
            raise ValueError(f'keep_states must lie in [2, horizon={self.horizon}], got '
                             f'{self.keep_states}')
        if self.kappa <= 0:
            raise ValueError(f'kappa must be > 0, got {self.kappa}')
        if self.start_states not in START_STATES:
            raise ValueError(f'start_states must be one of {", ".join(START_STATES)}, got '
                             f'{self.start_states!r}')


# 'cpu': the paper's shapes with 1/10 of the generator steps at a 10x learning rate and a
# shorter labeller run (budget measured in docs/algorithms.md). 'test': tiny, seconds.
GENERATOR_PRESETS: Dict[str, dict] = {
    'paper': {},
    'cpu': {'steps': 20_000, 'lr': 3e-4, 'ema_start': 1000, 'label_steps': 5000},
}
GENERATOR_PRESETS['test'] = {
    'horizon': 8, 'keep_states': 5, 'denoise_steps': 10, 'hidden': 32, 'num_blocks': 1,
    'time_dim': 8, 'cond_hidden': 16, 'inverse_hidden': 16, 'steps': 40, 'batch_size': 32,
    'lr': 1e-3, 'warmup': 1, 'ema_start': 0, 'ema_every': 1, 'label_hidden': (32,),
    'label_steps': 50, 'label_batch': 64, 'num_starts': 20, 'sample_batch': 64}


def make_generator_config(preset: str = 'paper', **overrides) -> OASISConfig:
    """Return the OASIS data-step config of a named preset with ``overrides`` applied."""
    return config_from_preset(OASISConfig, GENERATOR_PRESETS, preset, overrides, 'OASIS')


def resolve_generator_config(config: OASISConfig, task) -> OASISConfig:
    """Fill in the task's generator steps, inverse width and generation conditions."""
    name = task.name
    if config.steps is None:
        config = replace(config, steps=600_000 if name in LONG_TASKS else 200_000)
    if config.inverse_hidden is None:
        config = replace(config, inverse_hidden=INVERSE_HIDDEN.get(name, 64))
    if config.conditions is None and name in OFFICIAL_CONDITIONS:
        scale = config.kappa / 20.0
        config = replace(config, conditions=tuple(
            (r, c * scale) for r, c in OFFICIAL_CONDITIONS[name]))
    return config


# --------------------------------------------------------------------------- the policy step
# OASIS's learner is BCQ-Lag (Sec. 4.3): the Algorithm protocol's CONFIG, PRESETS and functions
# are BCQ-Lag's; under the name 'oasis' saferl-train refuses data not marked as generated.
REQUIRES_GENERATED = True
CONFIG = bcq_lag.CONFIG
PRESETS = bcq_lag.PRESETS
make_config = bcq_lag.make_config
resolve_config = bcq_lag.resolve_config
prepare_arrays = bcq_lag.prepare_arrays
build_model = bcq_lag.build_model
make_trainer = bcq_lag.make_trainer


def export_plan(model, config):
    """Return BCQ-Lag's graphs, named as OASIS's in the manifest."""
    return replace(bcq_lag.export_plan(model, config), algorithm=NAME)


# --------------------------------------------------------------------------- data

def arrays_sha256(data: Dict[str, np.ndarray]) -> str:
    """Return a sha256 of the DSRL arrays (the identity of a source that is not one file)."""
    digest = hashlib.sha256()
    for key in DSRL_KEYS:
        array = np.ascontiguousarray(np.asarray(data[key], dtype=np.float32))
        digest.update(key.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class WindowSampler:
    """
    Windows of L consecutive states of the dataset's trajectories, with their actions and y.

    A trajectory of n transitions has n + 1 states; those with fewer than L states are dropped
    (as in the code). Trajectories are drawn with weight max(offset - C, 0) (the code's
    ``cost_sample``; uniform when ``offset`` is None or every weight is 0), then a uniform start.
    """

    def __init__(self, data: Dict[str, np.ndarray], horizon: int,
                 offset: Optional[float] = 70.0):
        reward_returns, cost_returns, starts, stops = trajectory_returns(data)
        keep = (stops - starts + 1) >= horizon
        if not keep.any():
            raise ConfigError(f'no trajectory has {horizon} states (the longest has '
                              f'{int((stops - starts).max()) + 1}); lower the OASIS horizon')
        obs = np.asarray(data['observations'], dtype=np.float32)
        nxt = np.asarray(data['next_observations'], dtype=np.float32)
        act = np.asarray(data['actions'], dtype=np.float32)
        states, actions, offsets, counts = [], [], [], []
        total = 0
        for a, b in zip(starts[keep], stops[keep]):
            states.append(np.concatenate([obs[a:b], nxt[b - 1:b]]))
            actions.append(np.concatenate([act[a:b], np.zeros_like(act[:1])]))
            offsets.append(total)
            counts.append(b - a + 1)
            total += b - a + 1
        self.states = np.concatenate(states)
        self.actions = np.concatenate(actions)
        self.offsets, self.counts = np.array(offsets), np.array(counts)
        self.horizon = horizon
        self.reward_returns, self.cost_returns = reward_returns[keep], cost_returns[keep]
        # y = [C, R] normalised by the dataset's maxima (official code, Sec. 4.3's order).
        self.cost_max = max(float(cost_returns.max()), 1e-6)
        self.reward_max = max(float(np.abs(reward_returns).max()), 1e-6)
        self.cond = np.stack([self.cost_returns / self.cost_max,
                              self.reward_returns / self.reward_max], axis=1).astype(np.float32)
        weights = np.ones(len(self.offsets))
        if offset is not None:
            weights = np.maximum(offset - self.cost_returns, 0.0)
            if weights.sum() <= 0:
                weights = np.ones(len(self.offsets))
        self.probs = weights / weights.sum()

    def sample(self, batch: int, rng: np.random.Generator):
        """Return (windows [B, L, D], actions [B, L - 1, A], y [B, 2]) as numpy arrays."""
        traj = rng.choice(len(self.offsets), size=batch, p=self.probs)
        start = (rng.random(batch) * (self.counts[traj] - self.horizon + 1)).astype(np.int64)
        index = (self.offsets[traj] + start)[:, None] + np.arange(self.horizon)[None]
        return self.states[index], self.actions[index[:, :-1]], self.cond[traj]


# --------------------------------------------------------------------------- models

class InverseDynamics(nn.Module):
    """f(s, s') -> a: Linear(2|S|, E) ReLU Linear(E, E) ReLU Linear(E, |A|) (official)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp([2 * obs_dim, hidden, hidden, act_dim], nn.ReLU)

    def forward(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, next_obs], dim=-1))


class Labeller(nn.Module):
    """
    Reward and cost labels r(s, a, s'), c(s, a, s') from two MLPs on normalised [s, a, s'].

    Our choice where the paper is silent and the code uses a causal-decomposition network
    without the action: the simplest model that fits Eqs. 44-47 (functions of s and s'). The
    reward head regresses the standardised reward; the cost head is a logistic classifier when
    the data's costs are all 0/1 (the tasks' indicator costs), labels being the 0/1 decision,
    and a regression otherwise.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Tuple[int, ...]):
        super().__init__()
        dims = [2 * obs_dim + act_dim, *hidden, 1]
        self.reward = mlp(dims, nn.ReLU)
        self.cost = mlp(dims, nn.ReLU)
        self.register_buffer('reward_mean', torch.zeros(()))
        self.register_buffer('reward_std', torch.ones(()))
        self.register_buffer('binary_cost', torch.tensor(True))

    def heads(self, obs, act, next_obs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (standardised reward, cost logit or value), both [B]."""
        x = torch.cat([obs, act, next_obs], dim=-1)
        return self.reward(x).squeeze(-1), self.cost(x).squeeze(-1)

    def forward(self, obs, act, next_obs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (reward, cost) labels in the data's units."""
        reward, cost = self.heads(obs, act, next_obs)
        reward = reward * self.reward_std + self.reward_mean
        cost = (cost > 0).float() if bool(self.binary_cost) else cost.clamp(min=0.0)
        return reward, cost


class OASISModel(nn.Module):
    """Generator (diffusion + inverse dynamics), labellers and the data's normalisers."""

    def __init__(self, obs_dim: int, act_dim: int, config: OASISConfig):
        super().__init__()
        c = config
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.diffusion = TrajectoryDiffusion(TrajectoryDiffusionConfig(
            horizon=c.horizon, dim=obs_dim, cond_dim=2, steps=c.denoise_steps,
            schedule='cosine', hidden=c.hidden, num_blocks=c.num_blocks, time_dim=c.time_dim,
            cond_hidden=c.cond_hidden, cond_dropout=c.cond_dropout, clip_x0=c.clip_x0,
            noise_scale=c.noise_scale, parameterization=c.parameterization))
        self.inverse = InverseDynamics(obs_dim, act_dim, c.inverse_hidden or 64)
        self.labeller = Labeller(obs_dim, act_dim, c.label_hidden)
        self.register_buffer('state_mean', torch.zeros(obs_dim))
        self.register_buffer('state_std', torch.ones(obs_dim))
        self.register_buffer('cost_max', torch.ones(()))
        self.register_buffer('reward_max', torch.ones(()))

    def normalize(self, states: torch.Tensor) -> torch.Tensor:
        """Return z-normalised states."""
        return (states - self.state_mean) / self.state_std

    def unnormalize(self, states: torch.Tensor) -> torch.Tensor:
        """Return states in the data's units."""
        return states * self.state_std + self.state_mean

    def condition(self, reward: float, cost: float, n: int) -> torch.Tensor:
        """Return n copies of y_c = [C / C_max, R / R_max] for target returns (R, C)."""
        y = torch.stack([torch.as_tensor(cost / self.cost_max),
                         torch.as_tensor(reward / self.reward_max)]).float()
        return y.to(self.state_mean.device).expand(n, 2)


# --------------------------------------------------------------------------- losses

def inverse_loss(inverse: nn.Module, windows: torch.Tensor, actions: torch.Tensor):
    """Inverse dynamics MSE on consecutive states: E ||f(s_t, s_t+1) - a_t||^2."""
    return (inverse(windows[:, :-1], windows[:, 1:]) - actions).pow(2).mean()


def generator_loss(model: OASISModel, windows: torch.Tensor, actions: torch.Tensor,
                   cond: torch.Tensor, pin_mask: Optional[torch.Tensor] = None):
    """
    Return (0.5 (L_denoise + L_inv), L_denoise, L_inv): Eq. 7 plus f, as in the code.

    ``pin_mask`` marks the entries pinned at sampling (the first state): kept clean in x_k and
    left out of the denoising loss.
    """
    weight = None if pin_mask is None else (~pin_mask).to(windows.dtype)
    denoise = model.diffusion.loss(windows, cond, weight, pin_mask)
    inv = inverse_loss(model.inverse, windows, actions)
    return 0.5 * (denoise + inv), denoise, inv


def reward_label_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of the standardised reward."""
    return (pred - target).pow(2).mean()


def cost_label_loss(pred: torch.Tensor, target: torch.Tensor, binary: bool) -> torch.Tensor:
    """Binary cross-entropy of the cost logit (0/1 costs), else MSE."""
    if binary:
        return F.binary_cross_entropy_with_logits(pred, target)
    return (pred - target).pow(2).mean()


# --------------------------------------------------------------------------- training

def _first_state_pin_mask(config: OASISConfig, obs_dim: int, device) -> Optional[torch.Tensor]:
    """Mask of the first state, pinned at sampling: clean in x_k and loss weight 0 (official)."""
    if not config.pin_first_state:
        return None
    mask = torch.zeros(1, config.horizon, obs_dim, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return mask


def train_generator(model: OASISModel, sampler: WindowSampler, config: OASISConfig,
                    device='cpu', seed: int = 0, progress: bool = False,
                    checkpoint: Optional[Path] = None, identity: Optional[dict] = None,
                    checkpoint_every: Optional[int] = None) -> Dict[str, float]:
    """
    Train diffusion + inverse dynamics jointly (AdamW, warm-up, clip, EMA); return logs.

    With ``checkpoint`` (a file path) the training state is written there every
    ``checkpoint_every`` steps, and a file already there is resumed: the same steps, batches and
    noise as an uninterrupted run. ``identity`` (e.g. the source data's sha256) is stored with
    it; a checkpoint of another identity, config or seed is refused, not resumed.
    ``checkpoint_every`` defaults to GENERATOR_CHECKPOINT_EVERY.
    """
    checkpoint_every = checkpoint_every or GENERATOR_CHECKPOINT_EVERY
    rng = np.random.default_rng(seed)
    params = list(model.diffusion.parameters()) + list(model.inverse.parameters())
    opt = adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(config.warmup, 1)))
    ema = deepcopy(nn.ModuleList([model.diffusion, model.inverse])).requires_grad_(False)
    live = nn.ModuleList([model.diffusion, model.inverse])
    pin_mask = _first_state_pin_mask(config, model.obs_dim, device)
    mean, std = model.state_mean.cpu().numpy(), model.state_std.cpu().numpy()
    logs: Dict[str, float] = {}
    # the device kind too: a CUDA state resumed on the CPU would not continue the same run
    owner = {'identity': identity or {}, 'seed': int(seed),
             'device': torch.device(device).type,
             'config': {k: v for k, v in asdict(config).items() if k not in NOT_TRAINING}}
    first, wall_before, cpu_before = 0, 0.0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        saved = _load_generator_checkpoint(checkpoint, owner)
        try:
            live.load_state_dict(saved['live'])
            ema.load_state_dict(saved['ema'])
            opt.load_state_dict(saved['opt'])
            sched.load_state_dict(saved['sched'])
            rng.bit_generator.state = saved['sampler_rng']
            set_rng_state(saved['rng'])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            first = (str(error).strip().splitlines() or [''])[0]
            raise ConfigError(f'{checkpoint}: does not match this generator '
                              f'({type(error).__name__}: {first}); remove it to train the '
                              'generator from the start') from None
        first, wall_before = int(saved['step']), float(saved['wall_s'])
        cpu_before = float(saved.get('cpu_s', 0.0))
    start, cpu_start = time.time(), time.process_time()

    def save(done: int) -> None:
        write_checkpoint({'format': GENERATOR_CHECKPOINT_FORMAT, 'owner': owner, 'step': done,
                          'live': live.state_dict(), 'ema': ema.state_dict(),
                          'opt': opt.state_dict(), 'sched': sched.state_dict(),
                          'sampler_rng': rng.bit_generator.state, 'rng': rng_state(),
                          'wall_s': wall_before + time.time() - start,
                          'cpu_s': cpu_before + time.process_time() - cpu_start},
                         Path(checkpoint))

    bar = trange(first, config.steps, initial=first, total=config.steps, desc='oasis generator',
                 disable=not progress, dynamic_ncols=True)
    for step in bar:
        windows, actions, cond = sampler.sample(config.batch_size, rng)
        windows = torch.as_tensor((windows - mean) / std, device=device)
        actions = torch.as_tensor(actions, device=device)
        cond = torch.as_tensor(cond, device=device)
        total, denoise, inv = generator_loss(model, windows, actions, cond, pin_mask)
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        if step % config.ema_every == 0:
            if step < config.ema_start:
                ema.load_state_dict(live.state_dict())
            else:
                soft_update(ema, live, 1.0 - config.ema_decay)
        if step % 100 == 0 or step == config.steps - 1:
            logs = {'loss/total': total.item(), 'loss/denoise': denoise.item(),
                    'loss/inverse': inv.item()}
            bar.set_postfix({k.split('/')[-1]: f'{v:.3g}' for k, v in logs.items()},
                            refresh=False)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 \
                and step + 1 < config.steps:
            save(step + 1)
    live.load_state_dict(ema.state_dict())
    # CPU time is the budget's unit on a shared machine (wall time counts the other jobs too)
    logs['wall_s'] = wall_before + time.time() - start
    logs['cpu_s'] = cpu_before + time.process_time() - cpu_start
    logs['it_per_s'] = config.steps / max(logs['wall_s'], 1e-9)
    if first:
        logs['resumed_at'] = first
    return logs


def _load_generator_checkpoint(path, owner: dict) -> dict:
    """Return a train_generator checkpoint made for ``owner``; else raise ConfigError."""
    fix = 'remove it to train the generator from the start'
    saved = load_checkpoint(Path(path), 'cpu', fix, keys=())  # weights only: never runs code
    if not isinstance(saved, dict) or saved.get('format') != GENERATOR_CHECKPOINT_FORMAT:
        raise ConfigError(f'{path}: not an OASIS generator checkpoint; {fix}')
    if saved.get('owner') != owner:
        mine, theirs = owner, saved.get('owner') or {}
        differ = sorted(k for k in set(mine['config']) | set(theirs.get('config', {}))
                        if mine['config'].get(k) != theirs.get('config', {}).get(k))
        what = (f'config fields {differ}' if differ else
                'seed' if mine['seed'] != theirs.get('seed') else
                'device' if mine['device'] != theirs.get('device') else 'source data')
        raise ConfigError(f'{path}: a generator checkpoint of another training run (its '
                          f'{what} differ); {fix}, or train with the same settings')
    return saved


def _split_transitions(data, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Return (train, held-out) transition indices, held out by whole trajectory."""
    _, _, starts, stops = trajectory_returns(data)
    rng = np.random.default_rng(seed + 1)
    held = rng.random(starts.size) < fraction
    if starts.size > 1 and not held.any():
        held[rng.integers(starts.size)] = True
    if held.all():
        held[0] = False
    mask = np.repeat(held, stops - starts)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def train_labeller(model: OASISModel, data: Dict[str, np.ndarray], config: OASISConfig,
                   device='cpu', seed: int = 0, progress: bool = False) -> Dict[str, float]:
    """Train the reward and cost labellers on held-in trajectories; return held-out errors."""
    lab = model.labeller
    rewards = np.asarray(data['rewards'], dtype=np.float32).reshape(-1)
    costs = np.asarray(data['costs'], dtype=np.float32).reshape(-1)
    binary = bool(np.isin(costs, (0.0, 1.0)).all())
    train_idx, held_idx = _split_transitions(data, config.holdout_fraction, seed)
    lab.reward_mean.fill_(float(rewards[train_idx].mean()))
    lab.reward_std.fill_(max(float(rewards[train_idx].std()), 1e-6))
    lab.binary_cost.fill_(binary)

    def tensors(idx):
        obs = model.normalize(torch.as_tensor(data['observations'][idx], device=device))
        nxt = model.normalize(torch.as_tensor(data['next_observations'][idx], device=device))
        act = torch.as_tensor(np.clip(data['actions'][idx], -1, 1), device=device)
        return obs.float(), act.float(), nxt.float()

    opt = adam(lab.parameters(), lr=config.label_lr)
    rng = np.random.default_rng(seed + 2)
    for _ in trange(config.label_steps, desc='oasis labellers', disable=not progress,
                    dynamic_ncols=True):
        idx = train_idx[rng.integers(train_idx.size, size=config.label_batch)]
        reward_pred, cost_pred = lab.heads(*tensors(idx))
        target_r = (torch.as_tensor(rewards[idx], device=device) - lab.reward_mean) \
            / lab.reward_std
        loss = reward_label_loss(reward_pred, target_r) + cost_label_loss(
            cost_pred, torch.as_tensor(costs[idx], device=device), binary)
        descend(opt, loss)
    return label_errors(model, data, held_idx, device)


@torch.no_grad()
def label_errors(model: OASISModel, data, idx: np.ndarray, device='cpu') -> Dict[str, float]:
    """Return the labels' error on transitions ``idx`` against the true rewards and costs."""
    if idx.size == 0:
        return {}
    rewards = np.asarray(data['rewards'], dtype=np.float32).reshape(-1)[idx]
    costs = np.asarray(data['costs'], dtype=np.float32).reshape(-1)[idx]
    preds_r, preds_c = [], []
    for chunk in np.array_split(idx, max(1, idx.size // 20_000)):
        obs = model.normalize(torch.as_tensor(data['observations'][chunk], device=device))
        nxt = model.normalize(torch.as_tensor(data['next_observations'][chunk], device=device))
        act = torch.as_tensor(np.clip(data['actions'][chunk], -1, 1), device=device)
        r, c = model.labeller(obs.float(), act.float(), nxt.float())
        preds_r.append(r.cpu().numpy())
        preds_c.append(c.cpu().numpy())
    pred_r, pred_c = np.concatenate(preds_r), np.concatenate(preds_c)
    return {'held_out_transitions': int(idx.size),
            'reward_mae': float(np.abs(pred_r - rewards).mean()),
            'reward_std': float(rewards.std()),
            'reward_mae_of_mean': float(np.abs(rewards - rewards.mean()).mean()),
            'cost_mae': float(np.abs(pred_c - costs).mean()),
            'cost_rate': float(costs.mean()),
            'cost_accuracy': float((np.round(pred_c) == np.round(costs)).mean())}


def fit(data: Dict[str, np.ndarray], config: OASISConfig, device='cpu', seed: int = 0,
        progress: bool = False, checkpoint: Optional[Path] = None) -> Tuple[OASISModel, dict]:
    """
    Train generator, inverse dynamics and labellers on raw DSRL arrays; return (model, info).

    ``checkpoint``: where the generator's training state is kept (and resumed from), see
    train_generator; the caller removes it once the trained generator is saved.
    """
    set_seed(seed)
    obs_dim = np.asarray(data['observations']).shape[1]
    act_dim = np.asarray(data['actions']).shape[1]
    sampler = WindowSampler(data, config.horizon, config.cost_sample_offset)
    model = OASISModel(obs_dim, act_dim, config).to(device)
    model.state_mean.copy_(torch.as_tensor(sampler.states.mean(axis=0)))
    model.state_std.copy_(torch.as_tensor(np.maximum(sampler.states.std(axis=0), 1e-3)))
    model.cost_max.fill_(sampler.cost_max)
    model.reward_max.fill_(sampler.reward_max)
    generator_logs = train_generator(model, sampler, config, device, seed, progress,
                                     checkpoint, {'source_sha256': arrays_sha256(data)})
    label_logs = train_labeller(model, data, config, device, seed, progress)
    info = {'generator': generator_logs, 'labels': label_logs,
            'trajectories_used': int(len(sampler.offsets)),
            'parameters': {'diffusion': _count(model.diffusion), 'inverse': _count(model.inverse),
                           'labeller': _count(model.labeller)}}
    return model.eval(), info


def _count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# --------------------------------------------------------------------------- generation

def start_states(data: Dict[str, np.ndarray], config: OASISConfig,
                 rng: np.random.Generator) -> np.ndarray:
    """
    Return config.num_starts start states [N, obs_dim] for generation (float32).

    'data' (the official code): uniform over every state of the data. 'training': the first
    states of windows drawn as the generator's training windows are (WindowSampler, trajectory
    weight max(cost_sample_offset - C, 0)), so that each pinned state lies in the part of the data
    the generator learnt from. A window of keep_states states cannot leave the region its first
    state is in, so on a tempting dataset the first choice sets most of the generated cost.
    """
    if config.start_states == 'training':
        sampler = WindowSampler(data, config.horizon, config.cost_sample_offset)
        return sampler.sample(config.num_starts, rng)[0][:, 0].astype(np.float32)
    obs_all = np.asarray(data['observations'], dtype=np.float32)
    return obs_all[rng.integers(len(obs_all), size=config.num_starts)]


@torch.no_grad()
def generate(model: OASISModel, data: Dict[str, np.ndarray], config: OASISConfig,
             conditions, seed: int = 0, progress: bool = False,
             device='cpu') -> Tuple[Dict[str, np.ndarray], List[dict]]:
    """
    Algorithm 1: num_starts start states x conditions; return (DSRL arrays, per-condition info).

    Each window is clipped to ``keep_states`` states (keep_states - 1 transitions, the last one
    flagged as a timeout so the file has episode boundaries), its actions come from the inverse
    dynamics and its rewards and costs from the labellers.
    """
    starts = start_states(data, config, np.random.default_rng(seed + 3))
    gen = torch.Generator(device=device).manual_seed(seed + 4)
    keep = config.keep_states
    parts = {k: [] for k in DSRL_KEYS}
    summary = []
    chunks = [(i, min(i + config.sample_batch, config.num_starts))
              for i in range(0, config.num_starts, config.sample_batch)]
    bar = tqdm(total=len(conditions) * config.num_starts, desc='oasis generate',
               disable=not progress, dynamic_ncols=True)
    for reward_target, cost_target in conditions:
        rewards_c, costs_c = [], []
        for a, b in chunks:
            s0 = model.normalize(torch.as_tensor(starts[a:b], device=device))
            pin = first_state_pin(s0, config.horizon) if config.pin_first_state else None
            cond = model.condition(reward_target, cost_target, b - a)
            x = model.diffusion.sample(cond, guidance=config.guidance,
                                       steps=config.denoise_steps, pin=pin, generator=gen)
            x = x[:, :keep]
            obs_n = x[:, :-1].reshape(-1, model.obs_dim)
            nxt_n = x[:, 1:].reshape(-1, model.obs_dim)
            act = model.inverse(obs_n, nxt_n).clamp(-1.0, 1.0)
            reward, cost = model.labeller(obs_n, act, nxt_n)
            states = model.unnormalize(x).cpu().numpy()
            parts['observations'].append(states[:, :-1].reshape(-1, model.obs_dim))
            parts['next_observations'].append(states[:, 1:].reshape(-1, model.obs_dim))
            parts['actions'].append(act.cpu().numpy())
            parts['rewards'].append(reward.cpu().numpy())
            parts['costs'].append(cost.cpu().numpy())
            ends = np.zeros((b - a, keep - 1), dtype=bool)
            ends[:, -1] = True
            parts['timeouts'].append(ends.reshape(-1))
            parts['terminals'].append(np.zeros((b - a) * (keep - 1), dtype=bool))
            rewards_c.append(reward.view(b - a, -1).cpu().numpy())
            costs_c.append(cost.view(b - a, -1).cpu().numpy())
            bar.update(b - a)
        r, c = np.concatenate(rewards_c), np.concatenate(costs_c)
        summary.append({'reward_condition': float(reward_target),
                        'cost_condition': float(cost_target),
                        'windows': int(r.shape[0]), 'transitions': int(r.size),
                        'reward_per_step': float(r.mean()), 'cost_per_step': float(c.mean()),
                        'reward_per_window': float(r.sum(axis=1).mean()),
                        'cost_per_window': float(c.sum(axis=1).mean())})
    bar.close()
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays['observations'] = arrays['observations'].astype(np.float32)
    arrays['next_observations'] = arrays['next_observations'].astype(np.float32)
    return arrays, summary


# --------------------------------------------------------------------------- saving

def save_generator(path, model: OASISModel, config: OASISConfig, task: str, source_sha256: str,
                   info: dict) -> None:
    """Write the trained generator, labellers, config and provenance (a torch file, atomically)."""
    write_checkpoint({'format': GENERATOR_FORMAT, 'task': task, 'config': asdict(config),
                      'obs_dim': model.obs_dim, 'act_dim': model.act_dim,
                      'source_sha256': source_sha256, 'info': info,
                      'state': model.state_dict()}, Path(path))


def load_generator(path, device='cpu') -> Tuple[OASISModel, OASISConfig, dict]:
    """Return (model, config, the saved record) of a file written by save_generator."""
    try:
        record = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:   # noqa: B902 - any unreadable file is the user's to replace
        raise ConfigError(f'{path}: not a readable OASIS generator ({type(error).__name__}); '
                          'remove it to train a new one') from None
    if not isinstance(record, dict) or record.get('format') != GENERATOR_FORMAT:
        raise ConfigError(f'{path}: not an OASIS generator file (format '
                          f'{record.get("format") if isinstance(record, dict) else None!r}); '
                          'remove it to train a new one')
    config = OASISConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in record['config'].items()})
    if config.conditions is not None:
        config.conditions = tuple(tuple(c) for c in config.conditions)
    model = OASISModel(record['obs_dim'], record['act_dim'], config).to(device)
    model.load_state_dict(record['state'])
    return model.eval(), config, record


# --------------------------------------------------------------------------- the data step

def default_conditions(data: Dict[str, np.ndarray], kappa: float) -> Tuple[Tuple[float, float],
                                                                           ...]:
    """
    Return three (reward, cost) conditions for a task without official ones.

    Costs kappa (0.5, 0.75, 1) like the official (10, 15, 20) at kappa = 20; each reward is the
    best reward return among the data's trajectories within that cost (the best overall if none).
    """
    rewards, costs, _, _ = trajectory_returns(data)
    conditions = []
    for fraction in (0.5, 0.75, 1.0):
        cost = kappa * fraction
        within = rewards[costs <= cost]
        conditions.append((float(within.max() if within.size else rewards.max()), cost))
    return tuple(conditions)


def reshape(data: Dict[str, np.ndarray], task, config: OASISConfig, source: dict,
            model: Optional[OASISModel] = None, fit_info: Optional[dict] = None,
            mode: str = 'replace', device='cpu', seed: int = 0,
            progress: bool = False) -> Tuple[Dict[str, np.ndarray], dict, dict]:
    """
    Run OASIS's data step on raw DSRL arrays; return (arrays, file attributes, report).

    ``source`` = {'path', 'sha256'} of the raw data. Without ``model`` the generator and the
    labellers are trained first (``fit``). ``mode`` 'replace' (OASIS) writes only generated
    transitions, 'mix' appends them to the raw ones. The attributes mark the file as generated.
    """
    spec = get_task(task)
    if mode not in ('replace', 'mix'):
        raise ConfigError(f"unknown OASIS mode {mode!r}; use 'replace' or 'mix'")
    config = resolve_generator_config(config, spec)
    conditions = config.conditions or default_conditions(data, config.kappa)
    too_costly = [c for _, c in conditions if c > config.kappa]
    if too_costly:
        raise ConfigError(f'OASIS conditions ask for cost returns {too_costly} above kappa = '
                          f'{config.kappa:g}; give conditions with cost <= kappa')
    if model is None:
        model, fit_info = fit(data, config, device, seed, progress)
    start = time.time()
    arrays, summary = generate(model, data, config, conditions, seed, progress, device)
    generation_s = time.time() - start
    generated = int(len(arrays['observations']))
    if mode == 'mix':
        arrays = {k: np.concatenate([np.asarray(data[k]).reshape(
            (-1,) + np.asarray(arrays[k]).shape[1:]).astype(arrays[k].dtype), arrays[k]])
            for k in DSRL_KEYS}
    report = {'conditions': summary, 'generation_s': round(generation_s, 2),
              'generated_transitions': generated, 'fit': fit_info or {},
              'horizon': spec.horizon}
    attrs = {'generated': True, 'generator': NAME, 'source': str(source.get('path')),
             'source_sha256': str(source.get('sha256')), 'mode': mode,
             'kappa': float(config.kappa), 'generated_transitions': generated,
             'raw_transitions': int(len(data['observations'])) if mode == 'mix' else 0,
             'conditions': [{'reward': float(r), 'cost': float(c)} for r, c in conditions],
             'model': {'config': asdict(config),
                       'parameters': (fit_info or {}).get('parameters'),
                       'labels_held_out': (fit_info or {}).get('labels'),
                       'generator_steps': config.steps, 'seed': seed}}
    return arrays, attrs, report
