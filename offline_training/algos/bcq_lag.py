"""
BCQ-Lag: batch-constrained Q-learning with a PID Lagrangian on a cost critic (OSRL's BCQL).

Components (OSRL ``osrl/algorithms/bcql.py`` and ``osrl/common/net.py``):
- a conditional VAE of the behaviour policy (hidden 400, latent 2 |A|), loss = recon + beta KL;
- a perturbation actor a' = clip(a + phi * tanh(MLP(s, a)), -1, 1) with phi = 0.05;
- reward and cost critics, each two groups of num_q heads (q1 = min of group 1, q2 = min of
  group 2); targets use lambda min(q1, q2) + (1 - lambda) max(q1, q2) over 10 perturbed VAE
  samples of s', maximised over the samples (lambda = 0.75);
- the actor maximises min(q1, q2) of the reward critic minus multiplier * (Q_c - qc_thres), with
  the multiplier from a PID controller (0.1, 0.003, 0.001) on mean(Q_c) - qc_thres and
  qc_thres = kappa (1 - gamma^L) / (1 - gamma) / L.

``train_bcq_lag(data, config, ...)`` trains from any dataset dict, so other methods (OASIS) can
reuse it as their downstream learner.
"""

from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import numpy as np
from offline_training.algos.batching import clip_actions, ReplayBuffer
from offline_training.algos.infrastructure import adam, config_from_preset, descend, set_seed
from offline_training.algos.networks import mlp, QEnsemble, soft_update
from offline_training.algos.protocol import batch_shape, ExportedMethod, ExportPlan, GraphSpec
import torch
from torch import nn
import torch.nn.functional as F
from tqdm import trange

NAME = 'bcq_lag'


@dataclass
class BCQLagConfig:
    """BCQ-Lag hyperparameters; defaults are OSRL's bcql_configs.py."""

    steps: int = 100_000
    batch_size: int = 512
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    vae_lr: float = 1e-3
    actor_hidden: Tuple[int, ...] = (256, 256)
    critic_hidden: Tuple[int, ...] = (256, 256)
    vae_hidden: int = 400
    sample_action_num: int = 10
    gamma: float = 0.99
    tau: float = 0.005
    phi: float = 0.05
    lmbda: float = 0.75
    beta: float = 0.5                  # weight of the VAE's KL term
    pid: Tuple[float, float, float] = (0.1, 0.003, 0.001)
    num_q: int = 2                     # heads per group: 2 groups x 2 = 4 reward Q networks
    num_qc: int = 2
    cost_limit: float = 10.0           # kappa (episodic cost budget)
    episode_len: Optional[int] = None  # L; resolved from the task horizon
    reward_scale: float = 0.1
    cost_scale: float = 1.0

    def __post_init__(self):
        self.actor_hidden = tuple(int(h) for h in self.actor_hidden)
        self.critic_hidden = tuple(int(h) for h in self.critic_hidden)
        self.pid = tuple(float(k) for k in self.pid)

    @property
    def qc_threshold(self) -> float:
        """Return the per-step Q_c threshold kappa (1 - gamma^L) / (1 - gamma) / L (OSRL)."""
        if self.episode_len is None:
            raise ValueError('BCQLagConfig.episode_len is unset; call resolve_config(config, '
                             'task) or pass episode_len')
        length = self.episode_len
        return self.cost_limit * (1 - self.gamma ** length) / (1 - self.gamma) / length


# 'cpu' halves the batch and the network widths and the steps: each iteration scores 10 sampled
# next actions with 4 + 4 critic heads, which dominates the cost on 2 cores (docs/algorithms.md).
# 'test' is 'cpu' with tiny networks (tests, test bundles).
PRESETS: Dict[str, dict] = {
    'paper': {},
    'cpu': {'steps': 50_000, 'batch_size': 256, 'actor_hidden': (128, 128),
            'critic_hidden': (128, 128), 'vae_hidden': 200},
}
PRESETS['test'] = {**PRESETS['cpu'], 'steps': 30, 'batch_size': 64, 'actor_hidden': (32, 32),
                   'critic_hidden': (32, 32), 'vae_hidden': 32}
CONFIG = BCQLagConfig


def make_config(preset: str = 'paper', **overrides) -> BCQLagConfig:
    """Return the config of a named preset with ``overrides`` applied."""
    return config_from_preset(BCQLagConfig, PRESETS, preset, overrides, 'BCQ-Lag')


def resolve_config(config: BCQLagConfig, task) -> BCQLagConfig:
    """Fill in the episode length L from the task horizon (OSRL's per-task episode_len)."""
    if config.episode_len is None:
        config = replace(config, episode_len=int(task.horizon))
    return config


# --------------------------------------------------------------------------- pieces

class VAE(nn.Module):
    """Conditional VAE of the behaviour policy (BCQ/OSRL); the decoder outputs tanh actions."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = mlp([obs_dim + act_dim, hidden, hidden], nn.ReLU, nn.ReLU)
        self.mean = nn.Linear(hidden, latent_dim)
        self.log_std = nn.Linear(hidden, latent_dim)
        self.decoder = mlp([obs_dim + latent_dim, hidden, hidden, act_dim], nn.ReLU, nn.Tanh)

    def forward(self, obs: torch.Tensor, act: torch.Tensor):
        """Return (reconstruction, mean, std) of the encoded action."""
        hidden = self.encoder(torch.cat([obs, act], dim=-1))
        mean = self.mean(hidden)
        std = self.log_std(hidden).clamp(-4, 15).exp()  # clamped for numerical stability
        z = mean + std * torch.randn_like(std)
        return self.decode(obs, z), mean, std

    def sample_latent(self, batch: int, device) -> torch.Tensor:
        """Draw BCQ's decoder latent: N(0, 1) clipped to [-0.5, 0.5]."""
        return torch.randn(batch, self.latent_dim, device=device).clamp(-0.5, 0.5)

    def decode(self, obs: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode an action for ``obs``; z is drawn with sample_latent when not given."""
        if z is None:
            z = self.sample_latent(obs.shape[0], obs.device)
        return self.decoder(torch.cat([obs, z], dim=-1))


class PerturbationActor(nn.Module):
    """a' = clip(a + phi * tanh(MLP(s, a)), -1, 1): a small correction of a VAE action."""

    def __init__(self, obs_dim: int, act_dim: int, hidden, phi: float):
        super().__init__()
        self.net = mlp([obs_dim + act_dim, *hidden, act_dim], nn.Tanh, nn.Tanh)
        self.phi = phi

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return (act + self.phi * self.net(torch.cat([obs, act], dim=-1))).clamp(-1.0, 1.0)


class PIDLagrangian:
    """
    OSRL's PID Lagrangian multiplier on the mean constraint violation.

    error = mean(Q_c) - threshold; integral = relu(integral + error); derivative =
    relu(error - previous error); multiplier = relu(KP relu(error) + KI integral + KD derivative).
    """

    def __init__(self, kp: float, ki: float, kd: float, threshold: float):
        self.kp, self.ki, self.kd, self.threshold = kp, ki, kd, threshold
        self.error_old = 0.0
        self.error_integral = 0.0

    def control(self, qc: torch.Tensor) -> torch.Tensor:
        """Update the controller with a batch of Q_c values; return the multiplier (scalar)."""
        error = (qc - self.threshold).mean().detach()
        derivative = F.relu(error - self.error_old)
        self.error_integral = F.relu(self.error_integral + error)
        self.error_old = error
        return F.relu(self.kp * F.relu(error) + self.ki * self.error_integral
                      + self.kd * derivative)

    def state_dict(self) -> dict:
        """Return the controller memory."""
        return {'error_old': torch.as_tensor(self.error_old).cpu(),
                'error_integral': torch.as_tensor(self.error_integral).cpu()}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore the controller memory."""
        self.error_old = state['error_old'].to(device)
        self.error_integral = state['error_integral'].to(device)


def vae_loss(recon: torch.Tensor, actions: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Return the VAE loss MSE(recon, a) + beta * KL(N(mean, std) || N(0, 1)) (OSRL's form)."""
    recon_loss = (recon - actions).pow(2).mean()
    kl = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
    return recon_loss + beta * kl


def double_q_min(heads: torch.Tensor, num_q: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split [2 num_q, B] heads into the two groups; return (q1, q2) = per-group minima."""
    return heads[:num_q].min(dim=0).values, heads[num_q:].min(dim=0).values


def soft_clipped_target(q1: torch.Tensor, q2: torch.Tensor, lmbda: float,
                        batch: int) -> torch.Tensor:
    """
    Return BCQ's target value: lambda min + (1 - lambda) max, max over the sampled actions.

    q1, q2: [batch * n] for n sampled next actions per state (repeat_interleave order).
    """
    q = lmbda * torch.minimum(q1, q2) + (1.0 - lmbda) * torch.maximum(q1, q2)
    return q.reshape(batch, -1).max(dim=1).values


def critic_loss(heads: torch.Tensor, backup: torch.Tensor) -> torch.Tensor:
    """Return the sum over heads of the mean squared TD error (OSRL's loss over both groups)."""
    return (heads - backup.unsqueeze(0)).pow(2).mean(dim=1).sum()


def lagrangian_actor_loss(q_pi: torch.Tensor, qc_pi: torch.Tensor, multiplier: torch.Tensor,
                          threshold: float) -> torch.Tensor:
    """Return -mean(Q_r) + mean(multiplier * (Q_c - threshold)) (OSRL BCQL actor)."""
    return -q_pi.mean() + ((qc_pi - threshold) * multiplier).mean()


# --------------------------------------------------------------------------- model

class BCQLagModel(nn.Module):
    """Networks of BCQ-Lag: VAE, actor (+ target), reward and cost critics (+ targets)."""

    def __init__(self, obs_dim: int, act_dim: int, config: BCQLagConfig):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.num_q, self.num_qc = config.num_q, config.num_qc
        self.vae = VAE(obs_dim, act_dim, config.vae_hidden, 2 * act_dim)
        self.actor = PerturbationActor(obs_dim, act_dim, config.actor_hidden, config.phi)
        self.critic = QEnsemble(obs_dim, act_dim, config.critic_hidden, 2 * config.num_q,
                                init='torch')
        self.cost_critic = QEnsemble(obs_dim, act_dim, config.critic_hidden, 2 * config.num_qc,
                                     init='torch')
        self.actor_target = deepcopy(self.actor)
        self.critic_target = deepcopy(self.critic)
        self.cost_critic_target = deepcopy(self.cost_critic)
        for frozen in (self.actor_target, self.critic_target, self.cost_critic_target):
            frozen.requires_grad_(False)
        self.register_buffer('cost_threshold_buf', torch.tensor(float(config.qc_threshold)))

    @property
    def cost_threshold(self) -> float:
        """Return qc_thres, the per-step Q_c budget of the Lagrangian."""
        return float(self.cost_threshold_buf)

    def act(self, obs: torch.Tensor, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return the action [B, A]; the VAE latent defaults to zero (deterministic)."""
        if latent is None:
            latent = torch.zeros(obs.shape[0], self.vae.latent_dim, device=obs.device,
                                 dtype=obs.dtype)
        return self.actor(obs, self.vae.decode(obs, latent))

    def act_stochastic(self, obs: torch.Tensor) -> torch.Tensor:
        """Return OSRL's evaluation action: one clipped-normal VAE latent, then the actor."""
        return self.actor(obs, self.vae.decode(obs))

    def cost_q(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return Q_c(s, a) = min(q1, q2) of the cost critic, the actor's constraint value."""
        q1, q2 = double_q_min(self.cost_critic(obs, act), self.num_qc)
        return torch.minimum(q1, q2)

    def reward_q(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return Q_r(s, a) = min(q1, q2) of the reward critic."""
        q1, q2 = double_q_min(self.critic(obs, act), self.num_q)
        return torch.minimum(q1, q2)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.act(observation)

    def export_modules(self) -> Dict[str, nn.Module]:
        """Return the modules the ONNX export traces: policy(obs) and critic(obs, act) -> q_c."""
        return {'policy': ExportedMethod(self, 'act'), 'critic': ExportedMethod(self, 'cost_q')}


def build_model(obs_dim: int, act_dim: int, config: BCQLagConfig) -> BCQLagModel:
    """Return a freshly initialised BCQLagModel."""
    return BCQLagModel(obs_dim, act_dim, config)


def prepare_arrays(data: Dict[str, np.ndarray], config: BCQLagConfig) -> Dict[str, np.ndarray]:
    """Return the arrays BCQ-Lag trains on: scaled rewards/costs, done = terminal or timeout."""
    done = (np.asarray(data['terminals']).reshape(-1) > 0) | \
        (np.asarray(data['timeouts']).reshape(-1) > 0)
    return {
        'obs': np.asarray(data['observations'], dtype=np.float32),
        'act': clip_actions(data['actions'], 1.0),
        'reward': np.asarray(data['rewards'], dtype=np.float32).reshape(-1) * config.reward_scale,
        'cost': np.asarray(data['costs'], dtype=np.float32).reshape(-1) * config.cost_scale,
        'next_obs': np.asarray(data['next_observations'], dtype=np.float32),
        'done': done.astype(np.float32),
    }


class BCQLagTrainer:
    """OSRL's train_one_step: VAE, reward critic, cost critic, actor, then target sync."""

    def __init__(self, model: BCQLagModel, config: BCQLagConfig):
        self.model, self.config = model, config
        self.vae_opt = adam(model.vae.parameters(), lr=config.vae_lr)
        self.critic_opt = adam(model.critic.parameters(), lr=config.critic_lr)
        self.cost_critic_opt = adam(model.cost_critic.parameters(), lr=config.critic_lr)
        self.actor_opt = adam(model.actor.parameters(), lr=config.actor_lr)
        self.pid = PIDLagrangian(*config.pid, threshold=config.qc_threshold)

    def _next_value(self, target: nn.Module, next_obs: torch.Tensor, num: int) -> torch.Tensor:
        """Value of s' under BCQ: best of sample_action_num perturbed VAE actions."""
        m, c = self.model, self.config
        obs_rep = torch.repeat_interleave(next_obs, c.sample_action_num, dim=0)
        act_rep = m.actor_target(obs_rep, m.vae.decode(obs_rep))
        q1, q2 = double_q_min(target(obs_rep, act_rep), num)
        return soft_clipped_target(q1, q2, c.lmbda, next_obs.shape[0])

    def update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """One iteration on a batch of batch_size transitions."""
        m, c = self.model, self.config
        b = buffer.sample(c.batch_size)
        obs, act = b['obs'], b['act']

        recon, mean, std = m.vae(obs, act)
        loss_vae = vae_loss(recon, act, mean, std, c.beta)
        descend(self.vae_opt, loss_vae)

        with torch.no_grad():
            backup = b['reward'] + c.gamma * (1 - b['done']) * self._next_value(
                m.critic_target, b['next_obs'], m.num_q)
        loss_critic = critic_loss(m.critic(obs, act), backup)
        descend(self.critic_opt, loss_critic)

        with torch.no_grad():
            # OSRL bootstraps the cost critic without the done mask.
            cost_backup = b['cost'] + c.gamma * self._next_value(
                m.cost_critic_target, b['next_obs'], m.num_qc)
        loss_cost = critic_loss(m.cost_critic(obs, act), cost_backup)
        descend(self.cost_critic_opt, loss_cost)

        for net in (m.critic, m.cost_critic):
            net.requires_grad_(False)
        with torch.no_grad():
            base = m.vae.decode(obs)
        pi = m.actor(obs, base)
        q_pi, qc_pi = m.reward_q(obs, pi), m.cost_q(obs, pi)
        multiplier = self.pid.control(qc_pi)
        loss_actor = lagrangian_actor_loss(q_pi, qc_pi, multiplier, self.pid.threshold)
        descend(self.actor_opt, loss_actor)
        for net in (m.critic, m.cost_critic):
            net.requires_grad_(True)

        soft_update(m.critic_target, m.critic, c.tau)
        soft_update(m.cost_critic_target, m.cost_critic, c.tau)
        soft_update(m.actor_target, m.actor, c.tau)
        return {'loss/vae': loss_vae.detach(), 'loss/critic': loss_critic.detach(),
                'loss/cost_critic': loss_cost.detach(), 'loss/actor': loss_actor.detach(),
                'lagrangian/multiplier': multiplier.detach(),
                'value/qc_pi': qc_pi.detach().mean()}

    def state_dict(self) -> dict:
        """Return optimiser and PID states."""
        return {'vae_opt': self.vae_opt.state_dict(), 'critic_opt': self.critic_opt.state_dict(),
                'cost_critic_opt': self.cost_critic_opt.state_dict(),
                'actor_opt': self.actor_opt.state_dict(), 'pid': self.pid.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the states saved by state_dict()."""
        for name in ('vae_opt', 'critic_opt', 'cost_critic_opt', 'actor_opt'):
            getattr(self, name).load_state_dict(state[name])
        device = next(self.model.parameters()).device
        self.pid.load_state_dict(state['pid'], device)


def make_trainer(model: BCQLagModel, config: BCQLagConfig) -> BCQLagTrainer:
    """Return the trainer of ``model``."""
    return BCQLagTrainer(model, config)


def export_plan(model: BCQLagModel, config: BCQLagConfig) -> ExportPlan:
    """
    Return BCQ-Lag's graphs: deterministic policy (VAE latent 0) and the cost critic Q_c.

    The critic's budget is the per-step Q_c threshold the Lagrangian trained against,
    kappa (1 - gamma^L) / ((1 - gamma) L), so ``Q_c(s, a) <= budget`` is the monitor's test.
    """
    modules = model.export_modules()
    graphs = {
        'policy': GraphSpec(modules['policy'], {'observation': batch_shape(model.obs_dim)},
                            {'action': batch_shape(model.act_dim)}),
        'critic': GraphSpec(modules['critic'],
                            {'observation': batch_shape(model.obs_dim),
                             'action': batch_shape(model.act_dim)},
                            {'q_c': batch_shape()}),
    }
    extra = {'policy': 'a = actor(s, vae.decode(s, z = 0)) (deterministic VAE latent)',
             'cost_limit': float(config.cost_limit)}
    return ExportPlan(NAME, graphs, {'kind': 'cost', 'budget': model.cost_threshold},
                      extra=extra)


def train_bcq_lag(data: Dict[str, np.ndarray], config: BCQLagConfig, device='cpu',
                  seed: int = 0, progress: bool = False) -> BCQLagModel:
    """
    Train BCQ-Lag on any DSRL-format dataset dict and return the model (for reuse, e.g. OASIS).

    ``config.episode_len`` must be set (or use resolve_config with a task). No files are written;
    use saferl-train for runs with checkpoints and logs.
    """
    set_seed(seed)
    buffer = ReplayBuffer(prepare_arrays(data, config), device, seed=seed)
    obs_dim, act_dim = buffer.data['obs'].shape[1], buffer.data['act'].shape[1]
    model = build_model(obs_dim, act_dim, config).to(device)
    trainer = make_trainer(model, config)
    for _ in trange(config.steps, desc='bcq_lag', disable=not progress):
        trainer.update(buffer)
    return model.eval()
