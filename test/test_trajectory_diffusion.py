"""The shared conditional trajectory diffusion: guidance, pins, respacing and a toy fit."""

from offline_training.algos.trajectory_diffusion import (apply_pin, cfg_combine, first_state_pin,
                                                         TrajectoryDiffusion,
                                                         TrajectoryDiffusionConfig)
import pytest
import torch


def test_cfg_combination_is_eq_8():
    uncond = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    cond = torch.tensor([[3.0, -1.0], [0.5, 4.0]])
    # w = 2: uncond + 2 (cond - uncond) = 2 cond - uncond.
    assert torch.equal(cfg_combine(uncond, cond, 2.0), torch.tensor([[5.0, 0.0], [0.5, 8.0]]))
    assert torch.equal(cfg_combine(uncond, cond, 1.0), cond)
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)


def test_guided_eps_uses_the_null_condition_for_the_unconditional_pass():
    torch.manual_seed(0)
    model = TrajectoryDiffusion(TrajectoryDiffusionConfig(horizon=3, dim=2, cond_dim=2, steps=5,
                                                          hidden=16, num_blocks=1, time_dim=8,
                                                          cond_hidden=8))
    x, cond, t = torch.randn(4, 3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2, 4])
    eps_c = model.eps(x, cond, t, torch.ones(4))
    eps_u = model.eps(x, cond, t, torch.zeros(4))
    # The unconditional pass ignores the condition entirely.
    assert torch.allclose(eps_u, model.eps(x, torch.randn(4, 2), t, torch.zeros(4)))
    # x0 parameterisation: eps = (x_k - sqrt(abar_k) x0_hat) / sqrt(1 - abar_k).
    abar = model.schedule.alpha_bars[t].view(-1, 1, 1)
    x0_hat = model.net(x, cond, t, torch.ones(4))
    assert torch.allclose(eps_c, (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt(), atol=1e-5)
    assert torch.allclose(model.guided_eps(x, cond, t, 2.0), eps_u + 2.0 * (eps_c - eps_u),
                          atol=1e-6)


def test_loss_is_the_epsilon_mse_on_hand_made_inputs():
    torch.manual_seed(0)
    model = TrajectoryDiffusion(TrajectoryDiffusionConfig(horizon=2, dim=1, cond_dim=1, steps=4,
                                                          hidden=8, num_blocks=1, time_dim=4,
                                                          cond_hidden=4, cond_dropout=0.0,
                                                          parameterization='eps'))

    class Constant(torch.nn.Module):
        def forward(self, x, cond, t, keep):
            return torch.zeros_like(x)

    model.net = Constant()
    torch.manual_seed(1)
    loss = model.loss(torch.zeros(3, 2, 1), torch.zeros(3, 1))
    torch.manual_seed(1)
    torch.randint(0, 4, (3,))
    eps = torch.randn(3, 2, 1)
    assert torch.allclose(loss, eps.pow(2).mean())      # predicting 0 costs E[eps^2]
    torch.manual_seed(1)
    weight = torch.tensor([0.0, 1.0]).view(1, 2, 1)
    weighted = model.loss(torch.zeros(3, 2, 1), torch.zeros(3, 1), weight=weight)
    assert torch.allclose(weighted, (eps[:, 1:] ** 2).sum() / eps.numel())


def test_first_state_pin_holds_exactly_and_steps_respace():
    torch.manual_seed(0)
    model = TrajectoryDiffusion(TrajectoryDiffusionConfig(horizon=5, dim=3, cond_dim=2, steps=10,
                                                          hidden=16, num_blocks=1, time_dim=8,
                                                          cond_hidden=8))
    starts = torch.randn(6, 3) * 3
    pin = first_state_pin(starts, 5)
    for steps in (10, 4, 1):
        out = model.sample(torch.rand(6, 2), guidance=2.0, steps=steps, pin=pin)
        assert out.shape == (6, 5, 3)
        assert torch.equal(out[:, 0], starts)
        assert not torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))
    assert model.sampling_steps(10).tolist() == list(range(9, -1, -1))
    assert model.sampling_steps(4).tolist() == [9, 6, 3, 0]
    with pytest.raises(ValueError, match='trained K'):
        model.sampling_steps(11)
    mask = torch.zeros(1, 5, 3, dtype=torch.bool)
    mask[0, 2, 1] = True
    pinned = apply_pin(torch.zeros(2, 5, 3), (mask, torch.full((2, 5, 3), 7.0)))
    assert pinned.sum() == 14.0 and (pinned[:, 2, 1] == 7.0).all()


def test_a_tiny_model_samples_the_mode_its_condition_asks_for():
    torch.manual_seed(0)
    config = TrajectoryDiffusionConfig(horizon=4, dim=2, cond_dim=2, steps=10, hidden=64,
                                       num_blocks=2, time_dim=16, cond_hidden=32)
    model = TrajectoryDiffusion(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Two modes: a rising ramp (condition [1, 0]) and a falling one (condition [0, 1]).
    ramp = torch.linspace(-1, 1, 4).view(1, 4, 1).expand(1, 4, 2)
    for _ in range(600):
        up = torch.rand(64) < 0.5
        x0 = torch.where(up.view(-1, 1, 1), ramp, -ramp) + 0.05 * torch.randn(64, 4, 2)
        cond = torch.stack([up.float(), (~up).float()], dim=1)
        loss = model.loss(x0, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cond = torch.tensor([[1.0, 0.0]] * 32 + [[0.0, 1.0]] * 32)
    out = model.sample(cond, guidance=2.0, generator=torch.Generator().manual_seed(0))
    slope = (out[:, -1] - out[:, 0]).mean(dim=1)
    assert (slope[:32] > 1.0).float().mean() >= 0.9     # rising: +2 in the data
    assert (slope[32:] < -1.0).float().mean() >= 0.9    # falling: -2
    assert (out[:32] - ramp).abs().mean() < 0.3


def test_loss_keeps_pinned_entries_clean_in_x_k():
    model = TrajectoryDiffusion(TrajectoryDiffusionConfig(horizon=3, dim=2, cond_dim=1, steps=4,
                                                          hidden=8, num_blocks=1, time_dim=4,
                                                          cond_hidden=4))
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, cond, t, keep):
            seen.append(x.clone())
            return torch.zeros_like(x)

    model.net = Recorder()
    x0 = torch.randn(5, 3, 2)
    mask = torch.zeros(1, 3, 2, dtype=torch.bool)
    mask[:, 0] = True
    model.loss(x0, torch.zeros(5, 1), pin_mask=mask)
    assert torch.equal(seen[0][:, 0], x0[:, 0]) and not torch.equal(seen[0][:, 1:], x0[:, 1:])
