"""
A conditional DDPM over short trajectory windows, with classifier-free guidance and in-painting.

Method-neutral: a sample is a window ``x`` of shape (L, D) (D = state dim for OASIS's state
sequences, state + action dims for DSPO) and a condition vector of any width ``cond_dim`` (OASIS:
the normalised cost and reward returns). Used as::

    model = TrajectoryDiffusion(TrajectoryDiffusionConfig(horizon=32, dim=8, cond_dim=2))
    loss = model.loss(x0, cond)                       # x0 [B, L, D], cond [B, cond_dim]
    pin = first_state_pin(start_states, horizon=32)   # keep x[:, 0] = the given states
    # (train with loss(x0, cond, weight, pin_mask=pin[0]) when sampling will pin)
    windows = model.sample(cond, guidance=2.0, steps=20, pin=pin)   # [n, L, D]

- Training is epsilon prediction (DDPM's simplified loss, OASIS Eq. 7) with condition dropout:
  with probability ``cond_dropout`` the condition embedding of a sample is zeroed, so one network
  learns both eps(x_k, y, k) and the unconditional eps(x_k, null, k).
- Sampling combines them with classifier-free guidance (OASIS Eq. 8),
  eps = eps_uncond + w (eps_cond - eps_uncond), computed in one batched network pass, and runs the
  DDPM posterior with the x0 estimate clamped to +-``clip_x0``. Fewer sampling steps than the
  trained K use a respaced schedule (the same alpha-bars at a subsequence of the steps).
- ``pin = (mask, values)`` re-imposes known entries (e.g. the first state) on the initial noise
  and after every step (Decision Diffuser's ``apply_conditioning``), so they hold exactly.

The network is an MLP-ResNet over the flattened window (diffusion.py's MLPResNet, the blocks of
FISOR's and DRCORL's noise predictors) with learnable Fourier features of the step and an MLP
embedding of the condition. It stands in for the official code's temporal 1-D-conv U-Net: for
the short windows used here (L * D of a few hundred numbers) a few dense layers are cheap on a
CPU and every layer sees the whole window (the U-Net was not measured for comparison). By
default it outputs the clean window x0 and eps is derived from it (``parameterization``):
through a dense bottleneck an MLP that must output L * D numbers of noise learns slowly (on
BallCircle, 3000 steps left an eps MSE of 0.62 even at the last step, where eps is almost x_k
itself), while the clean window is smooth and compressible.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from offline_training.algos.diffusion import DiffusionSchedule, FourierFeatures, MLPResNet
from offline_training.algos.networks import Mish, mlp
import torch
from torch import nn

Pin = Tuple[torch.Tensor, torch.Tensor]   # (bool mask, values), broadcastable to [n, L, D]


@dataclass
class TrajectoryDiffusionConfig:
    """Shape, schedule and network of a TrajectoryDiffusion; defaults follow OASIS's code."""

    horizon: int = 32           # L, states (or steps) per window
    dim: int = 8                # D, features per step
    cond_dim: int = 2           # width of the condition vector
    steps: int = 20             # K, denoising steps of the trained schedule
    schedule: str = 'cosine'    # 'cosine' (Diffuser, OASIS) or 'vp' (jaxrl5)
    hidden: int = 256
    num_blocks: int = 3
    time_dim: int = 64
    cond_hidden: int = 128
    dropout: float = 0.0
    cond_dropout: float = 0.1   # p, probability of training a sample unconditionally
    clip_x0: float = 10.0       # clamp of the x0 estimate during sampling (normalised units)
    noise_scale: float = 0.5    # scale of the initial and per-step sampling noise (OASIS code)
    # What the network outputs: 'x0', the clean window, from which eps = (x_k - sqrt(abar) x0) /
    # sqrt(1 - abar) (an MLP reproduces a smooth window far more easily than L * D numbers of
    # noise), or 'eps' directly. Either way the loss is Eq. 7's epsilon MSE.
    parameterization: str = 'x0'

    def __post_init__(self):
        if self.horizon < 1 or self.dim < 1 or self.cond_dim < 1 or self.steps < 1:
            raise ValueError('horizon, dim, cond_dim and steps must be positive, got '
                             f'{self.horizon}, {self.dim}, {self.cond_dim}, {self.steps}')
        if self.parameterization not in ('x0', 'eps'):
            raise ValueError(f"parameterization must be 'x0' or 'eps', got "
                             f'{self.parameterization!r}')
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f'cond_dropout must lie in [0, 1), got {self.cond_dropout}')


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor,
                guidance: float) -> torch.Tensor:
    """Classifier-free guidance, Eq. 8: eps_uncond + w (eps_cond - eps_uncond)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def first_state_pin(states: torch.Tensor, horizon: int) -> Pin:
    """Return the pin that fixes x[:, 0] = ``states`` ([n, D]) in windows of ``horizon`` steps."""
    n, dim = states.shape
    mask = torch.zeros(1, horizon, dim, dtype=torch.bool, device=states.device)
    mask[:, 0] = True
    values = torch.zeros(n, horizon, dim, dtype=states.dtype, device=states.device)
    values[:, 0] = states
    return mask, values


def apply_pin(x: torch.Tensor, pin: Optional[Pin]) -> torch.Tensor:
    """Return ``x`` with the pinned entries replaced by their values (exactly)."""
    if pin is None:
        return x
    mask, values = pin
    return torch.where(mask, values.to(x.dtype), x)


class TrajectoryEpsNet(nn.Module):
    """eps(x_k, y, k): MLP-ResNet over [flattened window, step embedding, condition embedding]."""

    def __init__(self, config: TrajectoryDiffusionConfig):
        super().__init__()
        c = config
        self.horizon, self.dim = c.horizon, c.dim
        self.time_features = FourierFeatures(c.time_dim, std=0.2)
        self.time_net = mlp([c.time_dim, c.cond_hidden, c.cond_hidden], Mish,
                            init='xavier_uniform')
        self.cond_net = mlp([c.cond_dim, c.cond_hidden, c.cond_hidden], Mish,
                            init='xavier_uniform')
        flat = c.horizon * c.dim
        self.body = MLPResNet(flat + 2 * c.cond_hidden, flat, c.hidden, c.num_blocks, c.dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """Return eps [B, L, D]; t [B] int steps, keep [B] (1 = conditioned, 0 = null)."""
        time = self.time_net(self.time_features(t.float().unsqueeze(-1)))
        condition = self.cond_net(cond) * keep.unsqueeze(-1)
        out = self.body(torch.cat([x.flatten(1), time, condition], dim=-1))
        return out.view(-1, self.horizon, self.dim)


class TrajectoryDiffusion(nn.Module):
    """Conditional epsilon-prediction DDPM over windows [L, D]: ``loss`` and ``sample``."""

    def __init__(self, config: TrajectoryDiffusionConfig):
        super().__init__()
        self.config = config
        self.net = TrajectoryEpsNet(config)
        self.schedule = DiffusionSchedule(config.steps, kind=config.schedule)

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, weight: Optional[torch.Tensor] = None,
             pin_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Eq. 7: E ||eps - eps_theta(x_k, y, k)||^2 with the condition dropped with probability p.

        x0 [B, L, D], cond [B, C]; ``weight`` (broadcastable to [B, L, D]) weights the squared
        error, e.g. 0 on entries that are always pinned at sampling (OASIS's first state).
        ``pin_mask`` (bool, broadcastable) keeps those entries clean in x_k, as sampling with
        that pin will present them (Diffuser's ``apply_conditioning`` in its training loss).
        """
        batch = x0.shape[0]
        t = torch.randint(0, self.config.steps, (batch,), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0.flatten(1), t, eps.flatten(1)).view_as(x0)
        if pin_mask is not None:
            x_t = torch.where(pin_mask, x0, x_t)
        keep = (torch.rand(batch, device=x0.device) >= self.config.cond_dropout).to(x0.dtype)
        error = (self.eps(x_t, cond, t, keep) - eps).pow(2)
        if weight is not None:
            error = error * weight
        return error.mean()

    def eps(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
            keep: torch.Tensor) -> torch.Tensor:
        """Return eps_theta(x_k, y, k) [B, L, D] (keep [B]: 1 = conditioned, 0 = null)."""
        out = self.net(x_t, cond, t, keep)
        if self.config.parameterization == 'eps':
            return out
        alpha_bar = self.schedule.alpha_bars[t].view(-1, 1, 1)
        return (x_t - alpha_bar.sqrt() * out) / (1.0 - alpha_bar).sqrt()

    def guided_eps(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                   guidance: float) -> torch.Tensor:
        """Eq. 8's eps, the conditional and the unconditional pass in one batch."""
        batch = x.shape[0]
        keep = torch.cat([torch.ones(batch, device=x.device), torch.zeros(batch, device=x.device)])
        both = self.eps(torch.cat([x, x]), torch.cat([cond, cond]), torch.cat([t, t]), keep)
        return cfg_combine(both[batch:], both[:batch], guidance)

    def sampling_steps(self, steps: Optional[int] = None) -> torch.Tensor:
        """Return the trained steps visited by a ``steps``-step sampler, from K - 1 down to 0."""
        total = self.config.steps
        steps = total if steps is None else int(steps)
        if not 1 <= steps <= total:
            raise ValueError(f'sampling steps must lie in [1, {total}] (the trained K), '
                             f'got {steps}')
        return torch.linspace(total - 1, 0, steps).round().long().unique_consecutive()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, guidance: float = 2.0, steps: Optional[int] = None,
               pin: Optional[Pin] = None, noise_scale: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """
        Return n windows [n, L, D] drawn for the conditions ``cond`` [n, C] (Algorithm 1).

        ``guidance`` is w of Eq. 8 (1 = plain conditional, 0 = unconditional); ``steps`` the
        number of denoising steps (default K, fewer respace the schedule); ``pin`` = (mask,
        values) of known entries, re-imposed on the noise and after every step.
        """
        c = self.config
        scale = c.noise_scale if noise_scale is None else noise_scale
        n, device = cond.shape[0], cond.device
        abar = self.schedule.alpha_bars
        visited = self.sampling_steps(steps).tolist()
        x = scale * torch.randn(n, c.horizon, c.dim, device=device, generator=generator)
        x = apply_pin(x, pin)
        for i, t in enumerate(visited):
            abar_t = abar[t]
            abar_prev = abar[visited[i + 1]] if i + 1 < len(visited) else abar.new_tensor(1.0)
            beta = 1.0 - abar_t / abar_prev
            eps = self.guided_eps(x, cond, torch.full((n,), t, device=device), guidance)
            x0 = ((x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()).clamp(-c.clip_x0, c.clip_x0)
            # DDPM posterior q(x_{k-1} | x_k, x0) of the (respaced) step (Eq. 6's mean).
            mean = (abar_prev.sqrt() * beta / (1 - abar_t)) * x0 \
                + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x
            if i + 1 < len(visited):
                var = beta * (1 - abar_prev) / (1 - abar_t)
                z = torch.randn(x.shape, device=device, generator=generator)
                x = mean + scale * var.clamp(min=1e-20).sqrt() * z
            else:
                x = mean
            x = apply_pin(x, pin)
        return x
