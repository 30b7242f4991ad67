"""DRCORL (offline_training.algos.drcorl): losses, the switching rule, schedules, runs, bundle."""

from copy import deepcopy
import math

import numpy as np
from offline_training.algos import critics, drcorl
from offline_training.algos.batching import ReplayBuffer
from offline_training.algos.infrastructure import set_seed
from offline_training.data.dataset import write_dataset
from offline_training.data.synthetic import rollout_dataset, synthetic_dataset
import pytest
from saferl_ros.errors import ConfigError, MissingFileError
from saferl_ros.tasks import get_task
import torch
from torch.nn.utils import parameters_to_vector
import yaml

torch.set_num_threads(1)

TASK = 'BallCircle'


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- losses by hand

def test_continuous_vp_schedule_by_hand():
    alpha, sigma = drcorl.vp_alpha_sigma(t([0.0, 0.5, 1.0]), 0.1, 20.0)
    # log alpha_t = -t^2 (20 - 0.1) / 4 - t 0.1 / 2
    expected = [1.0, math.exp(-0.25 * 0.25 * 19.9 - 0.025), math.exp(-19.9 / 4 - 0.05)]
    assert torch.allclose(alpha, t(expected))
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones(3))
    assert sigma[0] == 0.0


def test_behavior_loss_is_eq5_sum_over_dims_mean_over_batch():
    loss = drcorl.behavior_loss(t([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2))
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2)


def test_iql_value_loss_and_target_by_hand():
    heads = t([[1.0, -1.0], [3.0, -2.0]])   # min over heads [1, -2]
    # u = [1, -2]: 0.7 * 1 above zero, 0.3 * 4 below; batch mean
    assert critics.reward_value_loss(heads, t([0.0, 0.0]), 0.7).item() == pytest.approx(0.95)
    target = critics.reward_target(t([1.0, 2.0]), t([10.0, 10.0]), t([1.0, 0.0]), 0.9)
    assert torch.allclose(target, t([10.0, 2.0]))


def test_q_loss_sums_heads_and_weights_rows():
    heads = t([[1.0, 2.0], [3.0, 4.0]])
    # head 1: (0 + 1) / 2, head 2: (4 + 9) / 2
    assert drcorl.q_loss(heads, t([1.0, 1.0])).item() == pytest.approx(0.5 + 6.5)
    # row 2 weighted 0: head 1 0 / 2, head 2 4 / 2
    assert drcorl.q_loss(heads, t([1.0, 1.0]), t([1.0, 0.0])).item() == pytest.approx(2.0)
    # one target per head
    assert drcorl.q_loss(heads, t([[1.0, 2.0], [3.0, 4.0]])).item() == 0.0


def test_pessimistic_cost_target_by_hand():
    next_heads = t([[2.0, 4.0], [6.0, 0.0], [4.0, 2.0]])   # max [6, 4], min [2, 0]
    target = drcorl.pessimistic_cost_target(t([1.0, 0.5]), next_heads, t([1.0, 0.0]),
                                            gamma=0.9, pessimism=0.75)
    # 1 + 0.9 (0.75 * 6 + 0.25 * 2) = 5.5; the second row ends its episode: c only
    assert torch.allclose(target, t([5.5, 0.5]))
    worst = drcorl.pessimistic_cost_target(t([0.0]), t([[1.0], [3.0]]), t([1.0]), 1.0, 1.0)
    assert worst.item() == 3.0


def test_ucb_and_normalised_cost_estimate_by_hand():
    heads = t([[1.0, 0.0], [3.0, 0.0]])
    mean, std = drcorl.ensemble_mean_std(heads)
    assert torch.equal(mean, t([2.0, 0.0])) and torch.equal(std, t([1.0, 0.0]))
    assert torch.equal(drcorl.ucb(heads, 2.0), t([4.0, 0.0]))
    # (1 - 0.99) * 200 * mean([4, 6]) / 10 = 1.0: the boundary of the budget
    estimate = drcorl.normalized_cost_estimate(t([4.0, 6.0]), 0.99, 200, 10.0)
    assert estimate.item() == pytest.approx(1.0)


def test_score_regulariser_is_eq21():
    eps_pred, noise, sigma = t([[1.0, 2.0]]), t([[0.5, 0.5]]), t([[2.0]])
    coef = drcorl.score_coefficient(eps_pred, noise, sigma)
    assert torch.equal(coef, t([[2.0, 6.0]]))            # sigma^2 (eps_phi - eps)
    assert torch.equal(drcorl.score_coefficient(eps_pred, noise, sigma, baseline=False),
                       t([[4.0, 8.0]]))                  # the official code's form
    coef = t([[2.0, 6.0], [1.0, 0.0]]).requires_grad_(True)
    action = t([[0.5, -1.0], [2.0, 3.0]]).requires_grad_(True)
    kl = drcorl.kl_surrogate(coef, action)
    assert kl.item() == pytest.approx((1.0 - 6.0 + 2.0 + 0.0) / 2)
    kl.backward()
    # the gradient reaches the action only: d/da = coef / B
    assert torch.equal(action.grad, t([[1.0, 3.0], [0.5, 0.0]])) and coef.grad is None


def test_reward_and_cost_objectives_by_hand():
    kl, q = t(1.0), t([2.0, 4.0])
    assert drcorl.reward_objective(kl, q, 0.5).item() == pytest.approx(1.0 - 0.5 * 3.0)
    assert drcorl.cost_objective(kl, q, 0.5).item() == pytest.approx(1.0 + 0.5 * 3.0)


# --------------------------------------------------------------------------- switching rule

def test_pcgrad_projects_conflicting_gradients():
    g_r, g_c = t([1.0, 0.0]), t([-1.0, 1.0])             # <g_r, g_c> = -1 < 0
    combined = drcorl.pcgrad(g_r, g_c)
    # g_r+ = g_r + g_c / 2 = [0.5, 0.5] (normal to g_c); g_c+ = g_c + g_r = [0, 1] (normal to g_r)
    assert torch.allclose(combined, t([0.25, 0.75]))
    assert torch.dot(combined, g_r) > 0 and torch.dot(combined, g_c) > 0


def test_pcgrad_averages_non_conflicting_gradients():
    assert torch.allclose(drcorl.pcgrad(t([1.0, 0.0]), t([1.0, 1.0])), t([1.0, 0.5]))
    # orthogonal gradients do not conflict: the plain mean
    assert torch.allclose(drcorl.pcgrad(t([1.0, 0.0]), t([0.0, 2.0])), t([0.5, 1.0]))


def test_branch_follows_the_slacks():
    assert drcorl.select_branch(0.79, 0.2, 0.2) == 'reward'
    assert drcorl.select_branch(0.8, 0.2, 0.2) == 'reward'   # C_hat <= 1 - h-
    assert drcorl.select_branch(0.81, 0.2, 0.2) == 'both'
    assert drcorl.select_branch(1.19, 0.2, 0.2) == 'both'
    assert drcorl.select_branch(1.2, 0.2, 0.2) == 'cost'     # C_hat >= 1 + h+
    assert drcorl.select_branch(1.0, 0.1, 0.3) == 'both'
    assert drcorl.select_branch(1.0, 0.0, 0.0) == 'reward'   # slacks decayed to 0
    assert drcorl.select_branch(1.01, 0.0, 0.0) == 'cost'


def test_slack_and_temperature_schedules():
    slacks = [drcorl.slack_schedule(i, 5, 0.2) for i in range(5)]
    assert slacks == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0])
    assert drcorl.slack_schedule(3, 5, 0.5, decay=False) == 0.5   # the official constant slack
    betas = [drcorl.temperature_schedule(i, 5) for i in range(5)]
    assert betas == pytest.approx([0.04, 0.28, 0.52, 0.76, 1.0])
    assert drcorl.temperature_schedule(3, 5, 'sqrt') == pytest.approx(0.02)   # 0.01 sqrt(4)
    assert drcorl.temperature_schedule(3, 5, 'constant', start=0.02) == 0.02
    with pytest.raises(ConfigError, match='temperature_schedule'):
        drcorl.make_config('test', temperature_schedule='cosine')


def _small(**overrides):
    config = drcorl.make_config('test', reward_scale=1.0, episode_len=200, **overrides)
    set_seed(0)
    model = drcorl.build_model(4, 2, config)
    return model, drcorl.make_trainer(model, config), config


@pytest.mark.parametrize('q_ucb, branch', [(1.0, 'reward'), (10.0, 'cost'), (5.0, 'both')])
def test_policy_update_takes_the_branch_of_the_estimate(q_ucb, branch, monkeypatch):
    # C_hat = (1 - 0.99) 200 q / 10 = 0.2 q: 0.2 (reward), 2.0 (cost), 1.0 (in the band)
    model, trainer, _ = _small()
    model.cost_ucb = lambda obs, act: torch.full((obs.shape[0],), q_ucb)
    batch = {'obs': torch.randn(16, 4)}
    seen = {}
    real = drcorl.pcgrad

    def spy(d_r, d_c):
        seen['deltas'] = (d_r.clone(), d_c.clone())
        seen['combined'] = real(d_r, d_c)
        return seen['combined']
    monkeypatch.setattr(drcorl, 'pcgrad', spy)
    reference = deepcopy(trainer)            # the same weights and optimiser state
    theta0 = parameters_to_vector(model.policy.parameters()).detach().clone()
    torch.manual_seed(1)
    logs = trainer.policy_update(batch, index=0)
    theta1 = parameters_to_vector(model.policy.parameters()).detach()
    assert logs['estimate/cost_norm'].item() == pytest.approx(0.2 * q_ucb)
    assert logs['schedule/branch'].item() == drcorl.BRANCHES[branch]
    assert logs['schedule/beta'].item() == pytest.approx(0.04)
    assert logs['schedule/slack'].item() == pytest.approx(0.2)
    # Replay the reward step alone from the same state (same score noise): its displacement.
    torch.manual_seed(1)
    reference.model.cost_ucb = lambda obs, act: torch.full((obs.shape[0],), 1.0)
    reference.policy_update(batch, index=0)
    delta_reward = parameters_to_vector(reference.model.policy.parameters()).detach() - theta0
    if branch == 'reward':
        assert torch.allclose(theta1 - theta0, delta_reward) and 'deltas' not in seen
    elif branch == 'cost':
        assert 'loss/policy_cost' in logs and 'loss/policy_reward' not in logs
        assert not torch.allclose(theta1 - theta0, delta_reward) and 'deltas' not in seen
    else:
        d_r, d_c = seen['deltas']
        assert torch.allclose(d_r, delta_reward)          # both steps start at theta_0
        assert torch.allclose(theta1, theta0 + seen['combined'])
        assert logs['schedule/conflict'].item() == float(torch.dot(d_r, d_c) < 0)


def test_stages_follow_the_step_counts():
    config = drcorl.make_config('test')
    assert (config.behavior_steps, config.critic_steps, config.warmstart_steps,
            config.steps) == (8, 8, 4, 30)
    assert [config.stage_of(i) for i in (0, 7, 8, 16, 19, 20, 29)] == [
        ('behavior', 0), ('behavior', 7), ('critics', 0), ('warmstart', 0), ('warmstart', 3),
        ('adaptation', 0), ('adaptation', 9)]
    assert config.adaptation_length() == 10
    assert drcorl.make_config('test', steps=40).adaptation_length() == 20
    with pytest.raises(ConfigError, match='adaptation stage'):
        drcorl.make_config('test', steps=20)


def test_paper_and_cpu_presets():
    paper = drcorl.make_config('paper')
    assert (paper.behavior_steps, paper.behavior_batch_size, paper.critic_steps) == (
        2_000_000, 2048, 500_000)
    assert (paper.warmstart_steps, paper.adaptation_steps, paper.steps) == (
        50_000, 2_000, 2_552_000)
    assert (paper.beta_min, paper.beta_max, paper.behavior_t_min) == (0.1, 20.0, 1e-3)
    assert (paper.expectile, paper.gamma, paper.critic_tau) == (0.7, 0.99, 0.005)
    assert (paper.cost_ensemble, paper.ucb_k, paper.policy_hidden) == (4, 2.0, (256, 256))
    assert (paper.temperature_start, paper.temperature_end, paper.slack_start) == (0.04, 1.0, 0.2)
    assert paper.temperature_schedule == 'linear' and paper.slack_decay
    cpu = drcorl.make_config('cpu')
    assert cpu.steps == sum((cpu.behavior_steps, cpu.critic_steps, cpu.warmstart_steps,
                             cpu.adaptation_steps)) < paper.steps
    resolved = drcorl.resolve_config(cpu, get_task(TASK))
    spec = get_task(TASK)
    assert resolved.reward_scale == pytest.approx(1000 / (spec.max_reward - spec.min_reward))
    assert drcorl.cost_budget(resolved) == pytest.approx(10.0 / (0.01 * spec.horizon))


def test_prepare_arrays_links_next_actions_within_episodes():
    data = synthetic_dataset(episodes=2, max_length=3, fixed_length=True, terminal_fraction=0)
    data['terminals'][1] = 1.0
    config = drcorl.make_config('test', reward_scale=2.0)
    arrays = drcorl.prepare_arrays(data, config)
    assert arrays['mask'].tolist() == [1, 0, 0, 1, 1, 0]   # terminal at 1, timeouts at 2, 5
    assert np.array_equal(arrays['next_act'][0], arrays['act'][1])
    assert np.array_equal(arrays['next_act'][3], arrays['act'][4])
    assert not arrays['next_act'][1].any() and not arrays['next_act'][5].any()
    assert arrays['next_known'].tolist() == [1] * 6
    assert arrays['first'].tolist() == [1, 0, 1, 1, 0, 0]   # episodes 0-1, 2, 3-5
    data['next_observations'][3] += 1.0                    # s' is not the next row's s
    assert drcorl.prepare_arrays(data, config)['next_known'].tolist() == [1, 1, 1, 0, 1, 1]
    assert np.allclose(arrays['reward'], data['rewards'] * 2.0)


# --------------------------------------------------------------------------- a real run

@pytest.fixture(scope='module')
def dataset():
    """Ten episodes of a heuristic in the real BallCircle simulation (2000 transitions)."""
    return rollout_dataset(TASK, episodes=10, seed=0)


# Small networks, every stage long enough to see its losses fall on one core.
TINY = {'behavior_steps': 300, 'critic_steps': 300, 'warmstart_steps': 150,
        'adaptation_steps': 60, 'behavior_batch_size': 128, 'behavior_hidden': 64,
        'behavior_blocks': 1, 'critic_batch_size': 128, 'critic_hidden': (64, 64),
        'policy_batch_size': 128, 'policy_hidden': (64, 64)}


def test_short_training_run_losses_fall_in_every_stage(dataset):
    set_seed(0)
    config = drcorl.resolve_config(drcorl.make_config('cpu', **TINY), get_task(TASK))
    buffer = ReplayBuffer(drcorl.prepare_arrays(dataset, config), 'cpu')
    model = drcorl.build_model(buffer.data['obs'].shape[1], buffer.data['act'].shape[1], config)
    trainer = drcorl.make_trainer(model, config)
    probe = buffer.sample(512)

    def imitation_error():
        with torch.no_grad():
            return float((model.act(probe['obs']) - probe['act']).pow(2).mean())
    history, errors = [], {}
    for i in range(config.steps):
        if i == config.behavior_steps + config.critic_steps:
            errors['before'] = imitation_error()
        if i == config.pretraining_steps():
            errors['warm'] = imitation_error()
        history.append({k: float(v) for k, v in trainer.update(buffer).items()})
    stages = [drcorl.STAGES[int(h['schedule/stage'])] for h in history]
    assert stages.count('adaptation') == 60

    def falls(stage, key, factor):
        values = [h[key] for h, s in zip(history, stages) if s == stage]
        first, last = np.mean(values[:30]), np.mean(values[-30:])
        assert np.isfinite(last) and last * factor < first, f'{stage} {key}: {first} -> {last}'
    falls('behavior', 'loss/behavior', 1.3)
    falls('critics', 'loss/q_r', 2.0)
    falls('critics', 'loss/q_c', 2.0)
    # The KL-only warm start pulls the policy towards the behaviour model's actions.
    assert errors['warm'] < 0.8 * errors['before'], errors
    adaptation = [h for h, s in zip(history, stages) if s == 'adaptation']
    assert all(np.isfinite(list(h.values())).all() for h in adaptation)
    assert adaptation[-1]['schedule/beta'] == pytest.approx(1.0)
    assert adaptation[-1]['schedule/slack'] == 0.0


def test_settling_steps_train_the_critics_alone_before_the_policy_moves(dataset):
    set_seed(0)
    settle, policy_iterations = 40, 20
    config = drcorl.resolve_config(drcorl.make_config(
        'test', critic_settle_steps=settle, steps=20 + settle + policy_iterations,
        estimate_states='initial'), get_task(TASK))
    assert config.adaptation_length() == settle + policy_iterations
    assert config.policy_iterations() == policy_iterations
    # without --steps the settling comes on top of the four stages
    assert drcorl.make_config('test', critic_settle_steps=settle).policy_iterations() == \
        drcorl.make_config('test').adaptation_steps
    with pytest.raises(ConfigError, match='critic_settle_steps'):     # no policy iteration left
        drcorl.make_config('test', critic_settle_steps=10, steps=30)
    with pytest.raises(ConfigError, match='critic_settle_steps'):
        drcorl.make_config('test', critic_settle_steps=-1)
    assert 'critic_settle_steps' in drcorl.resume_may_change(config, config.pretraining_steps())
    buffer = ReplayBuffer(drcorl.prepare_arrays(dataset, config), 'cpu')
    model = drcorl.build_model(buffer.data['obs'].shape[1], buffer.data['act'].shape[1], config)
    trainer = drcorl.make_trainer(model, config)

    def flat(module):
        return parameters_to_vector(module.parameters()).detach().clone()
    for _ in range(config.pretraining_steps()):
        trainer.update(buffer)
    policy, cost_critic = flat(model.policy), flat(model.q_c)
    td_calls = []
    real_td = trainer.critic_td_update

    def spy(batch):        # the settling's TD is the one with a' = pi(s')
        td_calls.append(len(batch['obs']))
        return real_td(batch)
    trainer.critic_td_update = spy
    settling = [trainer.update(buffer) for _ in range(settle)]
    assert td_calls == [config.critic_batch_size] * settle
    # the policy stands still while the critics learn; each iteration logs the estimate it moves
    assert torch.equal(flat(model.policy), policy)
    assert not torch.equal(flat(model.q_c), cost_critic)
    assert all('schedule/branch' not in logs for logs in settling)
    assert 'estimate/cost_norm' in settling[-1]          # logged at the last settling iteration
    dones = np.asarray(dataset['terminals']) + np.asarray(dataset['timeouts']) > 0
    first_states = torch.as_tensor(np.asarray(dataset['observations'], np.float32)[
        np.concatenate([[0], np.flatnonzero(dones)[:-1] + 1])])
    with torch.no_grad():     # nothing moved since: the logged value is the estimate right now
        assert float(settling[-1]['estimate/cost_norm']) == pytest.approx(
            float(trainer.offline_cost_estimate(first_states)), rel=1e-5)
    assert all(drcorl.STAGES[int(logs['schedule/stage'])] == 'adaptation' for logs in settling)
    obs = buffer.data['obs'][:64]
    with torch.no_grad():      # the logged estimate is App. B.3's, by hand on the target heads
        heads = model.q_c_target(obs, model.act(obs))
        ucb = heads.mean(0) + config.ucb_k * heads.std(0, unbiased=False)
        by_hand = (1 - config.gamma) * config.episode_len * float(ucb.mean()) / config.cost_limit
        assert float(trainer.offline_cost_estimate(obs)) == pytest.approx(by_hand, rel=1e-5)
    adapting = [trainer.update(buffer) for _ in range(policy_iterations)]
    assert not torch.equal(flat(model.policy), policy)
    # the schedules start at the first policy iteration and end at the last one
    assert adapting[0]['schedule/beta'] == pytest.approx(config.temperature_start)
    assert adapting[0]['schedule/slack'] == pytest.approx(config.slack_start)
    assert adapting[-1]['schedule/beta'] == pytest.approx(config.temperature_end)
    assert adapting[-1]['schedule/slack'] == 0.0


@pytest.mark.parametrize('states', ['batch', 'initial'])
def test_offline_estimate_averages_over_the_chosen_states(dataset, states, monkeypatch):
    set_seed(0)
    config = drcorl.resolve_config(drcorl.make_config('test', estimate_states=states),
                                   get_task(TASK))
    buffer = ReplayBuffer(drcorl.prepare_arrays(dataset, config), 'cpu')
    model = drcorl.build_model(buffer.data['obs'].shape[1], buffer.data['act'].shape[1], config)
    trainer = drcorl.make_trainer(model, config)
    for _ in range(config.pretraining_steps()):
        trainer.update(buffer)
    # a cost critic that reads the state's first coordinate: C_hat is then a mean of those
    monkeypatch.setattr(model, 'cost_ucb', lambda obs, act: obs[:, 0])
    seen = []
    real_sample = buffer.sample

    def sample(size):
        seen.append(real_sample(size))
        return seen[-1]
    monkeypatch.setattr(buffer, 'sample', sample)
    logs = trainer.update(buffer)
    if states == 'batch':
        mean_first_coordinate = float(seen[-1]['obs'][:config.policy_batch_size, 0].mean())
    else:
        dones = np.asarray(dataset['terminals']) + np.asarray(dataset['timeouts']) > 0
        starts = np.concatenate([[0], np.flatnonzero(dones)[:-1] + 1])
        assert len(starts) == 10
        mean_first_coordinate = float(np.asarray(dataset['observations'])[starts, 0].mean())
    expected = (1 - config.gamma) * config.episode_len * mean_first_coordinate / config.cost_limit
    assert float(logs['estimate/cost_norm']) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match='estimate_states'):
        drcorl.make_config('test', estimate_states='final')
    with pytest.raises(ConfigError, match='cost_estimate'):    # it only picks offline states
        drcorl.make_config('test', estimate_states='initial', cost_estimate='rollout')
    fresh = drcorl.make_trainer(model, config)
    if states == 'initial':      # the first states come from update(buffer): a clear refusal
        with pytest.raises(RuntimeError, match='update'):
            fresh.policy_update(seen[-1], 0)


# --------------------------------------------------------------------------- bundle and CLI

def test_bundle_exports_the_policy_and_the_cost_ensemble(tmp_path):
    from offline_training.export import build_test_model, write_bundle
    from saferl_ros.bundle import BundleError, load_bundle
    from saferl_ros.monitor import MonitorConfig, MonitorState, SafetyMonitor

    model, plan = build_test_model('CarCircle', seed=1, algorithm='drcorl', train_steps=30)
    bundle = load_bundle(write_bundle(plan, tmp_path / 'drcorl', 'CarCircle'))
    assert bundle.algorithm == 'drcorl' and not bundle.has_fallback
    assert set(bundle.manifest['files']) == {'policy.onnx', 'critic.onnx', 'golden.npz'}
    config = drcorl.resolve_config(drcorl.make_config('test'), get_task('CarCircle'))
    assert bundle.critic_config == {'kind': 'cost_ucb', 'k': 2.0,
                                    'budget': pytest.approx(drcorl.cost_budget(config))}
    assert bundle.manifest['algorithm_config']['cost_limit'] == config.cost_limit
    obs = np.random.default_rng(0).normal(size=(5, bundle.obs_dim)).astype(np.float32)
    with torch.no_grad():
        action = model.act(torch.from_numpy(obs)).numpy()
        mean, std = model.cost_mean_std(torch.from_numpy(obs), torch.from_numpy(action))
    np.testing.assert_allclose(bundle.policy(obs), action, atol=1e-5)
    values = bundle.critic(obs, action)
    np.testing.assert_allclose(values['q_c_mean'], mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(values['q_c_std'], std.numpy(), atol=1e-5)
    # The monitor judges mean + k std against the manifest's budget (or an override).
    ucb = float(values['q_c_mean'][0] + 2.0 * values['q_c_std'][0])
    passed = SafetyMonitor(bundle, MonitorConfig(budget=ucb + 1e-3)).decide(
        obs[0], action[0], 1.0, 1.0, 1.0)
    assert passed.state == MonitorState.NOMINAL and passed.q_c == pytest.approx(ucb, abs=1e-5)
    over = SafetyMonitor(bundle, MonitorConfig(budget=ucb - 1e-3, min_hold=0.0))
    verdict = over.decide(obs[0], action[0], 1.0, 1.0, 1.0)
    assert verdict.state in (MonitorState.INTERVENING, MonitorState.RECOVERY)
    zero = np.zeros((1, bundle.act_dim), np.float32)
    safe = bundle.critic(obs[:1], zero)
    safe_ucb = float(safe['q_c_mean'][0] + 2.0 * safe['q_c_std'][0])
    # the fallback is the configured safe action (zeros), used only if the critic rates it safer
    assert verdict.replaced == (safe_ucb < ucb)
    expected = zero[0] if verdict.replaced else action[0]
    np.testing.assert_allclose(verdict.action, expected, atol=1e-6)
    # the loader refuses a cost_ucb critic without its k
    manifest = yaml.safe_load((bundle.path / 'manifest.yaml').read_text())
    del manifest['critic']['k']
    (bundle.path / 'manifest.yaml').write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match="field 'k' is missing"):
        load_bundle(bundle.path)


def test_cli_trains_and_exports_a_drcorl_run(tmp_path, capsys):
    from offline_training.export import main as export_main
    from offline_training.train import main as train_main
    from saferl_ros.bundle import load_bundle

    path = tmp_path / 'SafetyBallCircle-v0-synthetic-12.hdf5'
    write_dataset(path, synthetic_dataset(TASK, episodes=12, seed=0, max_length=60), TASK)
    run = tmp_path / 'run'
    assert train_main(['drcorl', '--task', TASK, '--preset', 'test', '--steps', '30',
                       '--dataset', str(path), '--out', str(run), '--device', 'cpu',
                       '--no-progress', '--log-every', '10']) == 0
    assert export_main([str(run), '-o', str(tmp_path / 'bundle')]) == 0
    bundle = load_bundle(tmp_path / 'bundle')
    assert bundle.algorithm == 'drcorl' and bundle.critic_kind == 'cost_ucb'
    assert bundle.manifest['provenance']['steps'] == 30
    assert train_main(['drcorl', '--task', TASK, '--preset', 'test', '--steps', '10',
                       '--dataset', str(path), '--out', str(tmp_path / 'short'),
                       '--no-progress']) == 2
    assert 'adaptation stage' in capsys.readouterr().err


# --------------------------------------------------------------------------- adaptation rules

def test_rollout_estimate_is_one_simulator_episode_of_the_policy():
    # The official code's rule: C_hat = the cost of one episode of the current policy / kappa.
    from saferl_ros.sim import episode_seed, run_episode

    spec = get_task(TASK)
    config = drcorl.resolve_config(drcorl.make_config('test', cost_estimate='rollout',
                                                      cost_limit=0.5), spec)
    assert config.task == TASK
    set_seed(0)
    model = drcorl.build_model(spec.obs_dim, spec.act_dim, config)
    trainer = drcorl.make_trainer(model, config)
    last = [m for m in model.policy if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():        # full speed ahead, whatever it sees: its episodes cost something
        last.weight.zero_()
        last.bias.fill_(3.0)
    policy = deepcopy(model)
    try:
        logs = trainer.policy_update({'obs': torch.randn(16, spec.obs_dim)}, index=3)
    finally:
        trainer.close()
    env = spec.make_env()
    try:
        episode = run_episode(env, lambda o: policy.act(torch.as_tensor(
            np.asarray(o, dtype=np.float32))[None])[0].detach().numpy(),
            episode_seed(drcorl.ROLLOUT_SEED, 3))
    finally:
        env.close()
    assert episode.cost > 0
    assert logs['estimate/cost_norm'].item() == pytest.approx(episode.cost / 0.5)
    expected = drcorl.select_branch(episode.cost / 0.5, 0.2 * (1 - 3 / 9), 0.2 * (1 - 3 / 9))
    assert logs['schedule/branch'].item() == drcorl.BRANCHES[expected]
    with pytest.raises(ConfigError, match="cost_estimate 'online'"):
        drcorl.make_config('test', cost_estimate='online')


def test_a_run_branches_from_the_end_of_pretraining_with_another_rule(tmp_path, capsys):
    from offline_training.train import main as train_main

    path = tmp_path / 'SafetyBallCircle-v0-synthetic-12.hdf5'
    write_dataset(path, synthetic_dataset(TASK, episodes=12, seed=0, max_length=60), TASK)
    common = ['drcorl', '--task', TASK, '--preset', 'test', '--dataset', str(path),
              '--device', 'cpu', '--no-progress', '--log-every', '5']
    first = tmp_path / 'first'
    assert train_main([*common, '--out', str(first)]) == 0
    kept = first / 'checkpoints' / 'step_000000020.pt'      # 8 + 8 + 4: the end of stage 3
    assert kept.is_file() and sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    branch = tmp_path / 'branch'
    args = [*common, '--out', str(branch), '--init-from', str(kept),
            '--set', 'slack_start=0.5', '--set', 'temperature_schedule=constant']
    assert train_main(args) == 0
    saved = yaml.safe_load((branch / 'config.yaml').read_text())
    assert saved['initialised_from']['step'] == 20
    assert saved['algo_config']['slack_start'] == 0.5
    assert yaml.safe_load((branch / 'summary.yaml').read_text())['steps_this_session'] == 10
    branch_state = torch.load(branch / 'checkpoint.pt', weights_only=False)
    first_state = torch.load(first / 'checkpoint.pt', weights_only=False)
    kept_state = torch.load(kept, weights_only=False)
    behavior = [k for k in kept_state['model'] if k.startswith('behavior.')]
    assert behavior and all(torch.equal(branch_state['model'][k], kept_state['model'][k])
                            for k in behavior)        # stages 1-3 shared, frozen model unchanged
    assert not all(torch.equal(branch_state['model'][k], first_state['model'][k])
                   for k in first_state['model'] if k.startswith('policy.'))
    assert train_main(args) == 0                          # rerun: resumes, nothing to do
    # A stage-2 field cannot change (the critics were trained with it), nor any field once the
    # adaptation stage has begun (the run's last checkpoint is after it).
    capsys.readouterr()
    assert train_main([*common, '--out', str(tmp_path / 'b2'), '--init-from', str(kept),
                       '--set', 'cost_pessimism=0.5']) == 2
    assert 'cost_pessimism' in capsys.readouterr().err
    # the refused branch left nothing behind: the corrected command branches there
    assert not (tmp_path / 'b2' / 'checkpoint.pt').exists()
    assert not (tmp_path / 'b2' / 'config.yaml').exists()
    assert train_main([*common, '--out', str(tmp_path / 'b2'), '--init-from', str(kept)]) == 0
    capsys.readouterr()
    # a branch trains on the dataset of the run it continues
    other = tmp_path / 'SafetyBallCircle-v0-synthetic-other.hdf5'
    write_dataset(other, synthetic_dataset(TASK, episodes=12, seed=1, max_length=60), TASK)
    other_args = [*common[:common.index('--dataset') + 1], str(other),
                  *common[common.index('--dataset') + 2:]]
    assert train_main([*other_args, '--out', str(tmp_path / 'b5'), '--init-from',
                       str(kept)]) == 2
    assert 'trained on another dataset' in capsys.readouterr().err
    assert train_main([*common, '--out', str(tmp_path / 'b3'), '--init-from',
                       str(first / 'checkpoint.pt'), '--set', 'slack_start=0.5']) == 2
    assert 'slack_start' in capsys.readouterr().err
    assert train_main([*common, '--out', str(first), '--init-from', str(kept)]) == 2
    assert 'not branched from' in capsys.readouterr().err
    assert train_main([*common, '--out', str(tmp_path / 'b4'), '--init-from',
                       str(tmp_path / 'nothing.pt')]) == 2
    assert 'not a checkpoint file' in capsys.readouterr().err
    # a branch resumes from its own copy, also once the source run is gone
    first.rename(tmp_path / 'first-moved')
    assert train_main(args) == 0


def test_cost_estimate_tool_reports_the_three_state_sources(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from offline_training.train import main as train_main

    path = tmp_path / 'SafetyBallCircle-v0-synthetic-12.hdf5'
    write_dataset(path, synthetic_dataset(TASK, episodes=12, seed=0, max_length=60), TASK)
    run = tmp_path / 'run'
    assert train_main(['drcorl', '--task', TASK, '--preset', 'test', '--dataset', str(path),
                       '--out', str(run), '--device', 'cpu', '--no-progress']) == 0
    spec = importlib.util.spec_from_file_location(
        'drcorl_cost_estimate', Path(__file__).parents[1] / 'tools' / 'drcorl_cost_estimate.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'estimate.json'
    assert tool.main([str(run), '--episodes', '1', '--states', '50', '-o', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['dataset']['states'] == 50 and report['initial']['states'] == 12
    assert report['policy']['states'] == get_task(TASK).horizon     # one whole episode
    from offline_training.data.dataset import load_dataset
    from offline_training.data.trajectories import episode_spans
    from offline_training.runs import open_run
    data = load_dataset(path)
    # the initial-state figures recomputed from the ensemble heads, as Sec. 4.2 defines them:
    # C_hat = (1 - gamma) T mean_s (mean_i Q_c^i + k std_i Q_c^i)(s, pi(s)) / kappa
    opened = open_run(run)
    model, config = opened.model, opened.config
    starts = torch.as_tensor(np.asarray(data['observations'], np.float32)
                             [episode_spans(data)[0]])
    with torch.no_grad():
        heads = model.q_c_target(starts, model.act(starts))           # [N, B]
    mean, std = heads.mean(0), heads.std(0, unbiased=False)
    scale = (1 - config.gamma) * config.episode_len / config.cost_limit
    assert report['initial']['c_hat_mean'] == pytest.approx(float(mean.mean()) * scale, rel=1e-4)
    assert report['initial']['c_hat_ucb'] == pytest.approx(
        float((mean + config.ucb_k * std).mean()) * scale, rel=1e-4)
    assert report['initial']['q_c_std'] == pytest.approx(float(std.mean()), rel=1e-4)
    returns = [data['costs'][s:e].sum() for s, e in zip(*episode_spans(data))]
    assert report['dataset_safe_share'] == pytest.approx(np.mean(np.array(returns) <= 10.0))
    # the critics beside the data's own discounted cost-to-go, here at the kept checkpoint
    kept = run / 'checkpoints' / f'step_{config.pretraining_steps():09d}.pt'
    assert tool.main([str(run), '--checkpoint', str(kept), '--episodes', '1', '--states', '50',
                      '-o', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['checkpoint_step'] == config.pretraining_steps()
    assert report['dataset_q_c']['rows'] == 50
    assert np.isfinite(report['dataset_q_c']['q_c_mean'])
    # two episodes, gamma 0.5: rows 0-2 and 3-4, each sum stopping at its episode's end
    to_go = tool.discounted_cost_to_go(np.array([1.0, 0.0, 2.0, 3.0, 1.0]), [0, 3], [3, 5], 0.5)
    assert to_go.tolist() == [1.5, 1.0, 2.0, 3.5, 1.0]
    with pytest.raises(MissingFileError, match='step_7.pt is missing'):
        tool.main([str(run), '--checkpoint', str(run / 'checkpoints' / 'step_7.pt')])
    other = tmp_path / 'other-seed'       # a checkpoint of another run is refused, not read
    assert train_main(['drcorl', '--task', TASK, '--preset', 'test', '--dataset', str(path),
                       '--out', str(other), '--seed', '1', '--device', 'cpu',
                       '--no-progress']) == 0
    with pytest.raises(ConfigError, match='seed 1'):
        tool.main([str(run), '--checkpoint', str(other / 'checkpoint.pt')])
