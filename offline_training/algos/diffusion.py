"""
The DDPM pieces of a diffusion policy: the discrete VP noise schedule and the reverse sampler.

Both follow jaxrl5 (the code FISOR and IDQL were written in), as does the network family the
noise-prediction networks are built from: learnable Fourier features of the time step and the
LayerNorm-ResNet (``MLPResNet``, jaxrl5's ln_resnet), assembled into ``EpsilonNet``, the noise
predictor of FISOR's policy and of DRCORL's behaviour model.
"""

import math
from typing import Callable, Optional, Sequence

from offline_training.algos import native
from offline_training.algos.networks import (eager_cpu_float, init_linear, Mish, mish,
                                             mish_gradient, mish_value, mlp)
import torch
from torch import nn
from torch.autograd.function import once_differentiable


def vp_beta_schedule(timesteps: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    """Return the discrete VP betas of jaxrl5: 1 - exp(-b_min/T - (b_max-b_min)(2t-1)/2T^2)."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64)
    alpha = torch.exp(-b_min / timesteps - 0.5 * (b_max - b_min) * (2 * t - 1) / timesteps ** 2)
    return (1.0 - alpha).float()


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Return the cosine betas of Nichol and Dhariwal (Diffuser's default), clipped to 0.999."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alpha_bar = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - (alpha_bar[1:] / alpha_bar[:-1])
    return betas.clamp(0, 0.999).float()


class DiffusionSchedule(nn.Module):
    """
    The discrete DDPM noise schedule (betas, alphas, cumulative alpha-bars) as buffers.

    ``kind`` is 'vp' (jaxrl5's, FISOR and DRCORL) or 'cosine' (Diffuser's, OASIS).
    """

    def __init__(self, timesteps: int = 5, b_min: float = 0.1, b_max: float = 10.0,
                 kind: str = 'vp'):
        super().__init__()
        if kind == 'vp':
            betas = vp_beta_schedule(timesteps, b_min, b_max)
        elif kind == 'cosine':
            betas = cosine_beta_schedule(timesteps)
        else:
            raise ValueError(f"unknown beta schedule {kind!r}: use 'vp' or 'cosine'")
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


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """
    Inverted dropout, as ``nn.Dropout``: zero each entry with probability p, scale the rest.

    The mask is drawn as uniform >= p (as jax.random.bernoulli draws it) rather than with
    ``bernoulli_``, which on this project's CPUs took ~1.8x as long forward and backward on a
    [256, 128] activation; see :func:`dropout_mask` for the generator (the same distribution,
    not the same random numbers as nn.Dropout).
    """
    if not training or p == 0.0:
        return x
    return x * dropout_mask(x, p)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """
    Return the scaled keep mask of :func:`dropout` for ``x``: 1 / (1 - p) with probability 1 - p.

    For float32 on one CPU thread it comes from the compiled Philox generator (native, ~2x as
    fast as torch.rand_like's serial Mersenne Twister, seeded from torch's generator all the
    same), elsewhere from torch.rand_like: a run is reproducible from its seed on one machine
    with the same kernels, and the two draw different numbers from the same distribution.
    """
    if eager_cpu_float(x) and native.loops_apply(x):
        return native.dropout_mask(x.shape, p)
    keep = torch.rand_like(x).ge_(p)                  # 1.0 with probability 1 - p, else 0.0
    return keep.mul_(1.0 / (1.0 - p))


class MLPResNetBlock(nn.Module):
    """Dropout -> LayerNorm -> Dense(4 h) -> mish -> Dense(h), plus the residual (jaxrl5)."""

    def __init__(self, hidden: int, dropout: float = 0.1, layer_norm: bool = True):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f'dropout must be in [0, 1), got {dropout}')
        self.dropout_rate = float(dropout)
        # flax's LayerNorm epsilon is 1e-6.
        self.norm = nn.LayerNorm(hidden, eps=1e-6) if layer_norm else nn.Identity()
        self.fc1 = init_linear(nn.Linear(hidden, 4 * hidden), 'lecun_normal')
        self.fc2 = init_linear(nn.Linear(4 * hidden, hidden), 'lecun_normal')

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``keep``: this block's dropout mask (:func:`dropout_mask`), drawn here when None."""
        dropped = dropout(x, self.dropout_rate, self.training) if keep is None else x * keep
        return x + self.fc2(mish(self.fc1(self.norm(dropped))))


class MLPResNet(nn.Module):
    """Dense(h) -> blocks x MLPResNetBlock -> mish -> Dense(out) (jaxrl5's ln_resnet)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, num_blocks: int = 3,
                 dropout: float = 0.1, layer_norm: bool = True):
        super().__init__()
        self.inp = init_linear(nn.Linear(in_dim, hidden), 'xavier_uniform')
        self.blocks = nn.ModuleList(
            [MLPResNetBlock(hidden, dropout, layer_norm) for _ in range(num_blocks)])
        self.out = init_linear(nn.Linear(hidden, out_dim), 'xavier_uniform')

    # training on a CPU through one autograd node (below); bench/bench_fisor_kernels.py turns it
    # off to compare
    backward_written_out = True

    def dropout_masks(self, x: torch.Tensor) -> list:
        """Draw each block's dropout mask for input ``x`` [B, in] (None where it drops nothing)."""
        return [dropout_mask(x.new_empty(x.shape[0], self.inp.out_features), block.dropout_rate)
                if block.training and block.dropout_rate > 0.0 else None
                for block in self.blocks]

    def forward(self, x: torch.Tensor, masks: Optional[list] = None) -> torch.Tensor:
        """``masks``: :meth:`dropout_masks` drawn beforehand (a compiled step takes them in)."""
        if (self.backward_written_out and torch.is_grad_enabled() and eager_cpu_float(x)
                and x.dim() == 2
                and all(isinstance(block.norm, nn.LayerNorm) for block in self.blocks)):
            # training on a CPU: the same operations with the backward written out (one graph
            # node for the network; autograd's ~10 per block cost more than their arithmetic)
            return _ResNetWithBackward.apply(
                x, self.dropout_masks(x) if masks is None else masks,
                self.blocks[0].norm.eps if self.blocks else 0.0, *self._parameters_in_order())
        x = self.inp(x)
        for k, block in enumerate(self.blocks):
            x = block(x, None if masks is None else masks[k])
        return self.out(mish(x))

    def _parameters_in_order(self):
        yield from (self.inp.weight, self.inp.bias)
        for block in self.blocks:
            yield from (block.norm.weight, block.norm.bias, block.fc1.weight, block.fc1.bias,
                        block.fc2.weight, block.fc2.bias)
        yield from (self.out.weight, self.out.bias)


class _ResNetWithBackward(torch.autograd.Function):
    """
    MLPResNet's forward (given its dropout masks) with the backward written out by hand.

    The operations are the modules' own, in their order, and the backward takes each product as
    torch's Linear backward takes it (dW = g^T a, dx = g W, db = the column sums of g), LayerNorm's
    backward kernel and mish's CPU forms: the same numbers as autograd through the modules
    (test_algos: bit for bit), as one autograd node where the modules make ~10 per block and
    an actor update spent more in that bookkeeping than in the arithmetic around the products.
    First derivatives only.
    """

    @staticmethod
    def forward(ctx, x, masks, eps, *params):
        w_in, b_in, w_out, b_out = params[0], params[1], params[-2], params[-1]
        loops = native.loops_apply(x)
        h = torch.addmm(b_in, x, w_in.t())
        saved = []
        for k, keep in enumerate(masks):
            gamma, beta, w1, b1, w2, b2 = params[2 + 6 * k: 8 + 6 * k]
            dropped = h if keep is None else h * keep
            normed, mean, rstd = torch.native_layer_norm(dropped, (h.shape[-1],), gamma, beta, eps)
            inner = torch.addmm(b1, normed, w1.t())
            activation = mish_value(inner, loops)
            h = h + torch.addmm(b2, activation, w2.t())
            saved += [dropped, normed, mean, rstd, inner, activation]
        activation = mish_value(h, loops)
        # saved as autograd saves: freed after the backward unless the graph is retained, and
        # checked against in-place changes since the forward; masks may be None
        ctx.save_for_backward(x, h, activation, *params, *masks, *saved)
        ctx.blocks, ctx.loops = len(masks), loops
        return torch.addmm(b_out, activation, w_out.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, h, last, *rest = ctx.saved_tensors
        blocks, loops = ctx.blocks, ctx.loops
        params, masks, saved = rest[:4 + 6 * blocks], rest[4 + 6 * blocks:4 + 7 * blocks], \
            rest[4 + 7 * blocks:]
        need = ctx.needs_input_grad[3:]
        grads = [None] * len(params)

        def linear(index, g, a, w, input_grad=True):
            """Fill the weight and bias gradients of params[index:index + 2]; return g W."""
            if need[index]:
                grads[index] = g.t().mm(a)
            if need[index + 1]:
                grads[index + 1] = g.sum(0)
            return g.mm(w) if input_grad else None

        g = mish_gradient(h, linear(len(params) - 2, grad, last, params[-2]), loops)
        for k in reversed(range(blocks)):
            dropped, normed, mean, rstd, inner, activation = saved[6 * k: 6 * k + 6]
            first = 2 + 6 * k
            gamma, beta, w1, _, w2, _ = params[first: first + 6]
            g_inner = mish_gradient(inner, linear(first + 4, g, activation, w2), loops)
            g_normed = linear(first + 2, g_inner, normed, w1)
            g_dropped, g_gamma, g_beta = torch.ops.aten.native_layer_norm_backward(
                g_normed, dropped, [dropped.shape[-1]], mean, rstd, gamma, beta,
                [True, need[first], need[first + 1]])
            grads[first], grads[first + 1] = g_gamma, g_beta
            g = g + (g_dropped if masks[k] is None else g_dropped * masks[k])
        g_x = linear(0, g, x, params[0], ctx.needs_input_grad[0])
        return (g_x, None, None, *grads)


class EpsilonNet(nn.Module):
    """
    Noise predictor eps(a_t, s, t) of a diffusion model over actions (IDQL's DDPM module).

    The time t goes through learnable Fourier features (initial frequency scale ``time_scale``:
    0.2 for FISOR's integer steps, 30 for DRCORL's continuous t in (0, 1], as in the official
    codes) and an MLP (mish) to a condition vector; concat[a_t, s, cond] goes through an
    MLPResNet that outputs the predicted noise. ``num_steps``: t takes only the integer values
    0..num_steps-1 (FISOR), so the condition is computed once per distinct step.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, num_blocks: int = 3,
                 dropout: float = 0.1, time_dim: int = 64,
                 cond_hidden: Sequence[int] = (128, 128), time_scale: float = 0.2,
                 num_steps: Optional[int] = None):
        super().__init__()
        self.time_features = FourierFeatures(time_dim, std=time_scale)
        self.cond = mlp([time_dim, *cond_hidden], Mish, init='xavier_uniform')
        self.body = MLPResNet(act_dim + obs_dim + cond_hidden[-1], act_dim, hidden, num_blocks,
                              dropout)
        # With integer steps 0..num_steps-1 (FISOR's DDPM) a batch holds at most num_steps
        # distinct t: the condition, a row-wise function of t, is evaluated on those and gathered
        # per row (same function, same parameters; not part of the state dict).
        self.num_steps = None if num_steps is None else int(num_steps)
        if self.num_steps is not None:
            self.register_buffer('step_grid', torch.arange(self.num_steps, dtype=torch.float32)
                                 .unsqueeze(-1), persistent=False)

    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """Return the condition vector of each row's time step t [M, 1]."""
        if self.num_steps is None:
            return self.cond(self.time_features(t))
        index = t.reshape(-1).long()
        if (not torch.jit.is_tracing() and not torch.compiler.is_compiling()
                and not torch.equal(index.to(t.dtype), t.reshape(-1))):
            raise ValueError(f'EpsilonNet with num_steps={self.num_steps} takes integer time '
                             f'steps 0..{self.num_steps - 1}, got non-integer t')
        table = self.cond(self.time_features(self.step_grid.to(t.dtype)))
        try:
            # index_select refuses a negative step too (indexing would take a row from the end)
            return table.index_select(0, index)
        except IndexError:
            raise IndexError(f'EpsilonNet with num_steps={self.num_steps} takes time steps '
                             f'0..{self.num_steps - 1}, got {int(index.min())}..'
                             f'{int(index.max())}') from None

    def forward(self, x_t: torch.Tensor, obs: torch.Tensor, t: torch.Tensor,
                masks: Optional[list] = None) -> torch.Tensor:
        """``masks``: the body's dropout masks (MLPResNet.dropout_masks), drawn when None."""
        return self.body(torch.cat([x_t, obs, self.time_condition(t)], dim=-1), masks)
