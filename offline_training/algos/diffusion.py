"""
The DDPM pieces of a diffusion policy: the discrete VP noise schedule and the reverse sampler.

Both follow jaxrl5 (the code FISOR and IDQL were written in); the noise-prediction network that
the sampler calls is the algorithm's own (FISOR's ``EpsilonNet``).
"""

from typing import Callable

import torch
from torch import nn


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
