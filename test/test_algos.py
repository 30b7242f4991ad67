"""Unit tests of the algorithm pieces: every loss against values computed by hand."""

import copy
import math
import types

import numpy as np
from offline_training.algos import (ALGORITHMS, bc, bcq_lag, critics, fisor, get_algorithm,
                                    networks)
from offline_training.algos.batching import ReplayBuffer
from offline_training.algos.critics import expectile_loss
from offline_training.algos.diffusion import (ddpm_sample, DiffusionSchedule, dropout,
                                              EpsilonNet, MLPResNet, vp_beta_schedule)
from offline_training.algos.fisor import cosine_decay, reversed_expectile_loss
from offline_training.algos.infrastructure import adam
from offline_training.algos.networks import Mish, mish, QEnsemble, soft_update, VectorizedLinear
from offline_training.algos.protocol import PRESET_NAMES, protocol_problems, Trainer
from offline_training.data.synthetic import synthetic_dataset
import pytest
from saferl_ros.errors import ConfigError
from saferl_ros.tasks import get_task
import torch

torch.set_num_threads(1)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- shared pieces

def test_expectile_losses_by_hand():
    u = t([-2.0, 0.5, 1.0])
    # IQL (Eq. 15): weight 1 - tau below zero, tau above.
    assert torch.allclose(expectile_loss(u, 0.9), t([0.1 * 4, 0.9 * 0.25, 0.9]))
    # FISOR's reversed expectile (Eq. 8): weight tau below zero, 1 - tau above.
    assert torch.allclose(reversed_expectile_loss(u, 0.9), t([0.9 * 4, 0.1 * 0.25, 0.1]))


def test_vp_schedule_matches_jaxrl5_values():
    betas = vp_beta_schedule(5, 0.1, 10.0)
    assert torch.allclose(betas, t([0.1959, 0.4588, 0.6358, 0.7549, 0.8350]), atol=1e-4)
    schedule = DiffusionSchedule(5)
    assert torch.allclose(schedule.alpha_bars,
                          t([0.80413, 0.43518, 0.15850, 0.03885, 0.00641]), atol=1e-4)
    x0, eps = t([[0.5]]), t([[2.0]])
    expected = math.sqrt(0.43518) * 0.5 + math.sqrt(1 - 0.43518) * 2.0
    assert schedule.q_sample(x0, torch.tensor([1]), eps).item() == pytest.approx(expected, 1e-4)


def test_soft_update_and_cosine_decay():
    target, source = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(target.weight)
    torch.nn.init.ones_(source.weight)
    soft_update(target, source, 0.1)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.1))
    assert cosine_decay(0, 100) == 1.0
    assert cosine_decay(50, 100) == pytest.approx(0.5)
    assert cosine_decay(100, 100) == pytest.approx(0.0)
    assert cosine_decay(250, 100) == pytest.approx(0.0)


def test_mish_matches_its_definition_and_derivative():
    # Values and slopes against x tanh(softplus(x)) in float64, over the whole range the networks
    # see and beyond (large |x|: the sigmoid saturates, no NaN, the right limits).
    x = torch.linspace(-60.0, 60.0, 24001, dtype=torch.float64)
    exact = x * torch.tanh(torch.nn.functional.softplus(x))
    assert torch.allclose(mish(x), exact, rtol=1e-12, atol=1e-12)
    x32 = x.float()
    assert (mish(x32).double() - exact).abs().max() < 2e-6
    assert torch.isfinite(mish(x32)).all() and mish(t([-100.0])).abs().item() < 1e-30
    assert mish(t([100.0])).item() == 100.0
    sample = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mish, (sample,))
    # The derivative against autograd through the textbook formula.
    y = torch.linspace(-30, 30, 601, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(mish(y).sum(), y)
    y2 = y.detach().clone().requires_grad_(True)
    (reference,) = torch.autograd.grad((y2 * torch.tanh(torch.nn.functional.softplus(y2))).sum(),
                                       y2)
    assert torch.allclose(slope, reference, rtol=1e-10, atol=1e-12)
    assert torch.equal(Mish()(y.detach()), mish(y.detach()))
    # First derivatives only: a second backward pass raises instead of dropping terms.
    (first,) = torch.autograd.grad(mish(sample).sum(), sample, create_graph=True)
    with pytest.raises(RuntimeError):
        first.sum().backward()
    # Half precision is torch's own kernel (more accurate there than the sigmoid form).
    half = torch.linspace(-8, 8, 101).to(torch.bfloat16)
    assert torch.equal(mish(half), torch.nn.functional.mish(half))


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_mish_is_torch_mish_while_exporting():
    # Export traces aten::mish (export.py maps it to ONNX operators); the sigmoid form would be
    # an opaque Python function in the traced graph.
    traced = torch.jit.trace(Mish(), (torch.randn(4),))
    assert 'aten::mish' in str(traced.graph)


def _descend(optimizer, net, data, steps=1):
    """Take ``steps`` optimiser steps on the toy loss sum(net(data)^2)."""
    for _ in range(steps):
        optimizer.zero_grad()
        net(data).pow(2).sum().backward()
        optimizer.step()


def test_adam_uses_the_fused_kernel_where_it_exists():
    float_net = torch.nn.Linear(3, 2)
    assert adam(float_net.parameters(), lr=1e-3).defaults['fused'] is True
    decayed = adam(float_net.parameters(), lr=1e-3, weight_decay=0.01)
    assert isinstance(decayed, torch.optim.AdamW) and decayed.defaults['weight_decay'] == 0.01
    # Only float32 parameters get the fused kernel; others torch's default implementation.
    double_net = torch.nn.Linear(3, 2).double()
    assert not adam(double_net.parameters(), lr=1e-3).defaults['fused']
    # One step equals torch's reference (per-tensor loop) implementation.
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    b.load_state_dict(a.state_dict())
    fused = adam(a.parameters(), lr=1e-2)
    loop = torch.optim.Adam(b.parameters(), lr=1e-2, foreach=False)
    data = torch.randn(8, 5)
    for opt, net in ((fused, a), (loop, b)):
        _descend(opt, net, data, steps=3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_adam_keeps_its_kernel_when_resuming_an_older_state():
    # A checkpoint written by torch's per-tensor Adam (every run before the fused kernel) must
    # resume on the fused kernel, and continue the same optimisation.
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    data = torch.randn(8, 5)
    old = torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False)
    _descend(old, a, data, steps=2)
    b.load_state_dict(a.state_dict())
    resumed = adam(b.parameters(), lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))   # as from a checkpoint file
    assert resumed.param_groups[0]['fused'] is True
    _descend(old, a, data)
    _descend(resumed, b, data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_q_ensemble_heads_are_independent_networks():
    torch.manual_seed(0)
    q = QEnsemble(3, 2, (8,), num_heads=2)
    out = q(torch.randn(5, 3), torch.randn(5, 2))
    assert out.shape == (2, 5)
    assert not torch.allclose(out[0], out[1])


def test_width_one_ensemble_layer_is_the_batched_product():
    # A critic's last layer (output width 1) runs as one transposed batched product on a CPU;
    # values and first derivatives are those of the batched product, for every member or a
    # selection of them, with [E, B, in] or a shared [B, in] input; a traced graph keeps baddbmm.
    torch.manual_seed(0)
    f64 = torch.float64
    layer = VectorizedLinear(6, 1, ensemble_size=3).double()
    with torch.no_grad():
        layer.bias.normal_()
    for shared_input in (False, True):
        for members, size in ((None, 3), (slice(1, 3), 2)):
            x = torch.randn(*(() if shared_input else (size,)), 5, 6, dtype=f64,
                            requires_grad=True)
            weight, bias = ((layer.weight, layer.bias) if members is None
                            else (layer.weight[members], layer.bias[members]))
            grad = torch.randn(size, 5, 1, dtype=f64)
            ours = layer(x, members)
            assert ours.grad_fn.name() == '_ThinEnsembleLinearBackward'
            reference = torch.baddbmm(bias, x.expand(size, 5, 6), weight)
            inputs = (x, layer.weight, layer.bias)
            for a, b in zip((ours, *torch.autograd.grad(ours, inputs, grad)),
                            (reference, *torch.autograd.grad(reference, inputs, grad))):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    x = torch.randn(3, 5, 6, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(networks._ThinEnsembleLinear.apply,
                                    (x, layer.weight, layer.bias))
    traced = torch.jit.trace(QEnsemble(3, 2, (8,), num_heads=2),
                             (torch.randn(4, 3), torch.randn(4, 2)))
    graph = str(traced.inlined_graph)
    assert 'aten::baddbmm' in graph and 'PythonOp' not in graph
    # an input for another number of members is refused, not read member by member
    with pytest.raises(ValueError, match='for 3 members'):
        layer(torch.randn(2, 5, 6, dtype=f64))


def _check_like_autograd_graphs(net, by_modules, x, direction):
    """Check a one-node network's graph behaves as the modules': retained, guarded in place."""
    results = []
    for forward in (net, by_modules):
        torch.manual_seed(5)
        y = (forward(x) * direction).sum()
        first = torch.autograd.grad(y, list(net.parameters()), retain_graph=True)
        second = torch.autograd.grad(y, list(net.parameters()))      # the retained graph again
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        results.append(first)
        torch.manual_seed(5)
        y = (forward(x) * direction).sum()
        with torch.no_grad():                      # an in-place change after the forward to
            list(net.parameters())[-2].add_(0.0)   # the last weight, which both backwards read,
        with pytest.raises(RuntimeError, match='modified by an inplace operation'):
            y.backward()                           # is refused, not read silently
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _resnet_by_modules(net, x):
    """Run MLPResNet's forward through its modules (autograd's backward, a node per operation)."""
    h = net.inp(x)
    for block in net.blocks:
        h = block(h)
    return net.out(mish(h))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_resnet_backward_written_out_is_autograds_bit_for_bit(dtype):
    # MLPResNet trains on a CPU through one autograd node with its backward written out: output
    # and every gradient equal autograd's through the modules exactly (same dropout masks from
    # the same generator state), in training and evaluation mode, with frozen parameters (no
    # gradient asked, none computed) and with or without a gradient for the input
    torch.manual_seed(0)
    net = MLPResNet(20, 3, hidden=32, num_blocks=2, dropout=0.1).to(dtype)
    direction = torch.linspace(-1.0, 1.0, 3, dtype=dtype)
    for training, frozen, input_grad in ((True, False, True), (False, False, True),
                                         (True, True, False)):
        net.train(training)
        net.blocks[1].requires_grad_(not frozen)
        x = torch.randn(64, 20, dtype=dtype, requires_grad=input_grad)
        results = []
        for forward in (net, lambda x: _resnet_by_modules(net, x)):
            torch.manual_seed(5)
            y = forward(x)
            inputs = [t for t in (x, *net.parameters()) if t.requires_grad]
            results.append((y.detach(), *torch.autograd.grad((y * direction).sum(), inputs)))
        assert len(results[0]) == len(results[1])
        assert all(torch.equal(a, b) for a, b in zip(*results))
    net.requires_grad_(True)
    y = net(x)
    assert y.grad_fn.name() == '_ResNetWithBackwardBackward'
    _check_like_autograd_graphs(net, lambda x: _resnet_by_modules(net, x), x, direction)
    # a block in evaluation mode inside a network in training mode drops nothing
    net.train()
    net.blocks[0].eval()
    torch.manual_seed(5)
    ours = net(x)
    torch.manual_seed(5)
    assert torch.equal(ours, _resnet_by_modules(net, x))
    # while tracing for export it is the modules' forward (operators the exporter maps)
    net.eval()
    traced = torch.jit.trace(net.float(), torch.randn(4, 20))
    assert 'PythonOp' not in str(traced.inlined_graph)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_relu_ensemble_backward_written_out_is_autograds_bit_for_bit(dtype):
    # the critics' ReLU ensembles train on a CPU through one autograd node: values and every
    # gradient equal autograd's through the modules exactly, with and without a gradient for
    # the input (DRCORL's and BCQ-Lag's actors differentiate Q through the action) and with a
    # frozen layer; forward-only evaluations (targets) give the same values too
    torch.manual_seed(0)
    net = networks.EnsembleMLP(10, (32, 32), 4).to(dtype)
    direction = torch.randn(4, 64, dtype=dtype)
    for input_grad, frozen in ((True, False), (False, False), (True, True)):
        net.net[2].requires_grad_(not frozen)
        x = torch.randn(64, 10, dtype=dtype, requires_grad=input_grad)
        results = []
        for forward in (net, lambda x: net.net(x).squeeze(-1)):
            y = forward(x)
            inputs = [t for t in (x, *net.parameters()) if t.requires_grad]
            results.append((y.detach(), *torch.autograd.grad((y * direction).sum(), inputs)))
        assert len(results[0]) == len(results[1])
        assert all(torch.equal(a, b) for a, b in zip(*results))
    assert net(x).grad_fn.next_functions[0][0].name() == '_ReluEnsembleWithBackwardBackward'
    net.requires_grad_(True)
    _check_like_autograd_graphs(net, lambda x: net.net(x).squeeze(-1), x, direction)
    with torch.no_grad():
        assert torch.equal(net(x), net.net(x).squeeze(-1))
    # a selection of members, and tracing for export, take the modules
    assert torch.equal(net(x, slice(1, 3)).detach(), net.net(x).squeeze(-1)[1:3].detach())
    traced = torch.jit.trace(networks.EnsembleMLP(3, (8,), 2), torch.randn(4, 3))
    assert 'PythonOp' not in str(traced.inlined_graph)


def test_replay_buffer_vectorised_sampling_is_seeded():
    arrays = {'obs': np.arange(20, dtype=np.float32).reshape(10, 2),
              'act': np.arange(10, dtype=np.float32)}
    a = ReplayBuffer(arrays, 'cpu', seed=3).sample(6)
    b = ReplayBuffer(arrays, 'cpu', seed=3).sample(6)
    assert torch.equal(a['obs'], b['obs'])
    # rows stay aligned across keys
    assert torch.equal(a['obs'][:, 0] / 2, a['act'])
    with pytest.raises(ValueError, match='different lengths'):
        ReplayBuffer({'obs': np.zeros((3, 2)), 'act': np.zeros(4)}, 'cpu')


# --------------------------------------------------------------------------- FISOR losses

def test_feasibility_h_relabels_costs():
    h = fisor.feasibility_h(t([0.0, 1.0, 0.5, 0.0]))
    assert torch.equal(h, t([-1.0, 25.0, 25.0, -1.0]))


def test_feasible_bellman_target_with_terminal_and_timeout():
    h = t([-1.0, -1.0, 25.0, -1.0, 25.0])
    v_next = t([-0.5, 3.0, -1.0, 7.0, 5.0])
    mask = t([1.0, 1.0, 1.0, 0.0, 0.0])   # the last two end the episode (terminal or timeout)
    target = fisor.feasible_bellman_target(h, v_next, mask, gamma=0.9)
    expected = t([0.1 * -1 + 0.9 * -0.5,   # safe now and later: the discounted mix
                  0.1 * -1 + 0.9 * 3.0,    # safe now, V_h(s') > h: the future violation counts
                  0.1 * 25 + 0.9 * 25.0,   # unsafe now: max(h, V_h(s')) = h
                  -1.0, 25.0])             # done: the target is h(s) itself
    assert torch.allclose(target, expected)


def test_prepare_arrays_masks_terminals_and_timeouts():
    data = synthetic_dataset(episodes=2, max_length=3, fixed_length=True, terminal_fraction=0)
    data['terminals'][1] = 1.0
    data['costs'][:] = t([0, 1, 0, 0, 2, 0]).numpy()
    data['actions'][0] = [1.0, -1.0]
    config = fisor.make_config('paper', reward_scale=2.0)
    arrays = fisor.prepare_arrays(data, config)
    assert arrays['mask'].tolist() == [1, 0, 0, 1, 1, 0]  # terminal at 1, timeouts at 2 and 5
    assert arrays['h'].tolist() == [-1, 25, -1, -1, 25, -1]
    assert np.allclose(arrays['reward'], data['rewards'] * 2.0)
    assert np.abs(arrays['act']).max() < 1.0   # clipped to +-(1 - 1e-5)


def test_value_losses_by_hand():
    heads = t([[1.0, -1.0], [3.0, -2.0]])            # [2 heads, batch 2]
    # V_h: u = max heads - V_h = [3, -1] - [2, 0] = [1, -1] -> (0.1 * 1 + 0.9 * 1) / 2
    assert fisor.feasible_value_loss(heads, t([2.0, 0.0]), 0.9).item() == pytest.approx(0.5)
    # V_r: u = min heads - V_r = [1, -2] -> (0.9 * 1 + 0.1 * 4) / 2
    assert critics.reward_value_loss(heads, t([0.0, 0.0]), 0.9).item() == pytest.approx(0.65)


def test_critic_losses_by_hand():
    heads = t([[1.0, 2.0], [3.0, 4.0]])
    assert fisor.critic_mse(heads, t([1.0, 1.0])).item() == pytest.approx((0 + 1 + 4 + 9) / 4)
    target = critics.reward_target(t([1.0, 2.0]), t([10.0, 10.0]), t([1.0, 0.0]), 0.9)
    assert torch.allclose(target, t([10.0, 2.0]))


def test_policy_weights_at_boundaries_and_clips():
    config = fisor.FisorConfig()
    q_r = t([0.5, 0.5, 0.1, 0.0, 2.0, 0.0, 0.0])
    v_r = t([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    q_h = t([-0.1, 0.1, 0.0, 0.0, -1.0, -1.0, 3.0])
    v_h = t([-0.5, -0.5, 0.0, 1e-6, -1.0, 1.0, 1.0])
    w = fisor.policy_weights(q_r, v_r, q_h, v_h, config)
    expected = [
        math.exp(3 * 0.5),         # feasible state and action: exp(alpha_1 A_r)
        0.0,                       # feasible state, Q_h > 0: dropped
        math.exp(3 * 0.1),         # V_h = 0 and Q_h = 0 count as feasible (<= 0)
        math.exp(5 * (1e-6 - 0)),  # V_h just above 0: infeasible branch exp(alpha_2 (V_h - Q_h))
        100.0,                     # exp(3 * 2) = 403 clipped at 100
        150.0,                     # exp(5 * 2) clipped at 150
        math.exp(5 * (1 - 3)),     # infeasible state, worse action: small weight
    ]
    assert torch.allclose(w, t(expected), rtol=1e-5)


def test_weighted_denoising_loss_by_hand():
    eps_pred = t([[1.0, 0.0], [0.0, 2.0]])
    loss = fisor.weighted_denoising_loss(eps_pred, torch.zeros(2, 2), t([2.0, 0.5]))
    assert loss.item() == pytest.approx((2.0 * 1.0 + 0.5 * 4.0) / 2)


def test_paper_preset_has_the_paper_values():
    c = fisor.make_config('paper')
    assert (c.steps, c.actor_batch_size * c.actor_updates_per_step, c.critic_batch_size) == (
        1_000_000, 2048, 256)
    assert (c.expectile, c.feasibility_expectile, c.violation_value, c.safe_value) == (
        0.9, 0.9, 25.0, -1.0)
    assert (c.reward_temperature, c.cost_temperature) == (3.0, 5.0)
    assert (c.reward_weight_max, c.cost_weight_max) == (100.0, 150.0)
    assert (c.diffusion_steps, c.beta_min, c.beta_max, c.num_candidates) == (5, 0.1, 10.0, 16)
    assert (c.actor_ema, c.critic_tau, c.actor_lr, c.gamma) == (0.001, 0.005, 3e-4, 0.99)
    cpu = fisor.make_config('cpu')
    assert cpu.steps < c.steps and cpu.actor_hidden < c.actor_hidden
    with pytest.raises(KeyError, match='unknown FISOR preset'):
        fisor.make_config('gpu-cluster')


# --------------------------------------------------------------------------- FISOR sampler

def _reference_ddpm(noise, schedule, clip=True):
    """DDPM with a zero noise predictor, written out with numpy."""
    betas = schedule.betas.double().numpy()
    alphas = 1 - betas
    x = noise[:, :, 0].astype(np.float64)
    steps = len(betas)
    for k in range(steps):
        step = steps - 1 - k
        x = x / np.sqrt(alphas[step])
        if step > 0:
            x = x + np.sqrt(betas[step]) * noise[:, :, k + 1]
        if clip:
            x = np.clip(x, -1, 1)
    return x


def test_ddpm_sampler_clips_and_uses_the_given_noise():
    schedule = DiffusionSchedule(5)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2, 3, 6, 2)).astype(np.float32) * 0.3
    noise[0, 0, 0] = [5.0, -5.0]   # would leave [-1, 1] without the clip

    def zero_eps(x, obs, t_in):
        assert t_in.shape == (x.shape[0], 1)
        return torch.zeros_like(x)

    obs = torch.zeros(2, 4)
    out = ddpm_sample(zero_eps, schedule, obs, torch.from_numpy(noise))
    assert out.shape == (2, 3, 2)
    assert np.allclose(out.numpy(), _reference_ddpm(noise, schedule), atol=1e-5)
    assert out.abs().max() <= 1.0
    unclipped = ddpm_sample(zero_eps, schedule, obs, torch.from_numpy(noise), clip=False)
    assert unclipped.abs().max() > 1.0
    # the draw of the last step (t = 0) is not used, as in jaxrl5's sampler
    changed = noise.copy()
    changed[:, :, -1] += 10.0
    assert torch.equal(out, ddpm_sample(zero_eps, schedule, obs, torch.from_numpy(changed)))
    with pytest.raises(ValueError, match='noise must have shape'):
        ddpm_sample(zero_eps, schedule, obs, torch.zeros(2, 3, 5, 2))


def test_step_table_is_the_per_row_condition():
    # With integer steps the condition is computed once per step and gathered: same values and
    # same gradients as evaluating the time MLP on every row (the parameters are shared).
    torch.manual_seed(0)
    per_row = EpsilonNet(4, 2, hidden=16, num_blocks=1, dropout=0.0, time_dim=8,
                         cond_hidden=(16, 16)).double()
    table = EpsilonNet(4, 2, hidden=16, num_blocks=1, dropout=0.0, time_dim=8,
                       cond_hidden=(16, 16), num_steps=5).double()
    table.load_state_dict(per_row.state_dict())       # no new entry in the state dict
    x, obs = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    steps = torch.randint(0, 5, (64, 1)).double()
    outputs, grads = [], []
    for net in (per_row, table):
        out = net(x, obs, steps)
        (out ** 2).sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match='integer time steps 0..4'):
        table(x, obs, steps + 0.5)
    for outside in (5.0, -1.0):      # -1 would take the last row if it were not refused
        with pytest.raises(IndexError, match='takes time steps 0..4'):
            table(x, obs, torch.full((64, 1), outside, dtype=torch.float64))


def test_dropout_zeroes_a_fraction_p_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    zero_fraction = (y == 0).double().mean().item()
    assert abs(zero_fraction - 0.1) < 0.003            # ~7 standard deviations
    assert torch.unique(y.detach()).tolist() == pytest.approx([0.0, 1 / 0.9])
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())             # d/dx (x * mask / 0.9) = mask / 0.9
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    with pytest.raises(ValueError, match='dropout must be in'):
        EpsilonNet(4, 2, dropout=1.0)


def _small_fisor(obs_dim=4, act_dim=2):
    config = fisor.make_config('cpu', actor_hidden=32, actor_blocks=1, critic_hidden=(32, 32),
                               cond_hidden=(16, 16), time_dim=8, reward_scale=1.0)
    torch.manual_seed(0)
    return fisor.build_model(obs_dim, act_dim, config).eval(), config


def test_select_safest_takes_argmin_of_max_head_q_h():
    model, _ = _small_fisor()
    obs = torch.zeros(2, 4)
    candidates = t([[[0.3, 0.0], [-0.2, 0.5], [0.9, 0.9]],
                    [[0.1, 0.0], [0.1, 1.0], [0.4, 0.0]]])
    # A Q_h that is the first action coordinate: the safest candidate has the smallest one.
    model.q_h_max = lambda o, a: a[:, 0]
    chosen = model.select_safest(obs, candidates)
    assert torch.equal(chosen, t([[-0.2, 0.5], [0.1, 0.0]]))   # a tie goes to the first


def test_feasible_maxq_takes_the_best_reward_among_feasible_candidates():
    model, _ = _small_fisor()
    obs = torch.zeros(3, 4)
    candidates = t([[[0.3, 0.9], [-0.2, 0.5], [-0.9, 0.1]],     # two feasible: best reward 0.5
                    [[0.1, 0.0], [0.2, 1.0], [0.4, 0.7]],       # none feasible: argmin Q_h
                    [[0.0, 0.2], [-0.5, 0.2], [0.5, 0.9]]])     # Q_h = 0 is feasible; reward tie
    # Q_h is the first action coordinate, Q_r the second.
    model.q_h_max = lambda o, a: a[:, 0]
    model.q_r_min = lambda o, a: a[:, 1]
    chosen = model.select_feasible_best(obs, candidates)
    assert torch.equal(chosen, t([[-0.2, 0.5], [0.1, 0.0], [0.0, 0.2]]))
    # 'minqc' on the same candidates: the smallest Q_h, whatever the reward
    assert torch.equal(model.select_safest(obs, candidates),
                       t([[-0.9, 0.1], [0.1, 0.0], [-0.5, 0.2]]))
    noise = model.sample_noise(3, generator=torch.Generator().manual_seed(0))
    model.selection = 'feasible-maxq'
    assert torch.equal(model.act(obs, noise),
                       model.select_feasible_best(obs, model.sample_candidates(obs, noise)))
    assert torch.equal(model.fallback(obs, noise),
                       model.select_safest(obs, model.sample_candidates(obs, noise)))
    with pytest.raises(ConfigError, match="selection 'maxq'"):
        fisor.make_config('cpu', selection='maxq')
    # A NaN or -inf reward value never lets an infeasible candidate win (argmax of a row that is
    # -inf everywhere would return the first, infeasible, candidate).
    for bad in (-math.inf, math.nan):
        model.q_r_min = lambda o, a: torch.full((len(a),), bad)
        chosen = model.select_feasible_best(obs, candidates)
        assert (model.q_h_max(obs, chosen) <= 0).tolist() == [True, False, True], bad


def test_select_safest_uses_max_over_q_h_heads():
    model, _ = _small_fisor()
    obs, act = torch.randn(5, 4), torch.rand(5, 2) * 2 - 1
    heads = model.q_h_target(obs, act)
    assert torch.equal(model.q_h_max(obs, act), heads.max(dim=0).values)
    assert torch.equal(model.q_r_min(obs, act), model.q_r_target(obs, act).min(dim=0).values)
    v_h, q_h = model.feasibility(obs, act)
    assert v_h.shape == q_h.shape == (5,)


def test_fisor_act_is_a_function_of_the_noise():
    model, config = _small_fisor()
    obs = torch.randn(3, 4)
    noise = model.sample_noise(3, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (3, config.num_candidates, config.diffusion_steps + 1, 2)
    a1, a2 = model.act(obs, noise), model.act(obs, noise.clone())
    assert torch.equal(a1, a2) and a1.shape == (3, 2) and a1.abs().max() <= 1.0
    assert not torch.equal(a1, model.act(obs, model.sample_noise(3)))
    # the candidates the policy chooses from are the sampler's output for that noise
    candidates = model.sample_candidates(obs, noise)
    assert torch.equal(a1, model.select_safest(obs, candidates))
    fallback = model.fallback(obs, model.sample_noise(3, config.fallback_candidates))
    assert fallback.shape == (3, 2)
    modules = model.export_modules()
    assert torch.equal(modules['policy'](obs, noise), a1)


@pytest.mark.parametrize('critic_batch', [64, 32])
def test_joint_iteration_shares_forwards_without_changing_a_number(
        critic_batch, ballcircle_arrays):
    # One joint iteration evaluates the target critics and the values on the first actor half
    # once (for Eq. 13's weights and for Eq. 8/15's losses). It must train exactly as the
    # iteration written out step by step: actor, actor, then the critics on their own forwards.
    task = get_task('BallCircle')
    config = fisor.resolve_config(fisor.make_config(
        'test', schedule='joint', critic_batch_size=critic_batch), task)
    runs = []
    for shared in (True, False):
        torch.manual_seed(0)
        model = fisor.build_model(task.obs_dim, task.act_dim, config)
        trainer = fisor.make_trainer(model, config)
        buffer = ReplayBuffer(fisor.prepare_arrays(ballcircle_arrays, config),
                              torch.device('cpu'), seed=0)
        model.train()
        for _ in range(3):
            if shared:
                logs = trainer.update(buffer)
                continue
            batch = buffer.sample(config.actor_batch_size * config.actor_updates_per_step)
            for k in range(config.actor_updates_per_step):
                rows = slice(k * config.actor_batch_size, (k + 1) * config.actor_batch_size)
                trainer.actor_update({key: v[rows] for key, v in batch.items()})
            logs = trainer.critic_update(
                {key: v[:config.critic_batch_size] for key, v in batch.items()})
        runs.append((model.state_dict(), logs))
    (a, logs_a), (b, logs_b) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert all(torch.equal(logs_a[key], logs_b[key]) for key in logs_b)
    # and the iteration really did train the critics and the actor
    assert not torch.equal(a['q.net.net.0.weight'], a['q_target.net.net.0.weight'])


def _separate_critics(model):
    """Return copies of the model's stacked critics as the official code's separate networks."""
    reward, feasibility = model.reward_heads, model.feasibility_heads
    nets = {}
    for name, stacked, heads in (('q_r', model.q, reward), ('q_h', model.q, feasibility),
                                 ('q_r_target', model.q_target, reward),
                                 ('q_h_target', model.q_target, feasibility),
                                 ('v_r', model.v, fisor.VALUES['v_r']),
                                 ('v_h', model.v, fisor.VALUES['v_h'])):
        net = copy.deepcopy(stacked)
        for layer in net.modules():
            if isinstance(layer, VectorizedLinear):
                layer.weight = torch.nn.Parameter(layer.weight.detach()[heads].clone())
                layer.bias = torch.nn.Parameter(layer.bias.detach()[heads].clone())
                layer.ensemble_size = layer.weight.shape[0]
        nets[name] = net
    return nets


def test_stacked_critic_update_is_the_official_four_updates(ballcircle_arrays):
    # The reward and the feasibility critics are stored stacked and stepped together; that must
    # be the official code's V_r, Q_r, V_h, Q_h updates with four optimisers, in its order.
    task = get_task('BallCircle')
    config = fisor.resolve_config(fisor.make_config('test'), task)
    torch.manual_seed(0)
    model = fisor.build_model(task.obs_dim, task.act_dim, config)
    trainer = fisor.make_trainer(model, config)
    nets, initial = _separate_critics(model), _separate_critics(model)
    opts = {name: adam(nets[name].parameters(), lr=config.critic_lr if name[0] == 'q'
                       else config.value_lr) for name in ('v_r', 'q_r', 'v_h', 'q_h')}

    def step(name, loss):
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()
    buffer = ReplayBuffer(fisor.prepare_arrays(ballcircle_arrays, config), torch.device('cpu'),
                          seed=0)
    for _ in range(3):
        batch = buffer.sample(config.critic_batch_size)
        logs = trainer.critic_update(batch)
        obs, act, mask = batch['obs'], batch['act'], batch['mask']

        def official(kind, value_loss, expectile, bellman_target):
            # the official code's update_v then update_q (or update_vc then update_qc)
            with torch.no_grad():
                q_targets = nets[f'q_{kind}_target'](obs, act)
            v_loss = value_loss(q_targets, nets[f'v_{kind}'](obs)[0], expectile)
            step(f'v_{kind}', v_loss)
            with torch.no_grad():
                target = bellman_target(nets[f'v_{kind}'](batch['next_obs'])[0])
            q_loss = fisor.critic_mse(nets[f'q_{kind}'](obs, act), target)
            step(f'q_{kind}', q_loss)
            soft_update(nets[f'q_{kind}_target'], nets[f'q_{kind}'], config.critic_tau)
            return v_loss, q_loss
        v_r_loss, q_r_loss = official(
            'r', critics.reward_value_loss, config.expectile,
            lambda v_next: critics.reward_target(batch['reward'], v_next, mask, config.gamma))
        v_h_loss, q_h_loss = official(
            'h', fisor.feasible_value_loss, config.feasibility_expectile,
            lambda v_next: fisor.feasible_bellman_target(batch['h'], v_next, mask, config.gamma))
        for key, loss in (('loss/v_r', v_r_loss), ('loss/q_r', q_r_loss),
                          ('loss/v_h', v_h_loss), ('loss/q_h', q_h_loss)):
            assert torch.allclose(logs[key], loss, rtol=1e-5, atol=1e-6), key
    ours = _separate_critics(model)
    for name, net in nets.items():
        for (key, a), b in zip(net.state_dict().items(), ours[name].state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, key)
    # the critics did move: a comparison of untrained networks would prove nothing
    for name in ('q_r', 'q_h', 'v_r', 'v_h'):
        assert not torch.allclose(next(nets[name].parameters()),
                                  next(initial[name].parameters())), name


def _separate_layout(model_state, trainer_state):
    """Return a checkpoint as saved before the critics were stacked (separate modules)."""
    old = {}
    for key, value in model_state.items():
        for stacked, first, second in (('q.', 'q_r.', 'q_h.'),
                                       ('q_target.', 'q_r_target.', 'q_h_target.')):
            if key.startswith(stacked):
                heads = value.shape[0] // 2
                old[first + key[len(stacked):]] = value[:heads].clone()
                old[second + key[len(stacked):]] = value[heads:].clone()
                break
        else:
            if key.startswith('v.'):     # nn.Linear: weight [out, in], bias [out]
                for member, name in enumerate(('v_r.', 'v_h.')):
                    piece = value[member]
                    old[name + key[2:]] = piece.T.clone() if key.endswith('weight') else piece[0]
            else:
                old[key] = value
    trainer = {k: v for k, v in trainer_state.items() if k not in ('q_opt', 'v_opt')}
    for stacked, names in (('q_opt', ('q_r_opt', 'q_h_opt')), ('v_opt', ('v_r_opt', 'v_h_opt'))):
        for member, name in enumerate(names):
            state = {}
            for index, entry in trainer_state[stacked]['state'].items():
                state[index] = {}
                for field, value in entry.items():
                    if value.dim() == 0:
                        state[index][field] = value.clone()
                    elif stacked == 'q_opt':
                        heads = value.shape[0] // 2
                        state[index][field] = value[member * heads:(member + 1) * heads].clone()
                    else:                # parameters alternate weight, bias
                        piece = value[member]
                        state[index][field] = piece.T.clone() if index % 2 == 0 else piece[0]
            trainer[name] = {'state': state,
                             'param_groups': copy.deepcopy(trainer_state[stacked]['param_groups'])}
    return old, trainer


def test_a_checkpoint_with_separate_critics_resumes_exactly(ballcircle_arrays):
    task = get_task('BallCircle')
    config = fisor.resolve_config(fisor.make_config('test'), task)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = fisor.build_model(task.obs_dim, task.act_dim, config)
        runs.append((model, fisor.make_trainer(model, config)))
    (model, trainer), (resumed, resumed_trainer) = runs
    buffer = ReplayBuffer(fisor.prepare_arrays(ballcircle_arrays, config), torch.device('cpu'),
                          seed=0)
    for _ in range(3):
        trainer.critic_update(buffer.sample(config.critic_batch_size))
    old_model, old_trainer = _separate_layout(model.state_dict(), trainer.state_dict())
    assert 'q_r.net.net.0.weight' in old_model and 'v_h.net.2.weight' in old_model
    with torch.no_grad():                # make sure loading really writes every tensor
        for p in resumed.parameters():
            p.zero_()
    resumed.load_state_dict(old_model)
    resumed_trainer.load_state_dict(old_trainer)
    batch = buffer.sample(config.critic_batch_size)
    trainer.critic_update(batch)
    resumed_trainer.critic_update(batch)
    a, b = model.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint with only half of a critic, with halves of other sizes than this model's
    # heads, or with both layouts is refused by name, not loaded into the wrong places
    for tamper, named in (('drop', 'v_r.net.2.weight'), ('uneven', 'q_r.net.net.0.weight'),
                          ('both', 'q_r.net.net.0.weight')):
        bad = dict(old_model)
        if tamper == 'drop':
            del bad['v_h.net.2.weight']
        elif tamper == 'uneven':          # three reward heads and one feasibility head
            bad['q_r.net.net.0.weight'] = torch.cat([bad['q_r.net.net.0.weight'],
                                                     bad['q_h.net.net.0.weight'][:1]])
            bad['q_h.net.net.0.weight'] = bad['q_h.net.net.0.weight'][1:]
        else:
            bad.update(model.state_dict())
        with pytest.raises(RuntimeError, match=named):
            resumed.load_state_dict(bad)
    # optimiser states that do not pair up are a ValueError (a resume names the checkpoint)
    unequal = copy.deepcopy(old_trainer)
    for entry in unequal['q_h_opt']['state'].values():
        entry['step'] = entry['step'] + 1
    malformed = {**old_trainer, 'v_h_opt': {'state': [], 'param_groups': []}}
    for bad, message in ((unequal, 'stepped'), (malformed, 'malformed')):
        with pytest.raises(ValueError, match=message):
            resumed_trainer.load_state_dict(bad)


def test_ema_copy_stays_in_eval_mode():
    model, _ = _small_fisor()
    model.train()
    assert model.actor.training and not model.actor_ema.training


# --------------------------------------------------------------------------- baselines

def test_bc_safe_keeps_trajectories_within_kappa():
    data = synthetic_dataset(episodes=3, max_length=3, fixed_length=True, terminal_fraction=0)
    data['costs'][:] = t([0, 0, 0, 2, 2, 1, 9, 9, 9]).numpy()   # returns 0, 5, 27
    mask = bc.safe_transition_mask(data, 10.0)
    assert mask.tolist() == [True] * 6 + [False] * 3
    config = bc.make_config('paper', mode='safe', cost_limit=10.0)
    assert len(bc.prepare_arrays(data, config)['obs']) == 6
    with pytest.raises(ValueError, match='no trajectory'):
        bc.prepare_arrays(data, bc.make_config('paper', mode='safe', cost_limit=-1.0))
    assert bc.bc_loss(t([[1.0, 0.0]]), t([[0.0, 0.0]])).item() == pytest.approx(0.5)


def test_vae_loss_by_hand():
    loss = bcq_lag.vae_loss(t([[1.0, 0.0]]), t([[0.0, 0.0]]), mean=t([[0.0, 1.0]]),
                            std=t([[1.0, 1.0]]), beta=0.5)
    # MSE 0.5; KL elements 0 and 0.5, mean 0.25
    assert loss.item() == pytest.approx(0.5 + 0.5 * 0.25)


def test_bcq_targets_and_critic_loss_by_hand():
    q1, q2 = t([1.0, 4.0, 2.0, 0.0]), t([3.0, 2.0, 2.0, 1.0])
    target = bcq_lag.soft_clipped_target(q1, q2, 0.75, batch=2)
    # per pair 0.75 min + 0.25 max = [1.5, 2.5, 2.0, 0.25]; max over 2 samples per state
    assert torch.allclose(target, t([2.5, 2.0]))
    heads = t([[1.0, 2.0], [3.0, 4.0]])
    assert bcq_lag.critic_loss(heads, t([1.0, 1.0])).item() == pytest.approx(0.5 + 6.5)
    q1_min, q2_min = bcq_lag.double_q_min(t([[1.0], [2.0], [0.0], [5.0]]), num_q=2)
    assert (q1_min.item(), q2_min.item()) == (1.0, 0.0)
    actor = bcq_lag.lagrangian_actor_loss(t([1.0, 3.0]), t([2.0, 0.0]), t(0.5), 1.0)
    assert actor.item() == pytest.approx(-2.0 + 0.5 * 0.0)


def test_pid_lagrangian_by_hand():
    pid = bcq_lag.PIDLagrangian(0.1, 0.003, 0.001, threshold=1.0)
    # error 2, integral 2, derivative 2
    assert pid.control(t([3.0, 3.0])).item() == pytest.approx(0.1 * 2 + 0.003 * 2 + 0.001 * 2)
    # error -0.5: P term off, integral 1.5, derivative relu(-2.5) = 0
    assert pid.control(t([0.5])).item() == pytest.approx(0.003 * 1.5)
    # error -6: the integral cannot go below zero, multiplier 0
    assert pid.control(t([-5.0])).item() == pytest.approx(0.0)
    restored = bcq_lag.PIDLagrangian(0.1, 0.003, 0.001, threshold=1.0)
    restored.load_state_dict(pid.state_dict())
    assert restored.control(t([2.0])).item() == pytest.approx(pid.control(t([2.0])).item())


def test_bcq_qc_threshold_is_osrl_formula():
    config = bcq_lag.make_config('paper', cost_limit=10.0, episode_len=200)
    gamma = 0.99
    assert config.qc_threshold == pytest.approx(10 * (1 - gamma ** 200) / (1 - gamma) / 200)
    assert (config.phi, config.lmbda, config.sample_action_num, config.vae_hidden) == (
        0.05, 0.75, 10, 400)
    assert config.pid == (0.1, 0.003, 0.001)


def test_bcq_policy_is_deterministic_and_bounded():
    config = bcq_lag.make_config('paper', episode_len=100, vae_hidden=16,
                                 actor_hidden=(16,), critic_hidden=(16,))
    model = bcq_lag.build_model(4, 2, config).eval()
    obs = torch.randn(7, 4)
    assert torch.equal(model.act(obs), model.act(obs))
    assert model.act(obs).abs().max() <= 1.0
    assert model.cost_q(obs, model.act(obs)).shape == (7,)
    assert model.cost_threshold == pytest.approx(config.qc_threshold)


def test_registry_names():
    module, fixed = get_algorithm('bc-safe')
    assert module is bc and fixed == {'mode': 'safe'}
    with pytest.raises(KeyError, match='unknown algorithm'):
        get_algorithm('cql')


@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_every_registered_algorithm_satisfies_the_protocol(name, ballcircle_arrays, tmp_path):
    from offline_training.export import write_bundle
    from saferl_ros.bundle import load_bundle

    module, fixed = get_algorithm(name)
    assert protocol_problems(module) == []
    for preset in PRESET_NAMES:
        assert isinstance(module.make_config(preset, **fixed), module.CONFIG)
    spec = get_task('BallCircle')
    config = module.resolve_config(module.make_config('test', **fixed), spec)
    torch.manual_seed(0)
    buffer = ReplayBuffer(module.prepare_arrays(ballcircle_arrays, config), 'cpu', seed=0)
    model = module.build_model(spec.obs_dim, spec.act_dim, config)
    trainer = module.make_trainer(model, config)
    assert isinstance(trainer, Trainer)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    logs = trainer.update(buffer)
    assert logs and all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values())
    moved = [key for key, value in model.state_dict().items()
             if not torch.equal(value, before[key])]
    assert moved, 'one training step changed no parameter'
    model.eval()
    plan = module.export_plan(model, config)
    assert plan.algorithm == name and 'policy' in plan.graphs
    # The plan traces to ONNX and the runtime loader verifies it against torch.
    bundle = load_bundle(write_bundle(plan, tmp_path / name, spec.name))
    assert bundle.algorithm == name
    action = bundle.policy(np.zeros((1, spec.obs_dim), np.float32), rng=np.random.default_rng(0))
    assert action.shape == (1, spec.act_dim) and np.all(np.abs(action) <= 1.0)


def test_protocol_names_what_a_module_lacks():
    incomplete = types.ModuleType('incomplete')
    incomplete.NAME, incomplete.PRESETS = 'x', {'paper': {}}
    assert 'CONFIG' in protocol_problems(incomplete)[0]
    for attribute in ('CONFIG', 'make_config', 'resolve_config', 'prepare_arrays', 'build_model',
                      'make_trainer', 'export_plan'):
        setattr(incomplete, attribute, getattr(bc, attribute))
    assert protocol_problems(incomplete) == ["PRESETS lacks ['cpu', 'test']"]
