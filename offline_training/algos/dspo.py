"""
DSPO: diffusion-guided safe policy optimisation from a dataset without cost labels.

"Diffusion-guided Safe Policy Optimization from Cost-Label-Free Offline Dataset" (anonymous ICLR
submission, openreview ZGqlkqAt18; no public code). The agent gets a few safe demonstrations
D^S and a larger unlabelled dataset D^U of states, actions and rewards, never a cost. Its text
lost the tables, the pseudo-code (App. D.2) and every hyperparameter; what is built here is the
reading that docs/algorithms.md ("DSPO") states, with every choice where the paper is silent.

Training has three stages, one trainer iteration updating the stage it is in:

1. SafetyTransformer D_phi(tau) (Sec. 3.1, Fig. 2): a causal GPT over interleaved state and
   action tokens with timestep embeddings; x_t, the output at the action token of step t, goes
   through Preference-Transformer-style attention pooling with scalar values,
   z_t = sum_s softmax_s(q_t . k_s) v_s, and z_tau = sigmoid(mean_t z_t). Loss: Eq. 1 (D^S
   positive, D^U negative) plus lambda times the vCLUB upper bound of I(z_tau; r_tau) (Eq. 4,
   its negative term from shuffled returns), with q_theta(r | z) a 10-bin return classifier
   trained by maximum likelihood on matched pairs (Eq. 5) in alternation with phi.
2. Every trajectory is labelled with (r_tau, z_tau); a conditional DDPM over (s, a) windows
   with the condition (r_tau, z_tau) of the window's trajectory and classifier-free guidance
   (Eq. 6; offline_training.algos.trajectory_diffusion, shared with OASIS) is trained on them.
3. D^G is sampled with r in the demonstrations' return range and z = the smallest z of the
   demonstrations (App. D.1); a deterministic MLP policy is trained by behaviour cloning on
   D^S and D^G (Sec. 3.2, L_BC). It is the deployed policy, exported like BC's.

No path here reads cost labels: prepare_arrays takes observations, actions, rewards and the
episode flags only (test/test_dspo.py trains with NaN costs and gets identical parameters).
"""

from dataclasses import dataclass, replace
import math
from typing import Dict, Optional, Tuple

import numpy as np
from offline_training.algos import bc
from offline_training.algos.batching import clip_actions, ReplayBuffer
from offline_training.algos.infrastructure import adam, config_from_preset, descend
from offline_training.algos.networks import mlp
from offline_training.algos.protocol import ExportPlan
from offline_training.algos.trajectory_diffusion import (TrajectoryDiffusion,
                                                         TrajectoryDiffusionConfig)
from offline_training.data.trajectories import episode_spans, reward_returns
from saferl_ros.errors import ConfigError
import torch
from torch import nn
import torch.nn.functional as F

NAME = 'dspo'
STAGES = ('discriminator', 'diffusion', 'bc')
BACKBONES = ('transformer', 'mlp')
# What DSPO reads of a dataset: no 'costs'.
READ_KEYS = ('observations', 'actions', 'rewards', 'terminals', 'timeouts')
# demos = 'first:N' makes the first N trajectories of the training data the demonstrations
# (chosen without looking at costs): for tests and the registry's protocol test only.
FIRST_PREFIX = 'first:'


@dataclass
class DspoConfig:
    """DSPO hyperparameters; the paper gives none but the 10 return bins (docs: every choice)."""

    demos: Optional[str] = None        # PREFIX-demos.hdf5 of `saferl-data split-demos`
    # --- stages: one trainer iteration updates one stage; BC gets what `steps` leaves
    disc_steps: int = 20_000
    diffusion_steps: int = 200_000
    bc_steps: int = 100_000            # OSRL's BC default
    steps: Optional[int] = None        # total; None: the sum of the three stages
    # --- SafetyTransformer D_phi (Sec. 3.1)
    backbone: str = 'transformer'      # 'mlp': the Fig. 4 ablation (per-step MLP, same pooling)
    embed_dim: int = 128
    num_layers: int = 3
    num_heads: int = 4
    dropout: float = 0.1
    pool_scale: bool = False           # divide q.k by sqrt(d) in the pooling (paper: no)
    disc_stride: int = 1               # D_phi sees steps 0, k, 2k, ... of each trajectory
    disc_batch_size: int = 32          # trajectories of D^S and of D^U per step, each
    disc_lr: float = 1e-4
    # Model selection without cost labels (our option; the paper is silent, and the last iterate
    # over-fitted the 12 positives on BallCircle): hold this many demonstrations out of D_phi's
    # positives and keep the D_phi whose held-out demonstrations rank highest among the
    # unlabelled trajectories of comparable return (select_score). 0: the last iterate.
    disc_select_holdout: int = 0
    disc_select_every: int = 500
    disc_weight_decay: float = 1e-4
    # --- return-agnostic term (Eqs. 4, 5; App. D.1)
    mi_weight: float = 1.0             # lambda; 0 is the "w/o return-agnostic" ablation
    return_bins: int = 10              # App. D.1
    q_hidden: Tuple[int, ...] = (64, 64)
    q_lr: float = 1e-3
    # --- conditional trajectory diffusion (Sec. 3.2, Eq. 6)
    horizon: int = 32                  # window length L
    denoising_steps: int = 20          # K
    diffusion_hidden: int = 256
    diffusion_blocks: int = 3
    cond_dropout: float = 0.25         # classifier-free training
    guidance: float = 1.5              # w at sampling
    sample_noise_scale: float = 1.0    # x_K ~ N(0, I) as App. B (OASIS's code uses 0.5)
    diffusion_batch_size: int = 256
    diffusion_lr: float = 3e-4
    # --- generation (App. D.1) and behaviour cloning (Sec. 3.2)
    num_generated: int = 2000          # windows in D^G (num_generated * horizon transitions)
    generation_batch: int = 500
    bc_hidden: Tuple[int, ...] = (256, 256)
    bc_lr: float = 1e-3
    bc_batch_size: int = 512
    episode_len: Optional[int] = None  # timestep-embedding size; resolved from the task horizon

    def __post_init__(self):
        self.q_hidden = tuple(int(h) for h in self.q_hidden)
        self.bc_hidden = tuple(int(h) for h in self.bc_hidden)
        if self.backbone not in BACKBONES:
            raise ConfigError(f'backbone {self.backbone!r}: use one of {", ".join(BACKBONES)}')
        if self.embed_dim % self.num_heads:
            raise ConfigError(f'embed_dim ({self.embed_dim}) must be a multiple of num_heads '
                              f'({self.num_heads})')
        if min(self.disc_steps, self.diffusion_steps, self.bc_steps) < 0:
            raise ConfigError('disc_steps, diffusion_steps and bc_steps must be >= 0')
        if self.mi_weight < 0 or self.return_bins < 2:
            raise ConfigError(f'mi_weight ({self.mi_weight}) must be >= 0 and return_bins '
                              f'({self.return_bins}) >= 2')
        if self.disc_stride < 1:
            raise ConfigError(f'disc_stride must be >= 1, got {self.disc_stride}')
        if self.disc_select_holdout < 0 or self.disc_select_every < 1:
            raise ConfigError(f'disc_select_holdout ({self.disc_select_holdout}) must be >= 0 '
                              f'and disc_select_every ({self.disc_select_every}) >= 1')
        if self.horizon < 1 or self.num_generated < 1:
            raise ConfigError('horizon and num_generated must be >= 1')
        if self.steps is None:
            self.steps = self.disc_steps + self.diffusion_steps + self.bc_steps
        self.check_stages()

    def check_stages(self) -> None:
        """Refuse a total that leaves behaviour cloning no iteration."""
        if int(self.steps) <= self.disc_steps + self.diffusion_steps:
            raise ConfigError(f'steps ({self.steps}) must exceed disc_steps + diffusion_steps '
                              f'({self.disc_steps + self.diffusion_steps}): behaviour cloning '
                              'gets the iterations left; lower the stage steps or raise --steps')

    def stage_of(self, iteration: int) -> str:
        """Return the stage of the 0-based ``iteration``."""
        if iteration < self.disc_steps:
            return 'discriminator'
        if iteration < self.disc_steps + self.diffusion_steps:
            return 'diffusion'
        return 'bc'


CONFIG = DspoConfig

# 'paper': our choice for a GPU (the paper states no budget). 'cpu': about one core-hour on this
# project's 2-core machine (docs/algorithms.md "DSPO" has the measured it/s per stage): a smaller
# transformer and diffusion network, fewer steps. 'test': tiny networks, a few iterations, the
# first two trajectories of the data as demonstrations.
PRESETS: Dict[str, dict] = {
    'paper': {},
    'cpu': {'disc_steps': 8_000, 'diffusion_steps': 80_000, 'bc_steps': 100_000,
            'embed_dim': 64, 'num_layers': 2, 'num_heads': 2, 'disc_batch_size': 16,
            'disc_stride': 4,
            'horizon': 16, 'diffusion_hidden': 128, 'diffusion_blocks': 2,
            'diffusion_batch_size': 128, 'num_generated': 1000, 'bc_batch_size': 256},
}
PRESETS['test'] = {**PRESETS['cpu'], 'demos': 'first:2', 'disc_steps': 6, 'diffusion_steps': 4,
                   'bc_steps': 4, 'embed_dim': 16, 'num_layers': 1, 'num_heads': 2,
                   'disc_batch_size': 4, 'disc_stride': 2, 'q_hidden': (8,), 'horizon': 8,
                   'denoising_steps': 4, 'diffusion_hidden': 16, 'diffusion_blocks': 1,
                   'diffusion_batch_size': 16, 'num_generated': 8, 'generation_batch': 8,
                   'bc_hidden': (32, 32), 'bc_batch_size': 32}


def make_config(preset: str = 'paper', **overrides) -> DspoConfig:
    """Return the config of a named preset with ``overrides`` applied."""
    return config_from_preset(DspoConfig, PRESETS, preset, overrides, 'DSPO')


def resolve_config(config: DspoConfig, task) -> DspoConfig:
    """Fill in the timestep-embedding size: the task's horizon."""
    if config.episode_len is None:
        config = replace(config, episode_len=int(task.horizon))
    return config


def reads_costs(config: DspoConfig) -> bool:
    """Return False: DSPO never reads cost labels (train.py then accepts cost-free datasets)."""
    return False


# --------------------------------------------------------------------------- losses (pure)

def discriminator_loss(logit_demo: torch.Tensor, logit_unlabelled: torch.Tensor) -> torch.Tensor:
    """
    Return Eq. 1: -E_{D^S}[log D(tau)] - E_{D^U}[log(1 - D(tau))], D = sigmoid(logit).

    Written with -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), which
    stay finite where D saturates.
    """
    return F.softplus(-logit_demo).mean() + F.softplus(logit_unlabelled).mean()


def return_bin(returns: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    """Return the index of ``returns`` among ``bins`` equal bins over [low, high] (clamped)."""
    width = max(float(high) - float(low), 1e-8) / bins
    return ((returns - low) / width).floor().long().clamp(0, bins - 1)


def vclub(log_q: torch.Tensor, bins: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """
    Return Eq. 4's estimate from q_theta's log-probabilities ``log_q`` [B, bins] of z_i.

    E_{p(z, r)}[log q(r | z)] over matched pairs (z_i, r_i) minus E_{p(z)} E_{p(r)}[log q(r | z)]
    over shuffled pairs (z_i, r_perm(i)), ``bins`` [B] the return bin of r_i.
    """
    positive = log_q.gather(1, bins.unsqueeze(1)).mean()
    negative = log_q.gather(1, bins[perm].unsqueeze(1)).mean()
    return positive - negative


def q_loss(log_q: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Return Eq. 5's part that depends on theta: -E_{p(z, r)}[log q(r | z)] (matched pairs)."""
    return -log_q.gather(1, bins.unsqueeze(1)).mean()


# --------------------------------------------------------------------------- networks

def causal_mask(tokens: int, device=None) -> torch.Tensor:
    """Return the [tokens, tokens] bool mask, True where token i may attend to token j <= i."""
    return torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which a token sees itself and earlier tokens only (GPT)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [B, heads, T, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~causal_mask(tokens, x.device), float('-inf'))
        y = self.drop(scores.softmax(dim=-1)) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """A GPT-2 block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class AttentionPooling(nn.Module):
    """
    Sec. 3.1's pooling: k_t = W_k x_t + b_k, q_t = W_q x_t + b_q, v_t = w_v^T x_t + b_v (scalar).

    z_t = sum_s alpha_ts v_s with alpha_ts = softmax_s(q_t^T k_s) over the trajectory's valid
    steps (not causal, as written); the output is the logit mean_t z_t, so z_tau = sigmoid of it.
    """

    def __init__(self, dim: int, scale: bool = False):
        super().__init__()
        self.key, self.query, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), \
            nn.Linear(dim, 1)
        self.scale = 1.0 / math.sqrt(dim) if scale else 1.0

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (logit [B], z_t [B, T]) of x [B, T, E] with ``valid`` [B, T] (bool)."""
        scores = self.query(x) @ self.key(x).transpose(-1, -2) * self.scale     # [B, T, T]
        scores = scores.masked_fill(~valid.unsqueeze(1), float('-inf'))
        z = (scores.softmax(dim=-1) @ self.value(x)).squeeze(-1)               # [B, T]
        weights = valid.to(z.dtype)
        return (z * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0), z


class SafetyTransformer(nn.Module):
    """
    D_phi(tau): the discriminator; ``forward`` returns the logit, z_tau = sigmoid(logit).

    Transformer backbone: tokens s_1, a_1, s_2, a_2, ... (a linear embedding of each plus the
    timestep's learned embedding, then LayerNorm), causal GPT blocks, x_t = the output at a_t's
    token (it has seen s_<=t and a_<=t). MLP backbone (Fig. 4 ablation): x_t = MLP(embedding of
    s_t and a_t plus the timestep's), no context across steps; the pooling is the same.
    """

    def __init__(self, obs_dim: int, act_dim: int, config: DspoConfig):
        super().__init__()
        c = config
        dim = c.embed_dim
        self.backbone = c.backbone
        self.state_embed, self.action_embed = nn.Linear(obs_dim, dim), nn.Linear(act_dim, dim)
        self.time_embed = nn.Embedding(int(c.episode_len or 1000), dim)
        if c.backbone == 'transformer':
            self.ln = nn.LayerNorm(dim)
            self.drop = nn.Dropout(c.dropout)
            self.blocks = nn.ModuleList([Block(dim, c.num_heads, c.dropout)
                                         for _ in range(c.num_layers)])
            self.ln_f = nn.LayerNorm(dim)
        else:
            width = mlp_width(dim, c.num_layers)
            self.body = mlp([dim, *([width] * (c.num_layers + 1)), dim], nn.GELU)
        self.pool = AttentionPooling(dim, c.pool_scale)

    def features(self, obs: torch.Tensor, act: torch.Tensor,
                 steps: torch.Tensor) -> torch.Tensor:
        """Return x_t [B, T, E] of obs [B, T, obs_dim], act [B, T, act_dim], steps [B, T]."""
        time = self.time_embed(steps.clamp(0, self.time_embed.num_embeddings - 1))
        if self.backbone == 'mlp':
            return self.body(self.state_embed(obs) + self.action_embed(act) + time)
        batch, length, _ = obs.shape
        tokens = torch.stack([self.state_embed(obs) + time, self.action_embed(act) + time],
                             dim=2).reshape(batch, 2 * length, -1)       # s_1, a_1, s_2, ...
        x = self.drop(self.ln(tokens))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)[:, 1::2]

    def forward(self, obs: torch.Tensor, act: torch.Tensor, steps: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """Return the logit mean_t z_t [B]; padded steps (valid False) must come last."""
        return self.pool(self.features(obs, act, steps), valid)[0]


def mlp_width(dim: int, layers: int) -> int:
    """
    Return the MLP backbone's width: about the parameters of ``layers`` transformer blocks.

    A GPT block of width E holds about 12 E^2 weights; an MLP of ``layers + 1`` hidden layers of
    width h between E-wide ends about 2 E h + layers h^2 (Fig. 4: "similar parameter size").
    """
    target = 12 * dim * dim * max(layers, 1)
    width = dim
    while 2 * dim * width + layers * width * width < target:
        width += 8
    return width


class ReturnClassifier(nn.Module):
    """q_theta(r | z): a classifier of the return bin from the scalar z_tau (App. D.1)."""

    def __init__(self, config: DspoConfig):
        super().__init__()
        self.net = mlp([1, *config.q_hidden, config.return_bins], nn.ReLU)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Return log q(. | z) [B, bins] of z [B]."""
        return F.log_softmax(self.net(z.unsqueeze(-1)), dim=-1)


class DspoModel(nn.Module):
    """The discriminator, q_theta, the trajectory diffusion model and the deployed BC policy."""

    def __init__(self, obs_dim: int, act_dim: int, config: DspoConfig):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.discriminator = SafetyTransformer(obs_dim, act_dim, config)
        self.q = ReturnClassifier(config)
        self.diffusion = TrajectoryDiffusion(TrajectoryDiffusionConfig(
            horizon=config.horizon, dim=obs_dim + act_dim, cond_dim=2,
            steps=config.denoising_steps, hidden=config.diffusion_hidden,
            num_blocks=config.diffusion_blocks, cond_dropout=config.cond_dropout))
        self.policy = bc.BCModel(obs_dim, act_dim, bc_config(config))
        # Normalisation of states and returns, set from the training data (no costs).
        self.register_buffer('obs_mean', torch.zeros(obs_dim))
        self.register_buffer('obs_std', torch.ones(obs_dim))
        self.register_buffer('return_range', torch.tensor([0.0, 1.0]))

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Return the deployed policy's action [B, act_dim] (raw observations)."""
        return self.policy.act(obs)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.act(observation)

    def normalise_return(self, returns: torch.Tensor) -> torch.Tensor:
        """Map returns to [0, 1] over the training data's range (the diffusion condition)."""
        low, high = self.return_range
        return (returns - low) / (high - low).clamp(min=1e-8)


def bc_config(config: DspoConfig) -> bc.BCConfig:
    """Return the BC config of DSPO's policy (BC's network, DSPO's sizes)."""
    return bc.BCConfig(hidden=config.bc_hidden, actor_lr=config.bc_lr,
                       batch_size=config.bc_batch_size)


def build_model(obs_dim: int, act_dim: int, config: DspoConfig) -> DspoModel:
    """Return a freshly initialised DspoModel."""
    return DspoModel(obs_dim, act_dim, config)


# --------------------------------------------------------------------------- data

def load_demos(config: DspoConfig, data) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """
    Return (demonstrations, unlabelled) as dicts of READ_KEYS; neither holds costs.

    ``config.demos`` is a demonstrations file (read through the validated loader, its costs not
    even loaded), or ``first:N`` (tests): the first N trajectories of ``data``.
    """
    from offline_training.data.dataset import load_dataset
    from offline_training.data.trajectories import select_trajectories

    if not config.demos:
        raise ConfigError('DSPO needs safe demonstrations: pass --set demos=PREFIX-demos.hdf5 '
                          '(written by saferl-data split-demos) and train on '
                          'PREFIX-unlabelled.hdf5')
    unlabelled = {key: data[key] for key in READ_KEYS}
    if str(config.demos).startswith(FIRST_PREFIX):
        count = int(str(config.demos)[len(FIRST_PREFIX):])
        starts, _ = episode_spans(unlabelled)
        if not 1 <= count < len(starts):
            raise ConfigError(f'demos={config.demos!r}: the data has {len(starts)} trajectories')
        first = np.arange(count)
        demos = select_trajectories(unlabelled, first, READ_KEYS)
        unlabelled = select_trajectories(unlabelled, np.arange(count, len(starts)), READ_KEYS)
        return demos, unlabelled
    return load_dataset(config.demos, keys=READ_KEYS), unlabelled


def trajectory_arrays(part, offset: int = 0, is_demo: bool = False) -> Dict[str, np.ndarray]:
    """Return a dataset's per-transition obs, act, traj (from ``offset``), step, demo, ret."""
    returns, starts, stops = reward_returns(part)
    lengths = stops - starts
    traj = np.repeat(np.arange(len(starts)) + offset, lengths)
    step = np.arange(len(traj)) - np.repeat(starts, lengths)
    return {'obs': np.asarray(part['observations'], dtype=np.float32),
            'act': clip_actions(part['actions'], 1.0),
            'traj': traj.astype(np.float32), 'step': step.astype(np.float32),
            'demo': np.full(len(traj), float(is_demo), np.float32),
            'ret': np.repeat(returns, lengths).astype(np.float32)}


def prepare_arrays(data: Dict[str, np.ndarray], config: DspoConfig) -> Dict[str, np.ndarray]:
    """
    Return per-transition arrays of D^U then D^S: obs, act, traj, step, demo, ret.

    ``traj`` numbers the trajectories, ``step`` is the step within its trajectory, ``demo`` is 1
    on demonstrations and ``ret`` is the trajectory's reward return. Reads no costs.
    """
    demos, unlabelled = load_demos(config, data)
    parts = [trajectory_arrays(unlabelled, 0, False)]
    parts.append(trajectory_arrays(demos, int(parts[0]['traj'].max()) + 1, True))
    if parts[1]['obs'].shape[1:] != parts[0]['obs'].shape[1:] or \
            parts[1]['act'].shape[1:] != parts[0]['act'].shape[1:]:
        raise ConfigError(f'demos {config.demos}: observation/action widths '
                          f'{parts[1]["obs"].shape[1]}/{parts[1]["act"].shape[1]} differ from '
                          f'the dataset\'s {parts[0]["obs"].shape[1]}/{parts[0]["act"].shape[1]}'
                          '; give the demonstrations of the same task')
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class Trajectories:
    """The training data as padded trajectories [N, T, ...] on the buffer's device."""

    def __init__(self, buffer: ReplayBuffer, model: DspoModel, horizon: int, stride: int = 1):
        d = buffer.data
        traj, step = d['traj'].long(), d['step'].long()
        count = int(traj.max()) + 1
        lengths = torch.bincount(traj, minlength=count)
        length = int(lengths.max())
        obs = (d['obs'] - model.obs_mean) / model.obs_std
        self.obs = obs.new_zeros(count, length, obs.shape[1])
        self.obs[traj, step] = obs
        self.act = obs.new_zeros(count, length, d['act'].shape[1])
        self.act[traj, step] = d['act']
        self.steps = torch.arange(length, device=obs.device).expand(count, length)
        self.valid = self.steps < lengths.unsqueeze(1)
        self.returns = obs.new_zeros(count).index_put_((traj,), d['ret'])
        self.demo = obs.new_zeros(count, dtype=torch.bool).index_put_(
            (traj,), d['demo'] > 0.5)
        self.demo_index = torch.nonzero(self.demo).squeeze(1)
        self.unlabelled_index = torch.nonzero(~self.demo).squeeze(1)
        # Windows of `horizon` steps inside one trajectory: (trajectory, first step) pairs.
        starts = [(i, s) for i, n in enumerate(lengths.tolist()) for s in range(n - horizon + 1)]
        if not starts:
            raise ConfigError(f'no trajectory has {horizon} steps; lower horizon (the longest '
                              f'has {length})')
        self.windows = torch.tensor(starts, device=obs.device)
        self.horizon, self.stride = horizon, stride

    def batch(self, index: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return (obs, act, steps, valid) of the trajectories ``index``, every stride-th step."""
        k = self.stride
        return (self.obs[index, ::k], self.act[index, ::k], self.steps[index, ::k],
                self.valid[index, ::k])

    def window_batch(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (x [B, L, obs + act], trajectory [B]) of the windows ``index``."""
        traj, first = self.windows[index].unbind(1)
        steps = first.unsqueeze(1) + torch.arange(self.horizon, device=first.device)
        rows = traj.unsqueeze(1)
        return torch.cat([self.obs[rows, steps], self.act[rows, steps]], dim=-1), traj


def set_normalisation(model: DspoModel, buffer: ReplayBuffer) -> None:
    """Set the model's state mean/std and return range from the training data."""
    d = buffer.data
    with torch.no_grad():
        model.obs_mean.copy_(d['obs'].mean(dim=0))
        model.obs_std.copy_(d['obs'].std(dim=0).clamp(min=1e-3))
        model.return_range.copy_(torch.stack([d['ret'].min(), d['ret'].max()]))


@torch.no_grad()
def label_trajectories(discriminator: SafetyTransformer, data: Trajectories,
                       chunk: int = 64, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return z_tau = sigmoid(D_phi logit) of the trajectories ``index`` (all; eval mode)."""
    discriminator.eval()
    if index is None:
        index = torch.arange(data.obs.shape[0], device=data.obs.device)
    return torch.cat([torch.sigmoid(discriminator(*data.batch(index[i:i + chunk])))
                      for i in range(0, len(index), chunk)])


def select_score(z_held: torch.Tensor, z_matched: torch.Tensor) -> float:
    """
    Return the held-out demonstrations' AUC against unlabelled trajectories of similar return.

    The share of (held-out demonstration, unlabelled trajectory) pairs in which the
    demonstration has the larger z (ties count a half): 1 when every held-out safe
    demonstration ranks above them, 0.5 by chance. The unlabelled trajectories are those whose
    return is at least the demonstrations' lowest (see matched_unlabelled), so a z that merely
    follows the return does not score. Reads no costs.
    """
    from offline_training.discriminator_quality import roc_auc

    scores = torch.cat([z_held, z_matched]).cpu().numpy()
    positive = np.arange(len(scores)) < len(z_held)
    return roc_auc(scores, positive)


def matched_unlabelled(data: 'Trajectories', minimum: int = 20) -> torch.Tensor:
    """
    Return the unlabelled trajectories whose reward return reaches the demonstrations' lowest.

    At least ``minimum`` (the highest-return ones) when fewer reach it.
    """
    returns = data.returns[data.unlabelled_index]
    floor = data.returns[data.demo_index].min()
    matched = data.unlabelled_index[returns >= floor]
    if len(matched) < min(minimum, len(returns)):
        order = torch.argsort(returns, descending=True)
        matched = data.unlabelled_index[order[:minimum]]
    return matched


def safety_signal(model: DspoModel, config: DspoConfig, data) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return (z_tau, reward return) of every trajectory of a dataset dict, with a trained model.

    Reads READ_KEYS only (no costs); states are normalised as in training.
    """
    device = model.obs_mean.device
    buffer = ReplayBuffer(trajectory_arrays({key: data[key] for key in READ_KEYS}), device)
    trajectories = Trajectories(buffer, model, 1, config.disc_stride)
    z = label_trajectories(model.discriminator, trajectories)
    return z.cpu().numpy(), trajectories.returns.cpu().numpy()


# --------------------------------------------------------------------------- trainer

class DspoTrainer:
    """One stage per iteration: discriminator (+ q_theta), diffusion, then behaviour cloning."""

    def __init__(self, model: DspoModel, config: DspoConfig):
        self.model, self.config = model, config
        config.check_stages()
        self.disc_opt = adam(model.discriminator.parameters(), lr=config.disc_lr,
                             weight_decay=config.disc_weight_decay)
        self.q_opt = adam(model.q.parameters(), lr=config.q_lr)
        self.diffusion_opt = adam(model.diffusion.parameters(), lr=config.diffusion_lr)
        self.bc_opt = adam(model.policy.parameters(), lr=config.bc_lr)
        self.iteration = 0
        self.labels: Optional[torch.Tensor] = None       # z_tau of every trajectory
        self.generated: Optional[Dict[str, torch.Tensor]] = None   # D^S and D^G for BC
        self.data: Optional[Trajectories] = None
        # model selection (disc_select_holdout > 0): the held-out demonstrations, the best
        # D_phi so far and its score and iteration
        self.select: Optional[Dict[str, object]] = None

    def _randint(self, buffer: ReplayBuffer, high: int, size: int) -> torch.Tensor:
        return torch.randint(0, high, (size,), device=buffer.device, generator=buffer.generator)

    def update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """Run one iteration of the stage the iteration count is in; return its logs."""
        if self.data is None:
            if self.iteration == 0:
                set_normalisation(self.model, buffer)
            self.data = Trajectories(buffer, self.model, self.config.horizon,
                                     self.config.disc_stride)
        stage = self.config.stage_of(self.iteration)
        self.iteration += 1
        if stage == 'discriminator':
            logs = self.discriminator_update(buffer)
        elif stage == 'diffusion':
            if self.labels is None:
                self.labels = self.label()
            logs = self.diffusion_update(buffer)
        else:
            if self.generated is None:
                if self.labels is None:
                    self.labels = self.label()
                self.generated = self.generate()
            logs = self.bc_update(buffer)
        logs['schedule/stage'] = torch.tensor(float(STAGES.index(stage)))
        return logs

    # -- stage 1 -------------------------------------------------------------------------------

    def _start_selection(self, buffer: ReplayBuffer) -> None:
        """Hold disc_select_holdout demonstrations out of D_phi's positives (once)."""
        data, k = self.data, self.config.disc_select_holdout
        if k >= len(data.demo_index):
            raise ConfigError(f'disc_select_holdout ({k}) must leave D_phi at least one of the '
                              f'{len(data.demo_index)} demonstrations; lower it')
        order = torch.randperm(len(data.demo_index), device=buffer.device,
                               generator=buffer.generator)
        self.select = {'held': data.demo_index[order[:k]], 'train': data.demo_index[order[k:]],
                       'matched': matched_unlabelled(data), 'best_score': -1.0,
                       'best_iteration': -1, 'best_state': None}

    def _selection_step(self) -> Dict[str, torch.Tensor]:
        """Score D_phi on the held-out demonstrations; keep it if it is the best so far."""
        sel, disc = self.select, self.model.discriminator
        held, matched = sel['held'], sel['matched']
        z = label_trajectories(disc, self.data, index=torch.cat([held, matched]))
        disc.train()
        score = select_score(z[:len(held)], z[len(held):])
        if score > sel['best_score']:
            sel.update(best_score=score, best_iteration=self.iteration,
                       best_state={k: v.detach().clone() for k, v in disc.state_dict().items()})
        return {'value/select_auc': torch.tensor(score),
                'value/select_best_iteration': torch.tensor(float(sel['best_iteration']))}

    def discriminator_update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """One q_theta step (Eq. 5) then one phi step (Eq. 1 + lambda Eq. 4)."""
        m, c, data = self.model, self.config, self.data
        batch = c.disc_batch_size
        if c.disc_select_holdout and self.select is None:
            self._start_selection(buffer)
        positives = data.demo_index if self.select is None else self.select['train']
        demo = positives[self._randint(buffer, len(positives), batch)]
        unlabelled = data.unlabelled_index[self._randint(buffer, len(data.unlabelled_index),
                                                         batch)]
        index = torch.cat([demo, unlabelled])
        m.discriminator.train()
        logits = m.discriminator(*data.batch(index))
        z = torch.sigmoid(logits)
        lo, hi = m.return_range
        bins = return_bin(data.returns[index], lo, hi, c.return_bins)
        q_step = q_loss(m.q(z.detach()), bins)                                # Eq. 5
        descend(self.q_opt, q_step)
        eq1 = discriminator_loss(logits[:batch], logits[batch:])              # Eq. 1
        loss = eq1
        logs = {'loss/disc': eq1.detach(), 'loss/q': q_step.detach(),
                'value/z_demo': z[:batch].detach().mean(),
                'value/z_unlabelled': z[batch:].detach().mean()}
        if c.mi_weight > 0:
            perm = torch.randperm(len(index), device=buffer.device, generator=buffer.generator)
            mi = vclub(m.q(z), bins, perm)                                    # Eq. 4
            loss = loss + c.mi_weight * mi
            logs['loss/vclub'] = mi.detach()
        descend(self.disc_opt, loss)
        if self.select is not None and (self.iteration % c.disc_select_every == 0
                                        or self.iteration == c.disc_steps):
            logs.update(self._selection_step())
        return logs

    def label(self) -> torch.Tensor:
        """
        Return z_tau = D_phi(tau) of every trajectory (dropout off).

        With model selection, D_phi is first set to the best one it kept.
        """
        if self.select is not None and self.select['best_state'] is not None:
            self.model.discriminator.load_state_dict(self.select['best_state'])
        labels = label_trajectories(self.model.discriminator, self.data)
        self.model.discriminator.train()
        return labels

    # -- stage 2 -------------------------------------------------------------------------------

    def condition(self, returns: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Return the diffusion condition [B, 2]: (normalised r_tau, z_tau)."""
        return torch.stack([self.model.normalise_return(returns), z], dim=-1)

    def diffusion_update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """One denoising step of Eq. 6 on windows with their trajectory's (r_tau, z_tau)."""
        data = self.data
        x, traj = data.window_batch(self._randint(buffer, len(data.windows),
                                                  self.config.diffusion_batch_size))
        self.model.diffusion.train()
        loss = self.model.diffusion.loss(x, self.condition(data.returns[traj],
                                                           self.labels[traj]))
        descend(self.diffusion_opt, loss)
        return {'loss/diffusion': loss.detach()}

    # -- stage 3 -------------------------------------------------------------------------------

    def generation_conditions(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Return App. D.1's conditions for ``count`` windows: (returns, z).

        r ~ uniform over [min, max] of the demonstrations' returns; z = the smallest z_tau of the
        demonstrations (the same for every window).
        """
        data = self.data
        demo_returns = data.returns[data.demo_index]
        low, high = demo_returns.min(), demo_returns.max()
        returns = low + (high - low) * torch.rand(count, device=demo_returns.device)
        z = self.labels[data.demo_index].min().expand(count)
        return returns, z

    @torch.no_grad()
    def generate(self) -> Dict[str, torch.Tensor]:
        """Return D^S plus D^G (raw states, actions clipped to [-1, 1]) for behaviour cloning."""
        m, c, data = self.model, self.config, self.data
        m.diffusion.eval()
        returns, z = self.generation_conditions(c.num_generated)
        cond = self.condition(returns, z)
        windows = torch.cat([m.diffusion.sample(cond[i:i + c.generation_batch], c.guidance,
                                                noise_scale=c.sample_noise_scale)
                             for i in range(0, c.num_generated, c.generation_batch)])
        obs = windows[..., :m.obs_dim].reshape(-1, m.obs_dim) * m.obs_std + m.obs_mean
        act = windows[..., m.obs_dim:].reshape(-1, m.act_dim).clamp(-1.0, 1.0)
        demo = data.demo_index
        demo_obs = data.obs[demo][data.valid[demo]] * m.obs_std + m.obs_mean
        demo_act = data.act[demo][data.valid[demo]]
        return {'obs': torch.cat([demo_obs, obs]), 'act': torch.cat([demo_act, act]),
                'demos': torch.tensor(len(demo_obs))}

    def bc_update(self, buffer: ReplayBuffer) -> Dict[str, torch.Tensor]:
        """One behaviour-cloning step on D^S and D^G (Sec. 3.2's L_BC, mean squared error)."""
        g = self.generated
        index = self._randint(buffer, len(g['obs']), self.config.bc_batch_size)
        loss = bc.bc_loss(self.model.act(g['obs'][index]), g['act'][index])
        descend(self.bc_opt, loss)
        return {'loss/bc': loss.detach()}

    def state_dict(self) -> dict:
        """Return the optimiser states, the iteration, the labels and D^S + D^G."""
        return {'disc_opt': self.disc_opt.state_dict(), 'q_opt': self.q_opt.state_dict(),
                'diffusion_opt': self.diffusion_opt.state_dict(),
                'bc_opt': self.bc_opt.state_dict(), 'iteration': self.iteration,
                'labels': self.labels, 'generated': self.generated, 'select': self.select}

    def load_state_dict(self, state: dict) -> None:
        """Restore the states saved by state_dict()."""
        for name in ('disc_opt', 'q_opt', 'diffusion_opt', 'bc_opt'):
            getattr(self, name).load_state_dict(state[name])
        self.iteration = int(state['iteration'])
        self.labels, self.generated = state['labels'], state['generated']
        self.select = state.get('select')


def make_trainer(model: DspoModel, config: DspoConfig) -> DspoTrainer:
    """Return the trainer of ``model``."""
    return DspoTrainer(model, config)


# --------------------------------------------------------------------------- export

def export_plan(model: DspoModel, config: DspoConfig) -> ExportPlan:
    """
    Return BC's plan for DSPO's policy: the deterministic MLP only (critic kind ``none``).

    DSPO learns no cost critic, so a monitor shields its bundle with rules that need none.
    """
    plan = bc.export_plan(model.policy, bc_config(config))
    extra = {'policy': 'a = tanh MLP(s), behaviour cloning on safe demonstrations and '
                       'diffusion-generated windows', 'backbone': config.backbone,
             'mi_weight': float(config.mi_weight), 'demos': str(config.demos)}
    return replace(plan, algorithm=NAME, extra=extra)
