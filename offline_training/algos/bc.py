"""
Behaviour cloning baselines of OSRL: BC-All (every transition) and BC-Safe (safe episodes).

BC-Safe keeps only the trajectories whose undiscounted cost return is <= kappa (OSRL's
``bc_mode='safe'`` with gamma = 1). The policy is a deterministic tanh MLP trained by mean squared
error, with OSRL's defaults (hidden 256x256, lr 1e-3, batch 512, 100k steps).
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
from offline_training.algos.batching import clip_actions, ReplayBuffer
from offline_training.algos.infrastructure import adam, config_from_preset, descend
from offline_training.algos.networks import mlp
from offline_training.algos.protocol import batch_shape, ExportPlan, GraphSpec
from offline_training.data.trajectories import trajectory_returns
from saferl_ros.errors import ConfigError
import torch
from torch import nn

NAME = 'bc'
MODES = ('all', 'safe')


@dataclass
class BCConfig:
    """BC hyperparameters; defaults are OSRL's bc_configs.py."""

    mode: str = 'all'                # 'all' (BC-All) or 'safe' (BC-Safe)
    cost_limit: float = 10.0         # kappa: BC-Safe keeps episodes with cost return <= kappa
    steps: int = 100_000
    batch_size: int = 512
    actor_lr: float = 1e-3
    hidden: Tuple[int, ...] = (256, 256)

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.mode not in MODES:
            raise ConfigError(f'unknown BC mode {self.mode!r}; use one of {MODES}')


CONFIG = BCConfig

# BC is cheap: the OSRL defaults already run at a useful rate on 2 cores, so 'cpu' only halves
# the batch (see docs/algorithms.md). 'test': tiny networks, and BC-Safe keeps every episode of
# the small synthetic datasets tests train on.
PRESETS: Dict[str, dict] = {
    'paper': {},
    'cpu': {'batch_size': 256},
    'test': {'steps': 30, 'batch_size': 64, 'hidden': (32, 32), 'cost_limit': 1e9},
}


def make_config(preset: str = 'paper', **overrides) -> BCConfig:
    """Return the config of a named preset with ``overrides`` applied."""
    return config_from_preset(BCConfig, PRESETS, preset, overrides, 'BC')


def resolve_config(config: BCConfig, task) -> BCConfig:
    """Return ``config`` unchanged (BC has no task-dependent values)."""
    return config


def reads_costs(config: BCConfig) -> bool:
    """Return whether training reads cost labels: BC-Safe does (to keep safe episodes)."""
    return config.mode == 'safe'


def bc_loss(pred: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Return the behaviour-cloning loss: mean squared error (OSRL BC)."""
    return (pred - actions).pow(2).mean()


def safe_transition_mask(data: Dict[str, np.ndarray], cost_limit: float) -> np.ndarray:
    """Return a boolean mask of transitions in trajectories with cost return <= cost_limit."""
    _, cost_returns, starts, stops = trajectory_returns(data)
    keep = cost_returns <= cost_limit
    mask = np.zeros(len(data['observations']), dtype=bool)
    for start, stop in zip(starts[keep], stops[keep]):
        mask[start:stop] = True
    return mask


def prepare_arrays(data: Dict[str, np.ndarray], config: BCConfig) -> Dict[str, np.ndarray]:
    """Return the (observation, action) pairs BC trains on; BC-Safe filters episodes first."""
    obs = np.asarray(data['observations'], dtype=np.float32)
    act = clip_actions(data['actions'], 1.0)
    if config.mode == 'safe':
        keep = safe_transition_mask(data, config.cost_limit)
        if not keep.any():
            _, cost_returns, _, _ = trajectory_returns(data)
            raise ConfigError(f'BC-Safe: no trajectory has cost return <= {config.cost_limit} '
                              f'(smallest is {cost_returns.min():.1f}); raise cost_limit')
        obs, act = obs[keep], act[keep]
    return {'obs': obs, 'act': act}


class BCModel(nn.Module):
    """Deterministic policy a = tanh(MLP(s)) in [-1, 1] (OSRL's MLPActor)."""

    def __init__(self, obs_dim: int, act_dim: int, config: BCConfig):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.actor = mlp([obs_dim, *config.hidden, act_dim], nn.ReLU, nn.Tanh)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Return the action [B, act_dim]."""
        return self.actor(obs)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.act(observation)

    def export_modules(self) -> Dict[str, nn.Module]:
        """Return the modules the ONNX export traces (policy only; BC has no critic)."""
        return {'policy': self}


def build_model(obs_dim: int, act_dim: int, config: BCConfig) -> BCModel:
    """Return a freshly initialised BCModel."""
    return BCModel(obs_dim, act_dim, config)


class BCTrainer:
    """Adam on the MSE loss."""

    def __init__(self, model: BCModel, config: BCConfig):
        self.model, self.config = model, config
        self.opt = adam(model.actor.parameters(), lr=config.actor_lr)

    def update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """One gradient step on a batch."""
        batch = buffer.sample(self.config.batch_size)
        loss = bc_loss(self.model.act(batch['obs']), batch['act'])
        descend(self.opt, loss)
        return {'loss/bc': loss.detach()}

    def state_dict(self) -> dict:
        """Return the optimiser state."""
        return {'opt': self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimiser state."""
        self.opt.load_state_dict(state['opt'])


def make_trainer(model: BCModel, config: BCConfig) -> BCTrainer:
    """Return the trainer of ``model``."""
    return BCTrainer(model, config)


def export_plan(model: BCModel, config: BCConfig) -> ExportPlan:
    """Return BC's graph: the deterministic policy only (critic kind ``none``, no fallback)."""
    graphs = {'policy': GraphSpec(model.export_modules()['policy'],
                                  {'observation': batch_shape(model.obs_dim)},
                                  {'action': batch_shape(model.act_dim)})}
    extra = {'mode': config.mode}
    if config.mode == 'safe':
        extra['cost_limit'] = float(config.cost_limit)
    return ExportPlan(f'bc_{config.mode}', graphs, {'kind': 'none'}, extra=extra)
