"""
DRCORL: a diffusion-regularised policy for constrained offline RL.

Guo, Zheng, Ying, Jin, Gu, Spanos and Lavaei, "Don't Trade Off Safety: Diffusion Regularization
for Constrained Offline RL" (arXiv 2502.12391, NeurIPS 2025). The paper's display equations are
referred to by number; where its text lost them, the form used here is the reconstruction that
docs/algorithms.md ("DRCORL") states together with every difference from the official code.

Training has four stages, one trainer iteration updating the stage it is in:

1. behaviour model: an epsilon-prediction diffusion model of (s, a) on the continuous VP
   schedule (Eq. 5), FISOR's LayerNorm-ResNet noise network family; frozen afterwards;
2. critics: IQL reward critics, twin Q_r and V_r (Eqs. 16-17), and an ensemble of N cost
   critics Q_c^i trained by pessimistic TD on the dataset's next actions (Eq. 18);
3. warm start: the policy, a deterministic tanh MLP (the Dirac limit of the paper's
   constant-variance Gaussian), follows the diffusion score alone (the reverse KL, Eqs. 6-9);
4. safe adaptation (Algorithm 2): each iteration updates the critics by TD with a' = pi(s')
   (after ``critic_settle_steps`` critic-only iterations that let them evaluate the warm-started
   policy instead of the behaviour policy; 0 in the presets), estimates the policy's normalised
   episode cost offline from the ensemble's upper confidence bound (Sec. 4.2, App. B.3) and
   takes the reward step (Eqs. 19, 21), the cost step (Eqs. 20, 21) or their
   gradient-manipulation combination (Eq. 12), with the slacks h-/h+ and the temperature beta
   on linear schedules (App. C.1).

Deployment runs the policy MLP alone. The bundle's cost critic returns the ensemble's mean and
standard deviation of Q_c, and the monitor's ``cost_ucb`` rule passes an action while
mean + k std stays within the budget that kappa gives (saferl_ros.monitor.CostUCBRule).
"""

from copy import deepcopy
from dataclasses import dataclass, replace
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from offline_training.algos.batching import clip_actions, ReplayBuffer
from offline_training.algos.critics import reward_target, reward_value_loss
from offline_training.algos.diffusion import EpsilonNet
from offline_training.algos.infrastructure import adam, config_from_preset, descend
from offline_training.algos.networks import mlp, QEnsemble, soft_update, ValueNet
from offline_training.algos.protocol import batch_shape, ExportedMethod, ExportPlan, GraphSpec
from offline_training.data.trajectories import episode_spans
from saferl_ros.errors import ConfigError
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

NAME = 'drcorl'
STAGES = ('behavior', 'critics', 'warmstart', 'adaptation')
# 'linear': the paper's 0.04 -> 1.0 (App. C.1); 'sqrt': the official code's 0.01 sqrt(epoch);
# 'constant': temperature_start throughout (the paper's constant ablation).
TEMPERATURE_SCHEDULES = ('linear', 'sqrt', 'constant')
# Branch codes in the logs: Algorithm 2's three cases.
BRANCHES = {'reward': 0, 'both': 1, 'cost': 2}
# Where the adaptation rule's normalised cost estimate C_hat comes from. 'offline' (the paper,
# App. B.3): (1 - gamma) T mean Q_c^UCB(s, pi(s)) over the batch / kappa. 'rollout' (the official
# code, through an early `return` in its evaluate_cost): the cost of one simulator episode of the
# current policy per iteration / kappa; online interaction, labelled so in the results.
COST_ESTIMATES = ('offline', 'rollout')
# The states the offline estimate averages over. 'batch' (the paper, App. B.3): the training
# batch's, "assuming the dataset state distribution is close to the target distribution".
# 'initial': every episode's first state in the dataset, so that the mean is the policy's own
# discounted cost E_{s0} V_c(s0), whatever share of the data lies where the policy never goes.
# (1 - gamma) T V_c(s0) equals the episode cost only for costs spread evenly in time: a cost in
# the first steps counts up to (1 - gamma) T (3x at T = 300), one near the end of a 300-step
# episode about 0.15x, so late violations are under-counted (docs/algorithms.md "DRCORL").
ESTIMATE_STATES = ('batch', 'initial')
# The critic-only settling iterations log C_hat every this many iterations and at their last (the
# estimate over every initial state costs about as much as a critic update; the training loop
# logs every --log-every iterations, 500 in the grids).
SETTLE_ESTIMATE_EVERY = 500
# Seed of the 'rollout' estimate's episodes (episode_seed(ROLLOUT_SEED, iteration)): apart from
# evaluation's seed 0, so training never sees the start states the results are measured on.
ROLLOUT_SEED = 9
# Fields read only by the adaptation stage (stage 4): a run branched from the checkpoint kept at
# the end of stage 3 (saferl-train --init-from) may change them, e.g. to compare rules.
ADAPTATION_FIELDS = frozenset({'adaptation_steps', 'critic_settle_steps', 'estimate_states',
                               'temperature_schedule', 'temperature_start',
                               'temperature_end', 'slack_start', 'slack_decay', 'ucb_k',
                               'cost_estimate', 'task'})


@dataclass
class DrcorlConfig:
    """DRCORL hyperparameters; defaults: the paper's (Table 2, App. C.1), else the code's."""

    # --- stages: one trainer iteration updates one stage; the adaptation stage gets the rest
    behavior_steps: int = 2_000_000     # stage 1, behaviour model (code: 200 epochs x 10k)
    critic_steps: int = 500_000         # stage 2, critic pretraining (code loads ckpt 50 = 500k)
    warmstart_steps: int = 50_000       # stage 3, KL-only policy steps (code: 50 epochs x 1000)
    adaptation_steps: int = 2_000       # stage 4, safe adaptation (Table 2: 2050 = 50 + 2000)
    # Stage 4 begins with this many critic-only TD iterations (a' = pi(s'), no policy step), so
    # that the cost estimate reads Q_c of the warm-started policy, not the behaviour policy's Q_c
    # that pretraining leaves (2000 adaptation iterations are too few for the critics to move
    # there while the policy changes). Counted inside the adaptation stage's iterations (the
    # default total adds them to the four stages); the slack and temperature schedules run over
    # the policy iterations that follow. Not in the paper (its estimate is offline, its code's
    # online): docs/algorithms.md "DRCORL".
    critic_settle_steps: int = 0
    steps: Optional[int] = None         # total iterations; None: the sum of the four stages
    # --- behaviour model (Eq. 5): the official ScoreNet_IDQL, FISOR's network family
    behavior_batch_size: int = 2048
    behavior_lr: float = 3e-4
    behavior_weight_decay: float = 0.01  # AdamW; the code uses torch's default
    behavior_hidden: int = 256
    behavior_blocks: int = 3
    behavior_dropout: float = 0.1
    time_dim: int = 64                  # Fourier features of the continuous time t
    time_scale: float = 30.0            # their frequency scale (code: Gaussian Fourier, scale 30)
    cond_hidden: Tuple[int, ...] = (128, 128)
    beta_min: float = 0.1               # VP schedule beta(t) in [0.1, 20]
    beta_max: float = 20.0
    behavior_t_min: float = 1e-3        # t ~ U(1e-3, 1) when training the behaviour model
    # --- critics (Eqs. 16-18)
    critic_batch_size: int = 256        # Table 2 batch size
    critic_hidden: Tuple[int, ...] = (256, 256)
    critic_lr: float = 6e-4             # Table 2 (official Bullet-task scripts: 3e-4)
    gamma: float = 0.99
    expectile: float = 0.7              # IQL tau of V_r (code: 0.7)
    critic_tau: float = 0.005           # Polyak rate of the target critics
    num_reward_heads: int = 2           # IQL's twin Q_r
    cost_ensemble: int = 4              # N cost critics (Table 2)
    ucb_k: float = 2.0                  # Q_c^UCB = mean + k std (Table 2, code default)
    # Eq. 18's positive pessimism parameter (its form is lost): the TD target takes
    # lambda max_i + (1 - lambda) min_i over the target ensemble at (s', a').
    cost_pessimism: float = 0.75
    normalize_rewards: bool = True      # r <- r * 1000 / (R_max - R_min) (official code)
    reward_scale: Optional[float] = None  # resolved from the task when normalize_rewards
    # --- policy extraction (Eqs. 10-12, 19-21, Algorithm 2)
    policy_hidden: Tuple[int, ...] = (256, 256)  # Table 2 actor architecture
    policy_lr: float = 6e-4             # Table 2 (official Bullet-task scripts: 1e-4)
    policy_batch_size: int = 256
    score_t_min: float = 0.02           # t ~ U(0.02, 0.98) in the score regulariser (code)
    score_t_max: float = 0.98
    # Eq. 21 subtracts the injected noise from the score, (eps_phi - eps); the code does not.
    score_baseline: bool = True
    temperature_schedule: str = 'linear'
    temperature_start: float = 0.04     # beta at the first adaptation iteration (App. C.1) ...
    temperature_end: float = 1.0        # ... rising linearly to this at the last
    slack_start: float = 0.2            # h- = h+ at the first adaptation iteration ...
    slack_decay: bool = True            # ... decaying linearly to 0 (code: constant 0.5)
    cost_limit: float = 10.0            # kappa, the episode cost budget
    episode_len: Optional[int] = None   # T of the cost estimate; resolved from the task horizon
    cost_estimate: str = 'offline'      # C_hat's source: COST_ESTIMATES ('rollout': the code's)
    estimate_states: str = 'batch'      # the offline C_hat's states: ESTIMATE_STATES
    task: Optional[str] = None          # the simulator of 'rollout' (resolved from the task)

    def __post_init__(self):
        self.critic_hidden = tuple(int(h) for h in self.critic_hidden)
        self.cond_hidden = tuple(int(h) for h in self.cond_hidden)
        self.policy_hidden = tuple(int(h) for h in self.policy_hidden)
        if self.cost_estimate not in COST_ESTIMATES:
            raise ConfigError(f'cost_estimate {self.cost_estimate!r}: use one of '
                              f'{", ".join(COST_ESTIMATES)}')
        if self.estimate_states not in ESTIMATE_STATES:
            raise ConfigError(f'estimate_states {self.estimate_states!r}: use one of '
                              f'{", ".join(ESTIMATE_STATES)}')
        if self.estimate_states != 'batch' and self.cost_estimate != 'offline':
            raise ConfigError(f'estimate_states {self.estimate_states!r} chooses the states of '
                              'the offline estimate, but cost_estimate is '
                              f'{self.cost_estimate!r}; drop one of the two')
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ConfigError(f'temperature_schedule {self.temperature_schedule!r}: use one of '
                              f'{", ".join(TEMPERATURE_SCHEDULES)}')
        stages = (self.behavior_steps, self.critic_steps, self.warmstart_steps,
                  self.adaptation_steps)
        if self.critic_settle_steps < 0:
            raise ConfigError(f'critic_settle_steps ({self.critic_settle_steps}) must be >= 0')
        if min(stages) < 0:
            raise ConfigError(f'stage steps must be >= 0, got behavior/critic/warmstart/'
                              f'adaptation = {stages}')
        if self.steps is None:
            self.steps = sum(stages) + self.critic_settle_steps
        if self.cost_ensemble < 2:
            raise ConfigError(f'cost_ensemble ({self.cost_ensemble}) must be >= 2: the UCB needs '
                              'the spread of an ensemble')
        if not 0.0 <= self.cost_pessimism <= 1.0:
            raise ConfigError(f'cost_pessimism ({self.cost_pessimism}) must lie in [0, 1]')
        if self.ucb_k < 0 or self.slack_start < 0:
            raise ConfigError(f'ucb_k ({self.ucb_k}) and slack_start ({self.slack_start}) must '
                              'be >= 0')
        if not 0 < self.score_t_min < self.score_t_max <= 1:
            raise ConfigError('score_t_min and score_t_max must satisfy 0 < min < max <= 1')
        self.check_stages()

    def pretraining_steps(self) -> int:
        """Return the iterations before the adaptation stage (stages 1-3)."""
        return self.behavior_steps + self.critic_steps + self.warmstart_steps

    def adaptation_length(self) -> int:
        """Return the adaptation iterations: what ``steps`` leaves after stages 1-3."""
        return int(self.steps) - self.pretraining_steps()

    def policy_iterations(self) -> int:
        """Return the adaptation iterations that step the policy: those after the settling."""
        return self.adaptation_length() - self.critic_settle_steps

    def check_stages(self) -> None:
        """Refuse a total that leaves the adaptation stage no policy iteration."""
        if self.policy_iterations() < 1:
            raise ConfigError(
                f'steps ({self.steps}) must exceed behavior_steps + critic_steps + '
                f'warmstart_steps + critic_settle_steps '
                f'({self.pretraining_steps() + self.critic_settle_steps}): the adaptation '
                'stage gets the iterations left; lower the stage steps or raise --steps')

    def stage_of(self, iteration: int) -> Tuple[str, int]:
        """Return (stage name, index within the stage) of the 0-based ``iteration``."""
        for name, length in zip(STAGES[:3], (self.behavior_steps, self.critic_steps,
                                             self.warmstart_steps)):
            if iteration < length:
                return name, iteration
            iteration -= length
        return 'adaptation', iteration


CONFIG = DrcorlConfig


def milestones(config: DrcorlConfig) -> Tuple[int, ...]:
    """Keep the checkpoint at the end of stages 1-3: adaptation rules can be compared from it."""
    return (config.pretraining_steps(),)


def resume_may_change(config: DrcorlConfig, step: int) -> frozenset:
    """Return the fields a run resumed or branched at ``step`` may change: stage 4's, before it."""
    return ADAPTATION_FIELDS if step <= config.pretraining_steps() else frozenset()


# 'paper': the paper's and the official code's values. 'cpu': about one core-hour on one thread
# of this project's 2-core CPU (docs/algorithms.md "DRCORL" has the measured it/s per stage):
# the behaviour network at FISOR's cpu size (128 x 2 blocks) and batch 256, 60k behaviour steps
# (paper 2M at batch 2048) and 50k critic steps (paper 500k); the extraction (50k warm-start and
# 2000 adaptation iterations, about 12 minutes) is the paper's.
# 'test': tiny networks and a few iterations per stage (tests, test bundles).
PRESETS: Dict[str, dict] = {
    'paper': {},
    'cpu': {'behavior_steps': 60_000, 'critic_steps': 50_000, 'behavior_batch_size': 256,
            'behavior_hidden': 128, 'behavior_blocks': 2},
}
PRESETS['test'] = {**PRESETS['cpu'], 'behavior_steps': 8, 'critic_steps': 8,
                   'warmstart_steps': 4, 'adaptation_steps': 10, 'behavior_batch_size': 64,
                   'critic_batch_size': 64, 'policy_batch_size': 64, 'behavior_hidden': 16,
                   'behavior_blocks': 1, 'time_dim': 8, 'cond_hidden': (16, 16),
                   'critic_hidden': (32, 32), 'policy_hidden': (32, 32)}


def make_config(preset: str = 'paper', **overrides) -> DrcorlConfig:
    """Return the config of a named preset with ``overrides`` applied."""
    return config_from_preset(DrcorlConfig, PRESETS, preset, overrides, 'DRCORL')


def resolve_config(config: DrcorlConfig, task) -> DrcorlConfig:
    """Fill in reward_scale = 1000 / (R_max - R_min) (official code) and T = the task horizon."""
    if config.normalize_rewards and config.reward_scale is None:
        config = replace(config, reward_scale=float(
            1000.0 / (task.max_reward - task.min_reward)))
    if config.episode_len is None:
        config = replace(config, episode_len=int(task.horizon))
    if config.cost_estimate == 'rollout' and config.task is None:
        config = replace(config, task=task.name)
    return config


# --------------------------------------------------------------------------- losses (pure)

def vp_alpha_sigma(t: torch.Tensor, beta_min: float = 0.1,
                   beta_max: float = 20.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Return the continuous VP marginal (alpha_t, sigma_t) of Eq. 3 at times ``t``.

    log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma_t = sqrt(1 - alpha_t^2),
    so x_t = alpha_t x_0 + sigma_t eps (the official code's schedule).
    """
    log_alpha = -0.25 * t.pow(2) * (beta_max - beta_min) - 0.5 * t * beta_min
    alpha = torch.exp(log_alpha)
    return alpha, torch.sqrt(1.0 - alpha.pow(2))


def behavior_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Return Eq. 5: mean_b sum_dims (eps_phi(alpha_t a + sigma_t eps, t, s) - eps)^2."""
    return (eps_pred - eps).pow(2).sum(dim=-1).mean()


def q_loss(q_heads: torch.Tensor, target: torch.Tensor,
           weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    Return Eqs. 17/18: the sum over heads of the batch mean of (Q^j(s, a) - target)^2.

    ``target`` is [B] (shared by every head) or [heads, B]; ``weight`` [B] weights the rows.
    """
    if target.dim() == 1:
        target = target.unsqueeze(0)
    error = (q_heads - target).pow(2)
    if weight is not None:
        error = error * weight
    return error.mean(dim=1).sum()


def pessimistic_cost_target(costs: torch.Tensor, q_next_heads: torch.Tensor, mask: torch.Tensor,
                            gamma: float, pessimism: float) -> torch.Tensor:
    """
    Return Eq. 18's pessimistic TD target for every cost critic (reconstructed form).

    c + gamma mask [lambda max_i Qbar_c^i(s', a') + (1 - lambda) min_i Qbar_c^i(s', a')]: double-Q
    learning turned towards over-estimation, lambda in [0, 1] the positive pessimism parameter
    (0.5 of each extreme at lambda = 0.5, the worst member at lambda = 1).
    """
    upper = q_next_heads.max(dim=0).values
    lower = q_next_heads.min(dim=0).values
    return costs + gamma * mask * (pessimism * upper + (1.0 - pessimism) * lower)


def ensemble_mean_std(q_heads: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the ensemble mean and (population) standard deviation over heads [N, B] -> [B]."""
    mean = q_heads.mean(dim=0)
    std = (q_heads - mean.unsqueeze(0)).pow(2).mean(dim=0).sqrt()
    return mean, std


def ucb(q_heads: torch.Tensor, k: float) -> torch.Tensor:
    """Return Sec. 4.2's Q_c^UCB(s, a) = mean_i Q_c^i + k std_i Q_c^i, per row [N, B] -> [B]."""
    mean, std = ensemble_mean_std(q_heads)
    return mean + k * std


def normalized_cost_estimate(q_ucb: torch.Tensor, gamma: float, horizon: int,
                             kappa: float) -> torch.Tensor:
    """
    Return the offline estimate of the normalised episode cost (App. B.3, Sec. 4.2).

    C_hat = (1 - gamma) T mean_B Q_c^UCB(s, pi(s)) (a discounted value turned into an episode
    cost of T steps), divided by the budget kappa: 1.0 is the constraint's boundary.
    """
    return (1.0 - gamma) * horizon * q_ucb.mean() / kappa


def score_coefficient(eps_pred: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                      baseline: bool = True) -> torch.Tensor:
    """
    Return Eq. 21's per-sample score term w(t) (eps_phi(a_t, t, s) - eps), with w(t) = sigma_t^2.

    By Eq. 9 the diffusion model's score is -eps_phi / sigma_t, so this is the reverse-KL
    gradient (Eq. 8) with respect to the action; ``baseline`` False drops the zero-mean -eps
    (the official code). sigma: [B, 1].
    """
    coef = eps_pred - noise if baseline else eps_pred
    return sigma.pow(2) * coef


def kl_surrogate(score_coef: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """
    Return the reverse-KL surrogate mean_b <sg(score_coef_b), a_theta(s_b)> (Eqs. 6-9, 21).

    Its gradient in theta is E[w(t) (eps_phi - eps) da/dtheta], Eq. 21's regulariser.
    """
    return (score_coef.detach() * action).sum(dim=-1).mean()


def reward_objective(kl: torch.Tensor, q_r: torch.Tensor, beta: float) -> torch.Tensor:
    """Return the loss of Eq. 19 (maximise Q_r - KL / beta), scaled by beta: KL - beta mean Q_r."""
    return kl - beta * q_r.mean()


def cost_objective(kl: torch.Tensor, q_c: torch.Tensor, beta: float) -> torch.Tensor:
    """Return the loss of Eq. 20 (minimise Q_c + KL / beta), scaled by beta: KL + beta mean Q_c."""
    return kl + beta * q_c.mean()


def pcgrad(g_r: torch.Tensor, g_c: torch.Tensor) -> torch.Tensor:
    """
    Return Eq. 12's combination of the reward and cost updates (PCGrad, halved).

    Conflicting (<g_r, g_c> < 0): (g_r+ + g_c+) / 2, each projected on the normal plane of the
    other, g_r+ = g_r - <g_r, g_c> / |g_c|^2 g_c. Otherwise the mean (g_r + g_c) / 2.
    """
    dot = torch.dot(g_r, g_c)
    if dot < 0:
        g_r_plus = g_r - dot / g_c.pow(2).sum().clamp_min(1e-12) * g_c
        g_c_plus = g_c - dot / g_r.pow(2).sum().clamp_min(1e-12) * g_r
        return 0.5 * (g_r_plus + g_c_plus)
    return 0.5 * (g_r + g_c)


def select_branch(cost_estimate: float, slack_minus: float, slack_plus: float) -> str:
    """
    Return Algorithm 2's case for the normalised cost estimate (limit 1.0).

    'reward' when C_hat <= 1 - h-, 'cost' when C_hat >= 1 + h+, else 'both' (Eq. 12).
    """
    if cost_estimate <= 1.0 - slack_minus:
        return 'reward'
    if cost_estimate >= 1.0 + slack_plus:
        return 'cost'
    return 'both'


def slack_schedule(index: int, length: int, start: float = 0.2, decay: bool = True) -> float:
    """Return h- = h+ at adaptation iteration ``index`` of ``length``: start, linearly to 0."""
    if not decay or length <= 1:
        return start
    return start * (1.0 - min(index, length - 1) / (length - 1))


def temperature_schedule(index: int, length: int, schedule: str = 'linear', start: float = 0.04,
                         end: float = 1.0) -> float:
    """
    Return the temperature beta at adaptation iteration ``index`` (0-based) of ``length``.

    'linear' (App. C.1): start at the first iteration to end at the last; 'sqrt' (official
    code): 0.01 sqrt(index + 1); 'constant': start.
    """
    if schedule == 'linear':
        if length <= 1:
            return end
        return start + (end - start) * min(index, length - 1) / (length - 1)
    if schedule == 'sqrt':
        return 0.01 * math.sqrt(index + 1)
    if schedule == 'constant':
        return start
    raise ConfigError(f'temperature_schedule {schedule!r}: use one of '
                      f'{", ".join(TEMPERATURE_SCHEDULES)}')


# --------------------------------------------------------------------------- networks

class DrcorlModel(nn.Module):
    """
    DRCORL's networks: behaviour model, reward and cost critics (with targets), and the policy.

    ``policy`` is the deployed deterministic tanh MLP; ``behavior`` only regularises training.
    """

    def __init__(self, obs_dim: int, act_dim: int, config: DrcorlConfig):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.ucb_k = float(config.ucb_k)
        # FISOR's noise network on continuous t in (0, 1] (time features of scale 30, as the
        # official code's Gaussian Fourier projection)
        self.behavior = EpsilonNet(obs_dim, act_dim, config.behavior_hidden,
                                   config.behavior_blocks, config.behavior_dropout,
                                   config.time_dim, config.cond_hidden, config.time_scale)
        self.q_r = QEnsemble(obs_dim, act_dim, config.critic_hidden, config.num_reward_heads)
        self.q_r_target = deepcopy(self.q_r)
        self.v_r = ValueNet(obs_dim, config.critic_hidden)
        self.q_c = QEnsemble(obs_dim, act_dim, config.critic_hidden, config.cost_ensemble)
        self.q_c_target = deepcopy(self.q_c)
        self.policy = mlp([obs_dim, *config.policy_hidden, act_dim], nn.ReLU, nn.Tanh)
        for frozen in (self.q_r_target, self.q_c_target):
            frozen.requires_grad_(False)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Return the deterministic action a_theta(s) in [-1, 1]: [B, act_dim]."""
        return self.policy(obs)

    def cost_mean_std(self, obs: torch.Tensor, act: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the target cost ensemble's mean and std of Q_c(s, a), each [B]."""
        return ensemble_mean_std(self.q_c_target(obs, act))

    def cost_ucb(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return Q_c^UCB(s, a) = mean + k std over the target cost ensemble: [B]."""
        return ucb(self.q_c_target(obs, act), self.ucb_k)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.act(observation)

    def export_modules(self) -> Dict[str, nn.Module]:
        """Return the modules the ONNX export traces: policy(obs), critic(obs, act)."""
        return {'policy': ExportedMethod(self, 'act'),
                'critic': ExportedMethod(self, 'cost_mean_std')}


def build_model(obs_dim: int, act_dim: int, config: DrcorlConfig) -> DrcorlModel:
    """Return a freshly initialised DrcorlModel."""
    return DrcorlModel(obs_dim, act_dim, config)


def prepare_arrays(data: Dict[str, np.ndarray], config: DrcorlConfig) -> Dict[str, np.ndarray]:
    """
    Return the arrays DRCORL trains on.

    Rewards are scaled by reward_scale, costs are raw; ``mask`` = 1 - (terminal or timeout);
    ``next_act`` is the dataset's action at s' (the next row of the same episode), which the
    cost critics' pretraining TD (Eq. 18) bootstraps with, and ``next_known`` is 0 on the rows
    whose episode goes on but whose next row is not s' (those rows get no cost-TD weight);
    ``first`` is 1 on each episode's first row (the states of ``estimate_states: initial``).
    """
    obs = np.asarray(data['observations'], dtype=np.float32)
    next_obs = np.asarray(data['next_observations'], dtype=np.float32)
    act = clip_actions(data['actions'])
    done = (np.asarray(data['terminals']).reshape(-1) > 0) | \
        (np.asarray(data['timeouts']).reshape(-1) > 0)
    continues = np.zeros(len(obs), dtype=bool)
    if len(obs) > 1:
        continues[:-1] = ~done[:-1] & np.all(np.abs(next_obs[:-1] - obs[1:]) <= 1e-5, axis=1)
    next_act = np.zeros_like(act)
    next_act[:-1] = act[1:]
    next_act[~continues] = 0.0
    first = np.zeros(len(obs), dtype=np.float32)
    first[episode_spans(data)[0]] = 1.0
    scale = config.reward_scale if config.normalize_rewards and config.reward_scale else 1.0
    return {
        'obs': obs, 'act': act, 'next_obs': next_obs, 'next_act': next_act,
        'reward': np.asarray(data['rewards'], dtype=np.float32).reshape(-1) * scale,
        'cost': np.asarray(data['costs'], dtype=np.float32).reshape(-1),
        'mask': (~done).astype(np.float32),
        'next_known': (done | continues).astype(np.float32),
        'first': first,
    }


# --------------------------------------------------------------------------- trainer

class DrcorlTrainer:
    """One stage per iteration: behaviour model, critics, warm start, then safe adaptation."""

    def __init__(self, model: DrcorlModel, config: DrcorlConfig):
        self.model, self.config = model, config
        # train() may change steps after the config was made (--steps): check again here.
        config.check_stages()
        self.behavior_opt = adam(model.behavior.parameters(), lr=config.behavior_lr,
                                 weight_decay=config.behavior_weight_decay)
        self.q_r_opt = adam(model.q_r.parameters(), lr=config.critic_lr)
        self.v_r_opt = adam(model.v_r.parameters(), lr=config.critic_lr)
        self.q_c_opt = adam(model.q_c.parameters(), lr=config.critic_lr)
        self.policy_opt = adam(model.policy.parameters(), lr=config.policy_lr)
        self.iteration = 0
        self._env = None            # the 'rollout' estimate's simulator, made on first use
        self._initial_obs = None    # the dataset's first states ('initial' estimate)

    def update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """Run one iteration of the stage the iteration count is in; return its logs."""
        stage, index = self.config.stage_of(self.iteration)
        self.iteration += 1
        if stage == 'adaptation' and self._initial_obs is None:
            self._initial_obs = buffer.data['obs'][buffer.data['first'] > 0]
        if stage == 'behavior':
            logs = self.behavior_update(buffer.sample(self.config.behavior_batch_size))
        elif stage == 'critics':
            logs = self.critic_pretrain_update(buffer.sample(self.config.critic_batch_size))
        elif stage == 'warmstart':
            logs = self.policy_update(buffer.sample(self.config.policy_batch_size), None)
        elif index < self.config.critic_settle_steps:
            logs = self.critic_settle_update(buffer.sample(self.config.critic_batch_size),
                                             index)
        else:
            c = self.config
            index -= c.critic_settle_steps
            batch = buffer.sample(max(c.policy_batch_size, c.critic_batch_size))
            logs = self.critic_td_update({k: v[:c.critic_batch_size] for k, v in batch.items()})
            logs.update(self.policy_update({k: v[:c.policy_batch_size] for k, v in batch.items()},
                                           index))
        logs['schedule/stage'] = torch.tensor(float(STAGES.index(stage)))
        return logs

    # -- stage 1 -------------------------------------------------------------------------------

    def behavior_update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One denoising step of the behaviour model (Eq. 5), t ~ U(t_min, 1)."""
        m, c = self.model, self.config
        m.behavior.train()
        obs, act = batch['obs'], batch['act']
        t = torch.rand(obs.shape[0], 1, device=obs.device) * (1.0 - c.behavior_t_min) + \
            c.behavior_t_min
        alpha, sigma = vp_alpha_sigma(t, c.beta_min, c.beta_max)
        eps = torch.randn_like(act)
        loss = behavior_loss(m.behavior(alpha * act + sigma * eps, obs, t), eps)
        descend(self.behavior_opt, loss)
        return {'loss/behavior': loss.detach()}

    # -- stages 2 and 4: critics ---------------------------------------------------------------

    def critic_pretrain_update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """IQL for the reward (Eqs. 16, 17); pessimistic TD on the data's a' for costs (Eq. 18)."""
        m, c = self.model, self.config
        obs, act, next_obs, mask = batch['obs'], batch['act'], batch['next_obs'], batch['mask']
        with torch.no_grad():
            q_r_targets = m.q_r_target(obs, act)
        v_loss = reward_value_loss(q_r_targets, m.v_r(obs), c.expectile)   # Eq. 16
        descend(self.v_r_opt, v_loss)
        with torch.no_grad():
            target_r = reward_target(batch['reward'], m.v_r(next_obs), mask, c.gamma)   # Eq. 17
        q_r_loss = q_loss(m.q_r(obs, act), target_r)
        descend(self.q_r_opt, q_r_loss)
        logs = self._cost_td(batch, batch['next_act'], batch['next_known'])
        soft_update(m.q_r_target, m.q_r, c.critic_tau)
        return {'loss/v_r': v_loss.detach(), 'loss/q_r': q_r_loss.detach(), **logs}

    def critic_td_update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Both critics by TD with a' = pi(s') (App. B.1); the reward critic not pessimistic."""
        m, c = self.model, self.config
        obs, act, next_obs, mask = batch['obs'], batch['act'], batch['next_obs'], batch['mask']
        with torch.no_grad():
            next_act = m.act(next_obs)
            # one target per head (the official TD step): no min, no pessimism for rewards
            target_r = batch['reward'].unsqueeze(0) + c.gamma * mask.unsqueeze(0) * \
                m.q_r_target(next_obs, next_act)
        q_r_loss = q_loss(m.q_r(obs, act), target_r)
        descend(self.q_r_opt, q_r_loss)
        logs = self._cost_td(batch, next_act, None)
        soft_update(m.q_r_target, m.q_r, c.critic_tau)
        return {'loss/q_r': q_r_loss.detach(), **logs}

    def critic_settle_update(self, batch: Dict[str, torch.Tensor],
                             index: int) -> Dict[str, torch.Tensor]:
        """Critic-only TD iteration ``index`` of stage 4's settling; logs C_hat now and then."""
        logs = self.critic_td_update(batch)
        done = index + 1
        if self.config.cost_estimate == 'offline' and (
                done % SETTLE_ESTIMATE_EVERY == 0 or done == self.config.critic_settle_steps):
            with torch.no_grad():
                logs['estimate/cost_norm'] = self.offline_cost_estimate(self.estimate_obs(batch))
        return logs

    def estimate_obs(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the states the offline estimate averages over (``estimate_states``)."""
        if self.config.estimate_states == 'initial':
            if self._initial_obs is None:
                raise RuntimeError("estimate_states 'initial' reads the dataset's first states, "
                                   'which update(buffer) collects; call update, not the stage '
                                   'methods, first')
            return self._initial_obs
        return batch['obs']

    def offline_cost_estimate(self, obs: torch.Tensor) -> torch.Tensor:
        """Return C_hat = (1 - gamma) T mean Q_c^UCB(s, pi(s)) / kappa over ``obs`` (App. B.3)."""
        m, c = self.model, self.config
        return normalized_cost_estimate(m.cost_ucb(obs, m.act(obs)), c.gamma, c.episode_len,
                                        c.cost_limit)

    def _cost_td(self, batch: Dict[str, torch.Tensor], next_act: torch.Tensor,
                 weight: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        m, c = self.model, self.config
        with torch.no_grad():
            target = pessimistic_cost_target(batch['cost'], m.q_c_target(batch['next_obs'],
                                                                         next_act),
                                             batch['mask'], c.gamma, c.cost_pessimism)
        heads = m.q_c(batch['obs'], batch['act'])
        loss = q_loss(heads, target, weight)
        descend(self.q_c_opt, loss)
        soft_update(m.q_c_target, m.q_c, c.critic_tau)
        _, std = ensemble_mean_std(heads.detach())
        return {'loss/q_c': loss.detach(), 'value/q_c_std': std.mean()}

    # -- stages 3 and 4: the policy ------------------------------------------------------------

    def score_coefficients(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return Eq. 21's w(t) (eps_phi - eps) at the (detached) policy actions [B, A]."""
        m, c = self.model, self.config
        m.behavior.eval()                     # frozen: no dropout, no update
        with torch.no_grad():
            t = torch.rand(obs.shape[0], 1, device=obs.device) * (c.score_t_max - c.score_t_min) \
                + c.score_t_min
            alpha, sigma = vp_alpha_sigma(t, c.beta_min, c.beta_max)
            noise = torch.randn_like(act)
            eps_pred = m.behavior(alpha * act + sigma * noise, obs, t)
        return score_coefficient(eps_pred, noise, sigma, c.score_baseline)

    def policy_update(self, batch: Dict[str, torch.Tensor],
                      index: Optional[int]) -> Dict[str, torch.Tensor]:
        """
        One policy step: KL-only (warm start, ``index`` None) or Algorithm 2 at ``index``.

        The reward and cost steps are one Adam step each from the same parameters theta_0; in
        the band between the slacks their displacements are combined by Eq. 12 (App. B.1).
        """
        m, c = self.model, self.config
        obs = batch['obs']
        with torch.no_grad():
            a0 = m.act(obs)
        coef = self.score_coefficients(obs, a0)

        def kl_only() -> torch.Tensor:
            return kl_surrogate(coef, m.act(obs))

        if index is None:
            loss = kl_only()
            descend(self.policy_opt, loss)
            return {'loss/policy_kl': loss.detach()}

        length = c.policy_iterations()
        beta = temperature_schedule(index, length, c.temperature_schedule, c.temperature_start,
                                    c.temperature_end)
        slack = slack_schedule(index, length, c.slack_start, c.slack_decay)
        if c.cost_estimate == 'rollout':
            estimate = self.rollout_cost(index) / c.cost_limit
        else:
            with torch.no_grad():
                estimate = float(self.offline_cost_estimate(self.estimate_obs(batch)))
        branch = select_branch(estimate, slack, slack)
        values = {}

        def reward_loss() -> torch.Tensor:
            a = m.act(obs)
            kl, q = kl_surrogate(coef, a), m.q_r_target(obs, a).mean(dim=0)
            values.update({'loss/policy_kl': kl.detach(), 'value/q_r_pi': q.detach().mean()})
            return reward_objective(kl, q, beta)

        def cost_loss() -> torch.Tensor:
            a = m.act(obs)
            kl, q = kl_surrogate(coef, a), m.q_c_target(obs, a).mean(dim=0)
            values.update({'loss/policy_kl': kl.detach(), 'value/q_c_pi': q.detach().mean()})
            return cost_objective(kl, q, beta)

        logs = {}
        if branch == 'reward':
            loss = reward_loss()
            descend(self.policy_opt, loss)
            logs['loss/policy_reward'] = loss.detach()
        elif branch == 'cost':
            loss = cost_loss()
            descend(self.policy_opt, loss)
            logs['loss/policy_cost'] = loss.detach()
        else:
            logs.update(self._combined_step(reward_loss, cost_loss))
        logs.update(values)
        logs.update({'estimate/cost_norm': torch.tensor(estimate),
                     'schedule/beta': torch.tensor(beta), 'schedule/slack': torch.tensor(slack),
                     'schedule/branch': torch.tensor(float(BRANCHES[branch]))})
        return logs

    def rollout_cost(self, index: int) -> float:
        """Return the cost return of one simulator episode of the current policy (code's C_hat)."""
        from saferl_ros.sim import episode_seed, run_episode, seeded_global_rngs
        from saferl_ros.tasks import get_task

        if self.config.task is None:
            raise ConfigError("cost_estimate 'rollout' needs the task: resolve_config sets it")
        if self._env is None:
            with seeded_global_rngs(episode_seed(ROLLOUT_SEED, 0)):   # making one draws too
                self._env = get_task(self.config.task).make_env()
        policy = self.model.policy
        device = next(policy.parameters()).device

        def act(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
                return self.model.act(obs_t[None])[0].cpu().numpy()

        return float(run_episode(self._env, act, episode_seed(ROLLOUT_SEED, index)).cost)

    def close(self) -> None:
        """Close the 'rollout' estimate's simulator, if one was made."""
        if self._env is not None:
            self._env.close()
            self._env = None

    def _combined_step(self, reward_loss: Callable[[], torch.Tensor],
                       cost_loss: Callable[[], torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Take both steps from theta_0, set theta_0 + pcgrad(d_r, d_c) (App. B.1, Eq. 12)."""
        params = list(self.model.policy.parameters())
        with torch.no_grad():
            theta0 = parameters_to_vector(params).clone()
        loss_r = reward_loss()
        descend(self.policy_opt, loss_r)
        with torch.no_grad():
            delta_r = parameters_to_vector(params) - theta0
            _copy_into(params, theta0)
        loss_c = cost_loss()
        descend(self.policy_opt, loss_c)
        with torch.no_grad():
            delta_c = parameters_to_vector(params) - theta0
            _copy_into(params, theta0 + pcgrad(delta_r, delta_c))
        return {'loss/policy_reward': loss_r.detach(), 'loss/policy_cost': loss_c.detach(),
                'schedule/conflict': (torch.dot(delta_r, delta_c) < 0).float()}

    def state_dict(self) -> dict:
        """Return the optimiser states and the iteration count (the model is saved separately)."""
        return {'behavior_opt': self.behavior_opt.state_dict(),
                'q_r_opt': self.q_r_opt.state_dict(), 'v_r_opt': self.v_r_opt.state_dict(),
                'q_c_opt': self.q_c_opt.state_dict(), 'policy_opt': self.policy_opt.state_dict(),
                'iteration': self.iteration}

    def load_state_dict(self, state: dict) -> None:
        """Restore the states saved by state_dict()."""
        for name in ('behavior_opt', 'q_r_opt', 'v_r_opt', 'q_c_opt', 'policy_opt'):
            getattr(self, name).load_state_dict(state[name])
        self.iteration = int(state['iteration'])


def _copy_into(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy a flat vector into the parameters in place (the optimiser keeps its tensors)."""
    offset = 0
    for param in params:
        size = param.numel()
        param.copy_(vector[offset:offset + size].view_as(param))
        offset += size


def make_trainer(model: DrcorlModel, config: DrcorlConfig) -> DrcorlTrainer:
    """Return the trainer of ``model``."""
    return DrcorlTrainer(model, config)


# --------------------------------------------------------------------------- export

def cost_budget(config: DrcorlConfig) -> float:
    """
    Return the per-(s, a) budget of Q_c^UCB that kappa gives: kappa / ((1 - gamma) T).

    The same boundary as the training rule's C_hat = 1 (App. B.3): (1 - gamma) T Q_c^UCB / kappa
    <= 1 for one state-action pair.
    """
    if config.episode_len is None:
        raise ConfigError('DrcorlConfig.episode_len is unset; call resolve_config(config, task) '
                          'or pass episode_len')
    budget = config.cost_limit / ((1.0 - config.gamma) * config.episode_len)
    return float(f'{budget:.12g}')   # 5.0, not 4.999999999999996 (1 - 0.99 is not 0.01)


def export_plan(model: DrcorlModel, config: DrcorlConfig) -> ExportPlan:
    """
    Return DRCORL's graphs: the policy MLP and the cost ensemble's mean and std of Q_c.

    ``policy(observation) -> action`` is the deterministic tanh MLP; ``critic(observation,
    action) -> q_c_mean, q_c_std`` over the target cost ensemble. The manifest's critic is kind
    ``cost_ucb`` with k and the budget kappa / ((1 - gamma) T): the monitor passes an action
    while q_c_mean + k q_c_std <= budget.

    No fallback graph: the monitor's fallback for a DRCORL bundle is its configured safe action,
    which replaces the proposal only if the critic rates it strictly safer. The policy is a
    Dirac policy, so it has no candidate actions to choose the most conservative one from, and
    a candidate set made by perturbing its action would be ranked by a critic trained on data
    and policy actions only, i.e. chosen where the critic's error is largest; a stop command
    that the person deploying the robot sets is predictable and is checked by the same critic.
    """
    modules = model.export_modules()
    graphs = {
        'policy': GraphSpec(modules['policy'], {'observation': batch_shape(model.obs_dim)},
                            {'action': batch_shape(model.act_dim)}),
        'critic': GraphSpec(modules['critic'],
                            {'observation': batch_shape(model.obs_dim),
                             'action': batch_shape(model.act_dim)},
                            {'q_c_mean': batch_shape(), 'q_c_std': batch_shape()}),
    }
    critic = {'kind': 'cost_ucb', 'budget': cost_budget(config), 'k': float(config.ucb_k)}
    extra = {'policy': 'a = tanh MLP(s), deterministic (Dirac limit of the Gaussian policy)',
             'cost_limit': float(config.cost_limit), 'episode_len': int(config.episode_len),
             'gamma': float(config.gamma), 'cost_ensemble': int(config.cost_ensemble),
             'budget_rule': 'q_c_mean + k q_c_std <= kappa / ((1 - gamma) T)',
             'fallback': "the monitor's safe_action (no fallback graph)"}
    return ExportPlan(NAME, graphs, critic, extra=extra)
