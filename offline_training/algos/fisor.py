"""
FISOR: feasibility-guided safe offline RL with a diffusion policy (Zheng et al., ICLR 2024).

A PyTorch port of the paper and of the official JAX code (github.com/ZhengYinan-AIR/FISOR,
``jaxrl5/agents/fisor``; docs/algorithms.md maps each equation to its code). Three decoupled
objectives are trained concurrently:

1. the largest feasible region: V_h by reversed expectile regression (Eq. 8) and two Q_h heads by
   the discounted feasible Bellman operator (Eq. 9), with h = -1 when safe and h = M = 25 when the
   step has a cost;
2. the reward advantage with IQL: V_r (Eq. 15) and two Q_r heads (Eq. 16) on scaled rewards;
3. the policy: a diffusion model trained by weighted denoising (Eq. 14) with the feasibility-
   dependent weights of Eq. 13.

Sign conventions (used by the runtime monitor too): V_h(s) <= 0 means the state is feasible,
max_j Q_h^j(s, a) <= 0 means the action keeps it feasible. Inference samples N candidates with
DDPM from the EMA noise model and returns the one with the smallest max-of-heads target Q_h
(``selection='feasible-maxq'``, our option: the best-Q_r candidate among the feasible ones).
"""

from copy import deepcopy
from dataclasses import dataclass, replace
import math
from typing import Dict, Optional, Tuple
import warnings

import numpy as np
from offline_training.algos.batching import clip_actions, ReplayBuffer
from offline_training.algos.critics import reward_target, reward_value_loss
from offline_training.algos.diffusion import ddpm_sample, DiffusionSchedule, EpsilonNet
from offline_training.algos.infrastructure import (adam, adam_tensors, adam_update_,
                                                   config_from_preset, descend)
from offline_training.algos.networks import EnsembleMLP, QEnsemble
from offline_training.algos.protocol import batch_shape, ExportedMethod, ExportPlan, GraphSpec
from saferl_ros.errors import ConfigError
import torch
from torch import nn
from torch.func import functional_call, grad_and_value

NAME = 'fisor'
SCHEDULES = ('joint', 'critics-first')
ACTOR_SAMPLING = ('weighted-loss', 'weighted-sampling')
COMPILED_STEPS = ('auto', 'always', 'never')     # not on/off: YAML reads those as booleans
# 'auto' compiles the steps of runs this long: 3-6 ms saved per `cpu` iteration repays the
# 24-35 s of compiling after 5 000-10 000 iterations
COMPILE_MIN_STEPS = 20_000
# Action selection among the N candidates: 'minqc' is the paper's and the official code's (argmin
# of max-of-heads Q_h); 'feasible-maxq' is ours: argmax of Q_r among the candidates whose Q_h <= 0,
# argmin Q_h when none is.
SELECTIONS = ('minqc', 'feasible-maxq')
SELECTION_TEXT = {  # what a bundle manifest says its policy graph does
    'minqc': 'argmin max_j Qbar_h^j(s, a) over the candidates (minqc)',
    'feasible-maxq': 'argmax min_j Qbar_r^j(s, a) over the candidates with max_j Qbar_h^j(s, a) '
                     '<= 0, else argmin max_j Qbar_h^j(s, a) (feasible-maxq)'}


# Most actions sampled per state (num_candidates, fallback_candidates): each one is a whole
# reverse diffusion chain per observation, so a value from a command line or a config file
# (`saferl-eval --set num_candidates=...`) must not be able to ask for unbounded memory; the
# paper samples 16.
MAX_CANDIDATES = 1024

# The members of FisorModel.v: V_r, then V_h.
VALUES = {'v_r': slice(0, 1), 'v_h': slice(1, 2)}


@dataclass
class FisorConfig:
    """FISOR hyperparameters; the defaults are the paper's Table 5 / the official config."""

    # --- schedule
    steps: int = 1_000_000              # training iterations (paper: 1e6)
    actor_batch_size: int = 1024        # one actor update sees this many samples ...
    actor_updates_per_step: int = 2     # ... and there are two per iteration (paper: batch 2048)
    critic_batch_size: int = 256        # critics/values see the first 256 rows of the batch
    # --- critics (Eq. 8, 9, 15, 16)
    gamma: float = 0.99
    critic_hidden: Tuple[int, ...] = (256, 256)
    num_q_heads: int = 2                # min of 2 Q_r, max of 2 Q_h (App. D.3)
    expectile: float = 0.9              # tau of V_r (Eq. 15, upper expectile)
    feasibility_expectile: float = 0.9  # tau of V_h (Eq. 8, reversed / lower expectile)
    violation_value: float = 25.0       # h(s) = M when c(s) > 0 ...
    safe_value: float = -1.0            # ... and -1 otherwise (App. D.3)
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    critic_tau: float = 0.005           # Polyak rate of the Q_r / Q_h targets (code default)
    normalize_returns: bool = True      # r <- r * H / (R_max - R_min) (official code)
    reward_scale: Optional[float] = None  # resolved from the task when normalize_returns
    # --- policy weights (Eq. 13)
    reward_temperature: float = 3.0     # alpha_1
    cost_temperature: float = 5.0       # alpha_2
    reward_weight_max: float = 100.0    # exp(alpha_1 A_r) clipped to (-inf, 100]
    cost_weight_max: float = 150.0      # exp(-alpha_2 A_h) clipped to (-inf, 150]
    # --- diffusion actor (Eq. 14)
    actor_hidden: int = 256
    actor_blocks: int = 3
    actor_dropout: float = 0.1
    time_dim: int = 64
    cond_hidden: Tuple[int, ...] = (128, 128)
    diffusion_steps: int = 5            # T
    beta_min: float = 0.1
    beta_max: float = 10.0
    actor_lr: float = 3e-4
    actor_decay_steps: int = 3_000_000  # cosine decay over actor optimiser steps (code)
    actor_ema: float = 0.001            # EMA rate of the sampling copy of the noise model
    # --- inference
    num_candidates: int = 16            # N
    selection: str = 'minqc'            # one of SELECTIONS (inference only)
    # Candidates of the fallback (argmin Q_h) selection: the paper's N. 64 was measured to cost 4x
    # the compute for the safety monitor's fallback (docs/ros.md, bench_ros_latency.py).
    fallback_candidates: int = 16
    clip_sampler: bool = True
    ddpm_temperature: float = 1.0
    # --- schedule. 'joint' is the paper's: every iteration two actor updates, then the critics.
    # 'critics-first' optimises the same objectives in another order (no critic loss reads the
    # actor, Eq. 8, 9, 15, 16): critic-only iterations until the critics settle, then the critics
    # are frozen, Eq. 13's weights computed once per transition, and the remaining iterations
    # train the actor alone (docs/algorithms.md "Schedules").
    schedule: str = 'joint'
    # critics-first: at most this many critic-only iterations; None: critic_fraction of the steps
    critic_steps: Optional[int] = None
    critic_fraction: float = 0.4
    critic_check_every: int = 2_000     # snapshot the critics every this many iterations ...
    settle_feasible_change: float = 0.01  # ... settled: the feasible fraction moved less ...
    settle_weight_rank: float = 0.98    # ... and the weights' ranking correlates above this
    settle_probe_size: int = 4096       # transitions (fixed, seeded) the snapshots are taken on
    # How the actor sees Eq. 13's weights once they are fixed: 'weighted-loss' (Eq. 14 as written)
    # or 'weighted-sampling' (transitions drawn in proportion to w, unweighted loss times mean w:
    # the same objective in expectation, less gradient noise at small batches).
    actor_sampling: str = 'weighted-loss'
    # 'always': each gradient step (the actor's, with its EMA; the values' and critics', with the
    # targets' average) runs as one program compiled by torch.compile on a CPU, where eager
    # execution's fixed cost per operation was the gap to the official code's jitted update
    # (docs/algorithms.md "One compiled program per gradient step"); if compiling fails the run
    # goes on eager and says so in its summary. 'never': eager operations. 'auto': compiled for
    # CPU runs of at least COMPILE_MIN_STEPS iterations (compiling takes ~30 s), eager otherwise.
    compiled_steps: str = 'auto'

    def __post_init__(self):
        self.critic_hidden = tuple(int(h) for h in self.critic_hidden)
        self.cond_hidden = tuple(int(h) for h in self.cond_hidden)
        if self.critic_batch_size > self.actor_batch_size * self.actor_updates_per_step:
            raise ConfigError('critic_batch_size must not exceed actor_batch_size * '
                              'actor_updates_per_step (critics use the first rows of the batch)')
        if self.schedule not in SCHEDULES:
            raise ConfigError(f'schedule {self.schedule!r}: use one of {", ".join(SCHEDULES)}')
        if not (1 <= self.num_candidates <= MAX_CANDIDATES
                and 1 <= self.fallback_candidates <= MAX_CANDIDATES):
            raise ConfigError(f'num_candidates ({self.num_candidates}) and fallback_candidates '
                              f'({self.fallback_candidates}) must lie in [1, {MAX_CANDIDATES}] '
                              '(the paper: 16)')
        if not self.ddpm_temperature >= 0:
            raise ConfigError(f'ddpm_temperature ({self.ddpm_temperature}) must be >= 0 '
                              '(1.0: the trained sampler)')
        if self.selection not in SELECTIONS:
            raise ConfigError(f'selection {self.selection!r}: use one of {", ".join(SELECTIONS)}')
        if self.actor_sampling not in ACTOR_SAMPLING:
            raise ConfigError(f'actor_sampling {self.actor_sampling!r}: use one of '
                              f'{", ".join(ACTOR_SAMPLING)}')
        if self.critic_check_every < 1 or self.settle_probe_size < 2:
            raise ConfigError(f'critic_check_every ({self.critic_check_every}) must be >= 1 and '
                              f'settle_probe_size ({self.settle_probe_size}) >= 2')
        if self.compiled_steps not in COMPILED_STEPS:
            raise ConfigError(f'compiled_steps {self.compiled_steps!r}: use one of '
                              f'{", ".join(COMPILED_STEPS)}')
        if not 0 < self.critic_fraction < 1:
            raise ConfigError(f'critic_fraction ({self.critic_fraction}) must lie in (0, 1)')
        self.check_critic_phase()

    def critic_phase_cap(self) -> int:
        """Return the most critic-only iterations of critics-first (they may settle earlier)."""
        if self.critic_steps is not None:
            return int(self.critic_steps)
        return max(1, int(round(self.critic_fraction * self.steps)))

    def check_critic_phase(self) -> None:
        """Refuse a critics-first schedule that leaves the actor no iteration."""
        cap = self.critic_phase_cap()
        if self.schedule == 'critics-first' and not 0 < cap < self.steps:
            raise ConfigError(f'critics-first needs 0 < critic_steps ({cap}) < steps '
                              f'({self.steps}): the actor trains in the iterations left')


CONFIG = FisorConfig

# Named presets. 'paper' is the paper/official configuration. 'cpu' keeps every equation and the
# update structure but shrinks the diffusion network, the batches and the number of steps so that
# a run finishes in about an hour on a 2-core laptop (see docs/algorithms.md for the figures).
# 'test' is 'cpu' with tiny networks (N = 8 candidates, 16 for the fallback): test bundles.
# 'cpu' also trains critics-first with weighted sampling: at the same CPU time it reached a
# higher reward than the joint schedule on BallCircle and CarRun (docs/algorithms.md
# "Schedules"); 100 000 iterations (40 % critic-only) take about one core-hour.
PRESETS: Dict[str, dict] = {
    'paper': {},
    'cpu': {'steps': 100_000, 'actor_batch_size': 256, 'actor_updates_per_step': 2,
            'critic_batch_size': 256, 'actor_hidden': 128, 'actor_blocks': 2,
            'actor_decay_steps': 300_000, 'schedule': 'critics-first',
            'actor_sampling': 'weighted-sampling'},
}
PRESETS['test'] = {**PRESETS['cpu'], 'steps': 30, 'actor_batch_size': 64,
                   'critic_batch_size': 64, 'actor_hidden': 32, 'actor_blocks': 1,
                   'critic_hidden': (32, 32), 'time_dim': 8, 'cond_hidden': (16, 16),
                   'num_candidates': 8, 'fallback_candidates': 16}


def make_config(preset: str = 'paper', **overrides) -> FisorConfig:
    """Return the config of a named preset with ``overrides`` applied."""
    return config_from_preset(FisorConfig, PRESETS, preset, overrides, 'FISOR')


def resolve_config(config: FisorConfig, task) -> FisorConfig:
    """Fill in task-dependent values: reward_scale = H / (R_max - R_min) (official code)."""
    if config.normalize_returns and config.reward_scale is None:
        config = replace(config, reward_scale=float(
            task.horizon / (task.max_reward - task.min_reward)))
    return config


# --------------------------------------------------------------------------- losses (pure)

def reversed_expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Return FISOR's reversed expectile |tau - 1(u > 0)| u^2 per element (a lower expectile)."""
    weight = torch.where(u > 0, 1.0 - tau, tau)
    return weight * u.pow(2)


def feasibility_h(costs: torch.Tensor, violation_value: float = 25.0,
                  safe_value: float = -1.0) -> torch.Tensor:
    """Return the constraint-violation h(s): M where the cost is > 0, -1 elsewhere (App. D.3)."""
    return torch.where(costs > 0, torch.full_like(costs, violation_value),
                       torch.full_like(costs, safe_value))


def feasible_bellman_target(h: torch.Tensor, v_h_next: torch.Tensor, mask: torch.Tensor,
                            gamma: float) -> torch.Tensor:
    """
    Return the Q_h regression target of Eq. 9.

    (1 - gamma) h + gamma max(h, V_h(s')) while the episode goes on (mask = 1); at a terminal or
    a timeout (mask = 0) the target is h(s) itself, as in the official code.
    """
    bootstrap = (1.0 - gamma) * h + gamma * torch.maximum(h, v_h_next)
    return mask * bootstrap + (1.0 - mask) * h


def critic_mse(q_heads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the mean over heads and batch of (Q^j(s, a) - target)^2 (Eq. 9 and Eq. 16)."""
    return (q_heads - target.unsqueeze(0)).pow(2).mean()


def feasible_value_loss(q_h_target_heads: torch.Tensor, v_h: torch.Tensor,
                        tau: float) -> torch.Tensor:
    """Return Eq. 8: reversed expectile of u = max_j Qbar_h^j(s, a) - V_h(s)."""
    u = q_h_target_heads.max(dim=0).values - v_h
    return reversed_expectile_loss(u, tau).mean()


def policy_weights(q_r: torch.Tensor, v_r: torch.Tensor, q_h: torch.Tensor, v_h: torch.Tensor,
                   config: FisorConfig) -> torch.Tensor:
    """
    Return the weights w(s, a) of Eq. 13 as the official code computes them.

    Feasible state (V_h <= 0) and feasible action (Q_h <= 0): clip(exp(alpha_1 (Q_r - V_r)), 0,
    100). Feasible state, infeasible action: 0. Infeasible state (V_h > 0): clip(exp(alpha_2
    (V_h - Q_h)), 0, 150). q_r is the min over the target Q_r heads, q_h the max over Q_h heads.
    """
    infeasible_state = (v_h > 0).to(q_r.dtype)
    feasible_pair = ((v_h <= 0) & (q_h <= 0)).to(q_r.dtype)
    w_infeasible = torch.exp(config.cost_temperature * (v_h - q_h)).clamp(
        0.0, config.cost_weight_max)
    w_feasible = torch.exp(config.reward_temperature * (q_r - v_r)).clamp(
        0.0, config.reward_weight_max)
    return infeasible_state * w_infeasible + feasible_pair * w_feasible


def weighted_denoising_loss(eps_pred: torch.Tensor, eps: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """Return Eq. 14: mean_b [ w_b * sum_dims (eps_theta - eps)^2 ]."""
    return (weights * (eps_pred - eps).pow(2).sum(dim=-1)).mean()


# --------------------------------------------------------------------------- the model

class FisorModel(nn.Module):
    """
    All FISOR networks, plus sampling and action selection with explicit noise.

    Networks: ``actor`` (trained noise model), ``actor_ema`` (its EMA, used for sampling), the
    critics ``q`` (the Q_r heads, then the Q_h heads), ``q_target`` and ``v`` (V_r, then V_h),
    and the ``schedule`` buffers. ``q_r``, ``q_h``, ``q_r_target``, ``q_h_target``, ``v_r`` and
    ``v_h`` evaluate one critic alone. Observations are raw (the official code does not
    normalise them); actions live in [-1, 1].

    The reward and the feasibility critics are independent networks with losses of their own (no
    parameter is shared, no loss reads the other's parameters), as in the official code; they are
    stored as one ensemble per kind so that a critic update evaluates both in one batched product
    and steps them with one optimiser call (``FisorTrainer.critic_update``).
    """

    def __init__(self, obs_dim: int, act_dim: int, config: FisorConfig):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.diffusion_steps = config.diffusion_steps
        self.clip_sampler = config.clip_sampler
        self.ddpm_temperature = config.ddpm_temperature
        self.num_candidates = config.num_candidates
        self.selection = config.selection
        self.fallback_candidates = config.fallback_candidates
        self.actor = EpsilonNet(obs_dim, act_dim, config.actor_hidden, config.actor_blocks,
                                config.actor_dropout, config.time_dim, config.cond_hidden,
                                num_steps=config.diffusion_steps)
        self.actor_ema = deepcopy(self.actor)
        heads = config.num_q_heads
        self.reward_heads, self.feasibility_heads = slice(0, heads), slice(heads, 2 * heads)
        self.q = QEnsemble(obs_dim, act_dim, config.critic_hidden, 2 * heads)
        self.q_target = deepcopy(self.q)
        self.v = EnsembleMLP(obs_dim, config.critic_hidden, len(VALUES))
        self.schedule = DiffusionSchedule(config.diffusion_steps, config.beta_min,
                                          config.beta_max)
        for frozen in (self.actor_ema, self.q_target):
            frozen.requires_grad_(False)
        self.actor_ema.eval()
        self.register_load_state_dict_pre_hook(_stack_separate_critics)

    # one critic alone: [heads, B] for a Q, [B] for a V
    def q_r(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.q(obs, act, self.reward_heads)

    def q_h(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.q(obs, act, self.feasibility_heads)

    def q_r_target(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.q_target(obs, act, self.reward_heads)

    def q_h_target(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.q_target(obs, act, self.feasibility_heads)

    def v_r(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs, VALUES['v_r'])[0]

    def v_h(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs, VALUES['v_h'])[0]

    @staticmethod
    def split_values(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (V_r, V_h), each [B], of the [2, B] output of ``v``."""
        return values[VALUES['v_r']][0], values[VALUES['v_h']][0]

    def train(self, mode: bool = True):
        """Set training mode; the EMA sampling copy always stays in eval mode (no dropout)."""
        super().train(mode)
        self.actor_ema.eval()
        return self

    # ---------------------------------------------------------------- inference
    def noise_shape(self, batch: int, num_candidates: Optional[int] = None) -> Tuple[int, ...]:
        """Return the shape of the sampler noise: [batch, N, T + 1, act_dim]."""
        num = self.num_candidates if num_candidates is None else num_candidates
        return (batch, num, self.diffusion_steps + 1, self.act_dim)

    def sample_noise(self, batch: int, num_candidates: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
        """Draw standard normal sampler noise of noise_shape(batch, num_candidates)."""
        device = device if device is not None else self.schedule.betas.device
        return torch.randn(self.noise_shape(batch, num_candidates), generator=generator,
                           device=device)

    def sample_candidates(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Denoise ``noise`` [B, N, T+1, A] into N candidate actions per state: [B, N, A]."""
        return ddpm_sample(self.actor_ema, self.schedule, obs, noise, clip=self.clip_sampler,
                           temperature=self.ddpm_temperature)

    def q_h_max(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return max_j Qbar_h^j(s, a) over the target heads (what FISOR selects with): [B]."""
        return self.q_h_target(obs, act).max(dim=0).values

    def q_r_min(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return min_j Qbar_r^j(s, a) over the target heads (pessimistic reward value): [B]."""
        return self.q_r_target(obs, act).min(dim=0).values

    @staticmethod
    def _per_candidate(value, obs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Return value(s, a) [B * N] of every candidate [B, N, A] of its state, as [B, N]."""
        batch, num, act_dim = candidates.shape
        obs_rep = obs.unsqueeze(1).expand(batch, num, obs.shape[-1]).reshape(batch * num, -1)
        return value(obs_rep, candidates.reshape(batch * num, act_dim)).reshape(batch, num)

    @staticmethod
    def _gather(candidates: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Return candidates[b, best[b]]: [B, A]."""
        index = best.view(-1, 1, 1).expand(-1, 1, candidates.shape[-1])
        return torch.gather(candidates, 1, index).squeeze(1)

    def select_safest(self, obs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """
        Return, per state, the candidate [B, N, A] with the smallest max-of-heads Q_h: [B, A].

        This is FISOR's action selection ('minqc') and also the infeasible-region (fallback)
        policy: argmin Q_h ignores reward and picks the action that minimises the worst future
        violation. Ties go to the first candidate (as torch.argmin and ONNX ArgMin do).
        """
        q_h = self._per_candidate(self.q_h_max, obs, candidates)
        return self._gather(candidates, torch.argmin(q_h, dim=1))

    def select_feasible_best(self, obs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """
        Return the candidate with the largest Q_r among those with max-of-heads Q_h <= 0.

        Our option (``selection='feasible-maxq'``), not the paper's: 'minqc' takes the safest
        candidate even deep inside the feasible region, where every candidate keeps the state
        feasible, and so gives up reward there. Here the feasibility critic only vetoes; reward
        (min over the Q_r target heads) chooses among the candidates it lets through. Where no
        candidate is feasible, the argmin-Q_h candidate, as 'minqc'.
        """
        q_h = self._per_candidate(self.q_h_max, obs, candidates)
        q_r = self._per_candidate(self.q_r_min, obs, candidates)
        feasible = q_h <= 0   # a NaN Q_h is not feasible
        # Finite reward scores for the feasible candidates (a NaN or -inf Q_r ranks last among
        # them but above every infeasible one), so argmax never lands on an infeasible candidate.
        lowest = torch.finfo(q_r.dtype).min
        score = torch.nan_to_num(q_r, nan=lowest, neginf=lowest)
        best_reward = torch.argmax(torch.where(feasible, score, torch.full_like(q_r, -math.inf)),
                                   dim=1)
        any_feasible = feasible.to(q_h.dtype).amax(dim=1) > 0
        best = torch.where(any_feasible, best_reward, torch.argmin(q_h, dim=1))
        return self._gather(candidates, best)

    def act(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Return FISOR's action [B, A]: N DDPM candidates, then the configured selection."""
        candidates = self.sample_candidates(obs, noise)
        if self.selection == 'feasible-maxq':
            return self.select_feasible_best(obs, candidates)
        return self.select_safest(obs, candidates)

    def fallback(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """
        Return the infeasible-region (recovery) action: the same argmin-Q_h selection.

        Pass noise with ``fallback_candidates`` candidates to search more actions than the
        policy does.
        """
        return self.select_safest(obs, self.sample_candidates(obs, noise))

    def feasibility(self, obs: torch.Tensor, act: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (V_h(s), max_j Qbar_h^j(s, a)), each [B]; <= 0 means feasible."""
        return self.v_h(obs), self.q_h_max(obs, act)

    def export_modules(self) -> Dict[str, nn.Module]:
        """Return the modules the ONNX export traces: policy, critic and fallback."""
        # policy: (observation [B, obs], noise [B, N, T+1, A]) -> action [B, A]; fallback: the
        # argmin max-of-heads Q_h over the candidates of its noise; critic: (observation,
        # action) -> (v_h [B], q_h [B])
        return {'policy': ExportedMethod(self, 'act'),
                'critic': ExportedMethod(self, 'feasibility'),
                'fallback': ExportedMethod(self, 'fallback')}


def _stack_separate_critics(module, state_dict, prefix, *_) -> None:
    """
    Read a model saved while the reward and feasibility critics were separate modules.

    Before the critics were stacked (``FisorModel``), a checkpoint held ``q_r``/``q_h`` (and
    their targets) as two ensembles and ``v_r``/``v_h`` as two ``nn.Linear`` MLPs; this rewrites
    those entries into the stacked layout in place, so that an interrupted run resumes. A
    checkpoint that also holds stacked entries, or whose two halves do not have this model's
    number of heads, is left as it is: load_state_dict then names the keys it cannot place.
    """
    if any(key.startswith((prefix + 'q.', prefix + 'q_target.', prefix + 'v.'))
           for key in state_dict):
        return
    heads = module.reward_heads.stop
    pairs = (('q.', 'q_r.', 'q_h.'), ('q_target.', 'q_r_target.', 'q_h_target.'),
             ('v.', 'v_r.', 'v_h.'))
    for stacked, first, second in pairs:
        for key in [k for k in state_dict if k.startswith(prefix + first)]:
            rest = key[len(prefix + first):]
            other = prefix + second + rest
            pair = (state_dict[key], state_dict.get(other))
            if not all(isinstance(t, torch.Tensor) for t in pair):
                continue
            if stacked == 'v.':
                if pair[0].shape != pair[1].shape or pair[0].dim() not in (1, 2):
                    continue
                merged = _linear_as_members(pair)
            elif pair[0].dim() == 0 or any(t.shape[0] != heads for t in pair):
                continue
            else:
                merged = torch.cat(pair)
            del state_dict[key], state_dict[other]
            state_dict[prefix + stacked + rest] = merged


def _linear_as_members(pair) -> torch.Tensor:
    """Stack two nn.Linear tensors (weight [out, in], bias [out]) as ensemble members."""
    return torch.stack([t.T if t.dim() == 2 else t.unsqueeze(0) for t in pair])


def _stack_adam_states(first: dict, second: dict, linear: bool) -> dict:
    """
    Merge the Adam states of two separate critics into the state of their stacked ensemble.

    Raises ValueError (a resume turns it into a ConfigError naming the checkpoint) when the two
    states do not describe the same parameters stepped the same number of times.
    """
    def merge(name, a, b):
        if not isinstance(a, torch.Tensor) or a.dim() == 0:   # the step count
            if not (a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)):
                raise ValueError(f'the two critics were stepped {a} and {b} times')
            return a.clone() if isinstance(a, torch.Tensor) else a   # Adam steps it in place
        if a.shape != b.shape:
            raise ValueError(f'{name}: shapes {tuple(a.shape)} and {tuple(b.shape)}')
        return _linear_as_members((a, b)) if linear else torch.cat((a, b))
    try:
        if first['state'].keys() != second['state'].keys():
            raise ValueError('the two critics have state for different parameters')
        state = {index: {name: merge(name, value, second['state'][index][name])
                         for name, value in entry.items()}
                 for index, entry in first['state'].items()}
        return {'state': state, 'param_groups': first['param_groups']}
    except (AttributeError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"the separate critics' optimiser states are malformed ({error!r})"
                         ) from None


def build_model(obs_dim: int, act_dim: int, config: FisorConfig) -> FisorModel:
    """Return a freshly initialised FisorModel."""
    return FisorModel(obs_dim, act_dim, config)


# --------------------------------------------------------------------------- training

def cosine_decay(step: int, decay_steps: int, alpha: float = 0.0) -> float:
    """Return the cosine-decay factor at ``step`` (optax.cosine_decay_schedule, 1 -> alpha)."""
    progress = min(max(step, 0), decay_steps) / max(decay_steps, 1)
    return alpha + (1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_lr_scheduler(optimizer: torch.optim.Optimizer, decay_steps: int):
    """Return a LambdaLR that decays the optimizer's learning rate with cosine_decay."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_decay(step, decay_steps))


def prepare_arrays(data: Dict[str, np.ndarray], config: FisorConfig) -> Dict[str, np.ndarray]:
    """
    Turn a DSRL dataset dict into the arrays FISOR trains on.

    Actions are clipped to +-(1 - 1e-5), rewards multiplied by reward_scale, costs relabelled to
    h, and mask = 1 - (terminal or timeout): the official code cuts bootstrapping at timeouts.
    """
    if config.normalize_returns and config.reward_scale is None:
        raise ValueError('FisorConfig.reward_scale is unset; call resolve_config(config, task) '
                         'or set normalize_returns=False')
    scale = config.reward_scale if config.normalize_returns else 1.0
    costs = np.asarray(data['costs'], dtype=np.float32).reshape(-1)
    done = (np.asarray(data['terminals']).reshape(-1) > 0) | \
        (np.asarray(data['timeouts']).reshape(-1) > 0)
    return {
        'obs': np.asarray(data['observations'], dtype=np.float32),
        'act': clip_actions(data['actions']),
        'reward': np.asarray(data['rewards'], dtype=np.float32).reshape(-1) * scale,
        'h': np.where(costs > 0, config.violation_value, config.safe_value).astype(np.float32),
        'next_obs': np.asarray(data['next_observations'], dtype=np.float32),
        'mask': (~done).astype(np.float32),
    }


@dataclass
class SharedForwards:
    """
    The target critics and the values on one batch, read by Eq. 13's weights and by the critics.

    q_r_targets, q_h_targets: [heads, B] target Q_r and Q_h (no graph); v_r, v_h: [B] with their
    graphs, so that Eq. 15's and Eq. 8's losses can use them (None where compiled steps evaluate
    the values themselves).
    """

    q_r_targets: torch.Tensor
    q_h_targets: torch.Tensor
    v_r: Optional[torch.Tensor]
    v_h: Optional[torch.Tensor]

    def weights(self, config: FisorConfig) -> torch.Tensor:
        """Return the policy weights of Eq. 13 (min over the Q_r heads, max over the Q_h heads)."""
        return policy_weights(self.q_r_targets.min(dim=0).values, self.v_r.detach(),
                              self.q_h_targets.max(dim=0).values, self.v_h.detach(), config)


class FisorTrainer:
    """Optimisers and the one-iteration update of the official code (or critics-first)."""

    # joint schedule: evaluate the target critics and the values once for the first actor half and
    # the critics (same numbers either way; bench/bench_fisor_kernels.py turns it off to compare)
    share_forwards = True

    def __init__(self, model: FisorModel, config: FisorConfig):
        self.model, self.config = model, config
        # AdamW with weight decay 0 and a cosine-decayed learning rate, as optax in the code.
        self.actor_opt = adam(model.actor.parameters(), lr=config.actor_lr, weight_decay=0.0)
        self.actor_sched = cosine_lr_scheduler(self.actor_opt, config.actor_decay_steps)
        # critics-first bookkeeping: iterations done, where the actor phase began, the last
        # snapshot (feasible fraction, weights on the probe) and the frozen per-transition weights
        self.iteration = 0
        self.actor_start: Optional[int] = None
        self.snapshot: Optional[Dict[str, torch.Tensor]] = None
        self.weights: Optional[torch.Tensor] = None
        self.weight_mean = 0.0
        # train() may change steps after the config was made (--steps): check again here.
        config.check_critic_phase()
        self.critic_cap = config.critic_phase_cap()
        # Q_r and Q_h (and V_r and V_h) step in one call: Adam is elementwise and the two share
        # their learning rate, so this is the official code's two optimisers exactly.
        self.q_opt = adam(model.q.parameters(), lr=config.critic_lr)
        self.v_opt = adam(model.v.parameters(), lr=config.value_lr)
        # the gradient steps as compiled programs (compiled_steps, on a CPU); the summary
        # of a run reports compiled_status
        self.compiled: Optional[CompiledSteps] = None
        if config.compiled_steps == 'never':
            self.compiled_status = 'compiled steps: off (compiled_steps=never)'
        elif next(model.parameters()).device.type != 'cpu':
            self.compiled_status = 'compiled steps: off (measured on CPUs only; eager steps)'
        elif config.compiled_steps == 'auto' and config.steps < COMPILE_MIN_STEPS:
            self.compiled_status = (f'compiled steps: off (auto: {config.steps} iterations, fewer '
                                    f'than the {COMPILE_MIN_STEPS} that repay compiling)')
        else:
            self.compiled_status = 'compiled steps: on, not compiled yet'
            self.compiled = CompiledSteps(self)

    def batch_weights(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Return Eq. 13's weights of (obs, act) from the current critics and values."""
        with torch.no_grad():
            return self.shared_forwards(obs, act).weights(self.config)

    def shared_forwards(self, obs: torch.Tensor, act: torch.Tensor) -> SharedForwards:
        """Evaluate the target critics and the values on (obs, act): Eq. 13's and Eq. 8/15's."""
        m = self.model
        with torch.no_grad():
            q_targets = m.q_target(obs, act)
        return SharedForwards(q_targets[m.reward_heads], q_targets[m.feasibility_heads],
                              *m.split_values(m.v(obs)))

    def actor_update(self, batch: Dict[str, torch.Tensor],
                     weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One weighted denoising step (Eq. 14) on ``batch``; weights from Eq. 13 if not given."""
        m, c = self.model, self.config
        obs, act = batch['obs'], batch['act']
        if weights is None:
            weights = self.batch_weights(obs, act)
        t = torch.randint(0, c.diffusion_steps, (obs.shape[0],), device=obs.device)
        eps = torch.randn_like(act)
        loss = masks = None
        if self.compiled is not None:
            # drawn here, in the order the eager forward draws them, and kept for it should
            # the program fail to compile: the run then draws what an eager run draws
            masks = m.actor.body.dropout_masks(obs)
            loss = self.compiled.actor_step(obs, act, weights, t, eps, masks)
        if loss is None:
            a_t = m.schedule.q_sample(act, t, eps)
            eps_pred = m.actor(a_t, obs, t.to(obs.dtype).unsqueeze(-1), masks)
            loss = weighted_denoising_loss(eps_pred, eps, weights)
            descend(self.actor_opt, loss, average=(m.actor_ema, m.actor, c.actor_ema))
        self.actor_sched.step()
        return {'loss/actor': loss.detach(), 'weights/mean': weights.mean(),
                'weights/zero_fraction': (weights == 0).float().mean()}

    def critic_update(self, batch: Dict[str, torch.Tensor],
                      shared: Optional[SharedForwards] = None) -> Dict[str, torch.Tensor]:
        """
        V_r (Eq. 15) and V_h (Eq. 8), then Q_r (Eq. 16) and Q_h (Eq. 9).

        The code's order is V_r, Q_r, V_h, Q_h; the reward and the feasibility critics never read
        each other, so stepping both values and then both critics is the same update. Each step
        takes the sum of the two losses: the two networks share no parameter, so every parameter
        gets exactly its own loss's gradient. ``shared``: shared_forwards() of this batch's (obs,
        act) taken since the last critic update (its V_r and V_h with their graphs), so that they
        are not evaluated twice.
        """
        m, c = self.model, self.config
        obs, act, next_obs, mask = batch['obs'], batch['act'], batch['next_obs'], batch['mask']
        if self.compiled is not None:
            if shared is None:
                with torch.no_grad():
                    q_targets = m.q_target(obs, act)
                q_r_targets = q_targets[m.reward_heads]
                q_h_targets = q_targets[m.feasibility_heads]
            else:
                q_r_targets, q_h_targets = shared.q_r_targets, shared.q_h_targets
            losses = self.compiled.critic_step(q_r_targets, q_h_targets, batch)
            if losses is not None:
                v_r_loss, q_r_loss, v_h_loss, q_h_loss, v_h = losses
                return {'loss/v_r': v_r_loss, 'loss/q_r': q_r_loss, 'loss/v_h': v_h_loss,
                        'loss/q_h': q_h_loss, 'value/v_h_mean': v_h.mean(),
                        'value/feasible_fraction': (v_h <= 0).float().mean()}
            shared = None                 # compiling failed: the eager step, graphs included
        if shared is None or shared.v_r is None:
            shared = self.shared_forwards(obs, act)
        v_r_loss = reward_value_loss(shared.q_r_targets, shared.v_r, c.expectile)
        v_h = shared.v_h
        v_h_loss = feasible_value_loss(shared.q_h_targets, v_h, c.feasibility_expectile)
        descend(self.v_opt, v_r_loss + v_h_loss)

        with torch.no_grad():
            v_r_next, v_h_next = m.split_values(m.v(next_obs))
            target_r = reward_target(batch['reward'], v_r_next, mask, c.gamma)
            target_h = feasible_bellman_target(batch['h'], v_h_next, mask, c.gamma)
        q = m.q(obs, act)
        q_r_loss = critic_mse(q[m.reward_heads], target_r)
        q_h_loss = critic_mse(q[m.feasibility_heads], target_h)
        descend(self.q_opt, q_r_loss + q_h_loss, average=(m.q_target, m.q, c.critic_tau))
        return {'loss/v_r': v_r_loss.detach(), 'loss/q_r': q_r_loss.detach(),
                'loss/v_h': v_h_loss.detach(), 'loss/q_h': q_h_loss.detach(),
                'value/v_h_mean': v_h.detach().mean(),
                'value/feasible_fraction': (v_h.detach() <= 0).float().mean()}

    def update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """
        One training iteration of the configured schedule.

        joint (the paper's): two actor updates on halves of the batch, then the critics; the actor
        weights use the critics as they are before this iteration's critic updates, and the
        critics train on the first critic_batch_size rows, as in the official code.
        critics-first: a critic-only iteration until the critics settle, then actor-only ones.
        """
        self.iteration += 1
        if self.config.schedule == 'critics-first':
            if self.actor_start is None:
                return self._critic_phase_update(buffer)
            return self._actor_phase_update(buffer)
        return self._joint_update(buffer)

    def _joint_update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        c = self.config
        batch = buffer.sample(c.actor_batch_size * c.actor_updates_per_step)
        logs: Dict[str, torch.Tensor] = {}
        shared = None
        for k in range(c.actor_updates_per_step):
            part = slice(k * c.actor_batch_size, (k + 1) * c.actor_batch_size)
            half = {key: v[part] for key, v in batch.items()}
            weights = None
            share = self.share_forwards and k == 0 and c.critic_batch_size == c.actor_batch_size
            if self.compiled is not None:
                # Eq. 13's weights of the half, and its target critics for the critic step
                targets = self.compiled.targets_and_weights(half['obs'], half['act'])
                if targets is not None:
                    weights = targets[2]
                    if share:
                        shared = SharedForwards(targets[0], targets[1], None, None)
            elif share:
                # The critic update below reads these same rows with the same (not yet updated)
                # target critics and values: evaluate them once for both, as the official code's
                # single jitted update does (XLA merges the repeated computation). Same numbers.
                shared = self.shared_forwards(half['obs'], half['act'])
                weights = shared.weights(c)    # of targets and detached values: no graph
            logs.update(self.actor_update(half, weights))
        critic_part = {key: v[:c.critic_batch_size] for key, v in batch.items()}
        logs.update(self.critic_update(critic_part, shared))
        logs['lr/actor'] = torch.tensor(self.actor_sched.get_last_lr()[0])
        return logs

    # -- critics-first -------------------------------------------------------------------------

    def _critic_phase_update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        c = self.config
        logs = self.critic_update(buffer.sample(c.critic_batch_size))
        if self.iteration % c.critic_check_every == 0 or self.iteration >= self.critic_cap:
            settled, measures = self._take_snapshot(buffer)
            logs.update(measures)
            if settled or self.iteration >= self.critic_cap:
                self._start_actor_phase(buffer)
                logs['schedule/actor_start'] = torch.tensor(float(self.iteration))
        return logs

    def _probe(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """Return a fixed, seeded subset of the transitions (the snapshots' yardstick)."""
        generator = torch.Generator(device='cpu').manual_seed(0)
        size = min(self.config.settle_probe_size, buffer.size)
        index = torch.randperm(buffer.size, generator=generator)[:size].to(buffer.device)
        return {key: value.index_select(0, index) for key, value in buffer.data.items()}

    def _take_snapshot(self, buffer: ReplayBuffer) -> Tuple[bool, Dict[str, torch.Tensor]]:
        """
        Measure how much the critics still move; return (settled, measures).

        Settled: between this snapshot and the previous one the feasible fraction (V_h <= 0 on
        the probe) changed by less than settle_feasible_change and the Spearman correlation of
        Eq. 13's weights on the probe is above settle_weight_rank.
        """
        c, probe = self.config, self._probe(buffer)
        with torch.no_grad():
            feasible = (self.model.v_h(probe['obs']) <= 0).float().mean()
            weights = self.batch_weights(probe['obs'], probe['act'])
        measures = {'schedule/feasible_fraction': feasible}
        settled = False
        if self.snapshot is not None:
            change = (feasible - self.snapshot['feasible']).abs()
            rank = spearman(weights, self.snapshot['weights'])
            measures.update({'schedule/feasible_change': change, 'schedule/weight_rank': rank})
            settled = bool(change < c.settle_feasible_change and rank > c.settle_weight_rank)
        self.snapshot = {'feasible': feasible.cpu(), 'weights': weights.cpu()}
        return settled, measures

    def _start_actor_phase(self, buffer: ReplayBuffer) -> None:
        """Freeze the critics; stretch the actor's cosine schedule over the iterations left."""
        self.actor_start = self.iteration
        self._stretch_actor_schedule()
        self._freeze_weights(buffer)

    def _stretch_actor_schedule(self) -> None:
        """Decay the actor's learning rate over the actor updates left after actor_start."""
        c = self.config
        left = max(c.steps - self.actor_start, 1) * c.actor_updates_per_step
        self.actor_sched = cosine_lr_scheduler(self.actor_opt, left)

    def _freeze_weights(self, buffer: ReplayBuffer) -> None:
        """Compute the frozen weights of every transition, and their mean once."""
        self.weights = self.transition_weights(buffer)
        self.weight_mean = float(self.weights.mean())
        if self.weight_mean <= 0:
            raise ConfigError('critics-first: Eq. 13 gives every transition weight 0 (no feasible '
                              'state-action pair and no infeasible state); the actor would learn '
                              'nothing. Train the critics longer (critic_steps) or check the data')

    def transition_weights(self, buffer: ReplayBuffer, chunk: int = 8192) -> torch.Tensor:
        """Return Eq. 13's weight of every transition of ``buffer`` (frozen critics)."""
        obs, act = buffer.data['obs'], buffer.data['act']
        return torch.cat([self.batch_weights(obs[i:i + chunk], act[i:i + chunk])
                          for i in range(0, buffer.size, chunk)])

    def _actor_phase_update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        c = self.config
        if self.weights is None:                      # resumed in the actor phase
            self._freeze_weights(buffer)
        logs: Dict[str, torch.Tensor] = {}
        for _ in range(c.actor_updates_per_step):
            if c.actor_sampling == 'weighted-sampling':
                index = torch.multinomial(self.weights, c.actor_batch_size, replacement=True,
                                          generator=buffer.generator)
                # E_{i ~ w / sum w}[loss_i] * mean(w) = E_{i uniform}[w_i loss_i]: Eq. 14.
                weights = torch.full((c.actor_batch_size,), self.weight_mean,
                                     device=buffer.device)
            else:
                index = buffer.sample_indices(c.actor_batch_size)
                weights = self.weights.index_select(0, index)
            batch = {key: value.index_select(0, index) for key, value in buffer.data.items()}
            logs.update(self.actor_update(batch, weights))
        logs['lr/actor'] = torch.tensor(self.actor_sched.get_last_lr()[0])
        logs['schedule/actor_start'] = torch.tensor(float(self.actor_start))
        return logs

    def state_dict(self) -> dict:
        """Return the optimiser and scheduler states (the model is saved separately)."""
        return {'actor_opt': self.actor_opt.state_dict(),
                'actor_sched': self.actor_sched.state_dict(),
                'q_opt': self.q_opt.state_dict(), 'v_opt': self.v_opt.state_dict(),
                'iteration': self.iteration, 'actor_start': self.actor_start,
                'snapshot': self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        """Restore the states saved by state_dict() (the frozen weights are recomputed)."""
        self.iteration = int(state.get('iteration', 0))
        self.actor_start = state.get('actor_start')
        self.snapshot = state.get('snapshot')
        if self.actor_start is not None:
            self._stretch_actor_schedule()
        self.actor_opt.load_state_dict(state['actor_opt'])
        self.actor_sched.load_state_dict(state['actor_sched'])
        if 'q_opt' not in state and 'q_r_opt' in state:
            # saved while the reward and feasibility critics had optimisers of their own
            state = {**state,
                     'q_opt': _stack_adam_states(state['q_r_opt'], state['q_h_opt'], False),
                     'v_opt': _stack_adam_states(state['v_r_opt'], state['v_h_opt'], True)}
        self.q_opt.load_state_dict(state['q_opt'])
        self.v_opt.load_state_dict(state['v_opt'])


class CompiledSteps:
    """
    FISOR's gradient steps as programs compiled by torch.compile (FisorConfig.compiled_steps).

    Each program holds what an eager step issues operation by operation: the loss through the
    model's own modules (torch.func.functional_call; while compiling, the networks take their
    torch-operator forms), its gradient (torch.func.grad_and_value), the optimiser's update on
    its own state and the average of the EMA or target network (infrastructure.adam_update_).
    Random numbers are drawn outside, in the eager step's order (time steps, noise, dropout
    masks), so a compiled run draws the numbers an eager run draws; the arithmetic is the same
    to rounding. A program that fails to compile on its first call (no C++ compiler, an
    operator the compiler refuses) turns compiled steps off for the run, with a warning and
    the reason in ``FisorTrainer.compiled_status`` (the run's summary).
    """

    def __init__(self, trainer: 'FisorTrainer'):
        self.trainer = trainer
        m = trainer.model
        self.names = {'actor': [n for n, _ in m.actor.named_parameters()],
                      'v': [n for n, _ in m.v.named_parameters()],
                      'q': [n for n, _ in m.q.named_parameters()]}
        self.programs = {'actor': torch.compile(self._actor_program, fullgraph=True),
                         'critics': torch.compile(self._critic_program, fullgraph=True),
                         'weights': torch.compile(self._weights_program, fullgraph=True)}
        self.ran = set()

    def targets_and_weights(self, obs, act):
        """Return (target Q_r [heads, B], target Q_h [heads, B], Eq. 13's weights [B]) or None."""
        with torch.no_grad():
            return self._run('weights', obs, act)

    def actor_step(self, obs, act, weights, t, eps, masks) -> Optional[torch.Tensor]:
        """Eq. 14's step (with the EMA); the loss, or None where it ran no compiled program."""
        tr, m = self.trainer, self.trainer.model
        tensors = adam_tensors(tr.actor_opt)
        if tensors is None:
            return self._off('the actor optimiser is not a one-group Adam the step implements')
        ema = [p.detach() for p in m.actor_ema.parameters()]
        lr = torch.tensor(tr.actor_opt.param_groups[0]['lr'], dtype=torch.float32)
        return self._run('actor', tensors, ema, lr, obs, act, weights, t, eps, masks)

    def critic_step(self, q_r_targets, q_h_targets, batch):
        """V_r, V_h (Eq. 15, 8), then Q_r, Q_h (Eq. 16, 9) with the targets' average."""
        tr, m = self.trainer, self.trainer.model
        v_tensors, q_tensors = adam_tensors(tr.v_opt), adam_tensors(tr.q_opt)
        if v_tensors is None or q_tensors is None:
            return self._off('a critic optimiser is not a one-group Adam the step implements')
        lrs = [torch.tensor(o.param_groups[0]['lr'], dtype=torch.float32)
               for o in (tr.v_opt, tr.q_opt)]
        targets = [p.detach() for p in m.q_target.parameters()]
        return self._run('critics', v_tensors, q_tensors, targets, *lrs, q_r_targets,
                         q_h_targets, batch['obs'], batch['act'], batch['next_obs'],
                         batch['reward'], batch['h'], batch['mask'])

    def _run(self, name, *args):
        if name in self.ran:
            return self.programs[name](*args)
        try:
            out = self.programs[name](*args)
        except Exception as error:   # noqa: B902 -- whatever stopped the compiler, said below
            text = (str(error).strip().splitlines() or [''])[0][:200]
            return self._off(f'torch.compile failed: {type(error).__name__}: {text}')
        self.ran.add(name)
        self.trainer.compiled_status = ('compiled steps: on (' + ', '.join(sorted(self.ran))
                                        + ' compiled by torch.compile)')
        return out

    def _off(self, reason: str) -> None:
        self.trainer.compiled = None
        self.trainer.compiled_status = f'compiled steps: off ({reason}); eager steps'
        warnings.warn(self.trainer.compiled_status, RuntimeWarning, stacklevel=3)
        return None

    def _weights_program(self, obs, act):
        shared = self.trainer.shared_forwards(obs, act)
        return shared.q_r_targets, shared.q_h_targets, shared.weights(self.trainer.config)

    def _actor_program(self, tensors, ema, lr, obs, act, weights, t, eps, masks):
        m, c = self.trainer.model, self.trainer.config

        def loss(params):
            a_t = m.schedule.q_sample(act, t, eps)
            eps_pred = functional_call(m.actor, dict(zip(self.names['actor'], params)),
                                       (a_t, obs, t.to(obs.dtype).unsqueeze(-1)),
                                       {'masks': masks})
            return weighted_denoising_loss(eps_pred, eps, weights)
        grads, value = grad_and_value(loss)(tensors.params)
        adam_update_(tensors, grads, lr, ema, c.actor_ema)
        return value.detach()

    def _critic_program(self, v_tensors, q_tensors, targets, v_lr, q_lr, q_r_targets,
                        q_h_targets, obs, act, next_obs, reward, h, mask):
        m, c = self.trainer.model, self.trainer.config

        def value_loss(params):
            v_r, v_h = m.split_values(functional_call(m.v, dict(zip(self.names['v'], params)),
                                                      (obs,)))
            v_r_loss = reward_value_loss(q_r_targets, v_r, c.expectile)
            v_h_loss = feasible_value_loss(q_h_targets, v_h, c.feasibility_expectile)
            return v_r_loss + v_h_loss, (v_r_loss, v_h_loss, v_h)
        grads, (_, (v_r_loss, v_h_loss, v_h)) = grad_and_value(value_loss, has_aux=True)(
            v_tensors.params)
        adam_update_(v_tensors, grads, v_lr)
        v_r_next, v_h_next = m.split_values(
            functional_call(m.v, dict(zip(self.names['v'], v_tensors.params)), (next_obs,)))
        target_r = reward_target(reward, v_r_next, mask, c.gamma)
        target_h = feasible_bellman_target(h, v_h_next, mask, c.gamma)

        def critic_loss(params):
            q = functional_call(m.q, dict(zip(self.names['q'], params)), (obs, act))
            q_r_loss = critic_mse(q[m.reward_heads], target_r)
            q_h_loss = critic_mse(q[m.feasibility_heads], target_h)
            return q_r_loss + q_h_loss, (q_r_loss, q_h_loss)
        grads, (_, (q_r_loss, q_h_loss)) = grad_and_value(critic_loss, has_aux=True)(
            q_tensors.params)
        adam_update_(q_tensors, grads, q_lr, targets, c.critic_tau)
        return (v_r_loss.detach(), q_r_loss.detach(), v_h_loss.detach(), q_h_loss.detach(),
                v_h.detach())


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the Spearman rank correlation of two vectors (ties broken by position)."""
    def ranks(x):
        return torch.argsort(torch.argsort(x, stable=True), stable=True).to(torch.float64)
    ra, rb = ranks(a.cpu()), ranks(b.cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / torch.sqrt((ra * ra).sum() * (rb * rb).sum()).clamp_min(1e-12)


def make_trainer(model: FisorModel, config: FisorConfig) -> FisorTrainer:
    """Return the trainer of ``model``."""
    return FisorTrainer(model, config)


# --------------------------------------------------------------------------- export

def export_plan(model: FisorModel, config: FisorConfig) -> ExportPlan:
    """
    Return FISOR's graphs: sampler policy, feasibility critic and argmin-Q_h fallback.

    ``policy(observation, noise) -> action`` is the whole sampler of Sec. 3.4 (N candidates, T
    DDPM steps, argmin over the max of the Q_h heads; with ``selection='feasible-maxq'`` the
    best-Q_r feasible candidate instead); ``critic(observation, action) -> v_h,
    q_h``; ``fallback`` is the same sampler over ``fallback_candidates``, the infeasible-region
    behaviour of Eq. 13 evaluated greedily. The candidate counts are the model's (export may
    change them). FISOR trains on raw observations (the official code does not normalise them),
    so the graphs carry no normalisation.
    """
    modules = model.export_modules()
    obs_dim, act_dim = model.obs_dim, model.act_dim
    steps = model.diffusion_steps + 1  # x_T plus one draw per denoising step
    graphs = {
        'policy': GraphSpec(modules['policy'],
                            {'observation': batch_shape(obs_dim),
                             'noise': batch_shape(model.num_candidates, steps, act_dim)},
                            {'action': batch_shape(act_dim)}),
        'critic': GraphSpec(modules['critic'],
                            {'observation': batch_shape(obs_dim), 'action': batch_shape(act_dim)},
                            {'v_h': batch_shape(), 'q_h': batch_shape()}),
        'fallback': GraphSpec(modules['fallback'],
                              {'observation': batch_shape(obs_dim),
                               'noise': batch_shape(model.fallback_candidates, steps, act_dim)},
                              {'action': batch_shape(act_dim)}),
    }
    # FISOR's signs: h = -1 safe, +M unsafe, so <= 0 is feasible for both V_h and Q_h (Sec. 3).
    critic = {'kind': 'feasibility', 'threshold_v': 0.0, 'threshold_q': 0.0}
    extra = {'num_candidates': model.num_candidates, 'diffusion_steps': model.diffusion_steps,
             'fallback_candidates': model.fallback_candidates,
             'selection': SELECTION_TEXT[model.selection]}
    return ExportPlan(NAME, graphs, critic, extra=extra)
