"""The safety monitor's rule (docs/architecture.md), decided without ROS."""

import math

import numpy as np
import pytest
from saferl_ros.monitor import (check_applies, FallbackChoice, monitor_config, MonitorConfig,
                                MonitorConfigError, MonitorState, SafetyMonitor, state_names)


class FakeBundle:
    """A bundle whose critic is a known function: V_h(s) = s[0], max_j Q_h(s, a) = s[0] + a[0]."""

    name = 'fake'
    obs_dim = 3
    act_dim = 2
    action_low = np.array([-1, -1], np.float32)
    action_high = np.array([1, 1], np.float32)
    has_fallback = True

    def __init__(self, kind='feasibility'):
        self.critic_kind = kind
        self.critic_config = ({'kind': kind, 'threshold_v': 0.0, 'threshold_q': 0.0}
                              if kind == 'feasibility' else {'kind': kind, 'budget': 0.5})
        self.fallback_calls = 0

    def critic(self, obs, act):
        if self.critic_kind == 'feasibility':
            return {'v_h': obs[:, 0], 'q_h': obs[:, 0] + act[:, 0]}
        return {'q_c': obs[:, 0] + act[:, 0]}

    def fallback(self, obs, noise=None):
        self.fallback_calls += 1
        return np.tile(np.array([[-0.5, 0.25]], np.float32), (len(obs), 1))   # "steer away"

    def sample_noise(self, batch, rng, graph='policy'):
        return None


def monitor(kind='feasibility', **cfg):
    return SafetyMonitor(FakeBundle(kind), MonitorConfig(**cfg))


FEASIBLE_S = [-1.0, 0.0, 0.0]     # V_h = -1
INFEASIBLE_S = [0.5, 0.0, 0.0]    # V_h = 0.5


def test_feasible_proposal_passes_through_unchanged():
    m = monitor()
    v = m.decide(FEASIBLE_S, [0.3, -0.2], obs_stamp=1.0, proposal_stamp=1.0, now=1.01)
    assert v.state == MonitorState.NOMINAL
    np.testing.assert_allclose(v.action, [0.3, -0.2])
    assert v.v_h == -1.0 and v.q_h == pytest.approx(-0.7)
    assert m.bundle.fallback_calls == 0


def test_infeasible_action_in_feasible_state_intervenes_with_fallback():
    m = monitor(min_hold=0.0)
    v = m.decide(FEASIBLE_S, [1.0, 0.0], 1.0, 1.0, 1.0)   # Q_h = 0 -> boundary is feasible
    assert v.state == MonitorState.NOMINAL
    v = m.decide([-0.5, 0, 0], [0.9, 0.0], 2.0, 2.0, 2.0)  # Q_h = 0.4 > 0
    assert v.state == MonitorState.INTERVENING
    np.testing.assert_allclose(v.action, [-0.5, 0.25])
    np.testing.assert_allclose(v.proposed, [0.9, 0.0])
    assert 'action infeasible' in v.reason
    assert m.counters.interventions == 1


def test_infeasible_state_is_recovery():
    m = monitor()
    v = m.decide(INFEASIBLE_S, [0.0, 0.0], 1.0, 1.0, 1.0)  # V_h = 0.5, Q_h = 0.5; fallback's 0
    assert v.state == MonitorState.RECOVERY and v.replaced
    np.testing.assert_allclose(v.action, [-0.5, 0.25])
    assert v.q_h == pytest.approx(0.5) and v.risk_final == pytest.approx(0.0)
    assert m.counters.replaced == 1 and m.counters.kept == 0


def test_proposal_is_kept_when_no_fallback_is_safer():
    # Q_h(proposal) = 0.5 - 1 = -0.5 < Q_h(fallback) = 0: replacing would make things worse.
    m = monitor()
    v = m.decide(INFEASIBLE_S, [-1.0, 0.0], 1.0, 1.0, 1.0)
    assert v.state == MonitorState.RECOVERY and not v.replaced
    np.testing.assert_allclose(v.action, [-1.0, 0.0])
    assert 'proposal kept' in v.reason and v.risk_final == pytest.approx(-0.5)
    counts = m.counters.as_dict()
    assert counts['kept'] == 1 and counts['replaced'] == 0 and counts['interventions'] == 0


def test_a_fallback_equal_to_the_proposal_is_no_replacement():
    # The fake fallback steers to (-0.5, 0.25); a proposal equal to it is kept, whatever the
    # critic's rounding says.
    m = monitor()
    v = m.decide(INFEASIBLE_S, [-0.5, 0.25], 1.0, 1.0, 1.0,
                 fallback=FallbackChoice(np.array([-0.5, 0.25], np.float32), -1.0))
    assert v.state == MonitorState.RECOVERY and not v.replaced and m.counters.kept == 1


class NoisyBundle(FakeBundle):
    """The fallback returns its (clipped) noise: each decision shows which noise it used."""

    def sample_noise(self, batch, rng, graph='policy'):
        return rng.standard_normal((batch, 2)).astype(np.float32)

    def fallback(self, obs, noise=None):
        self.fallback_calls += 1
        self.batches = len(obs)
        return np.clip(noise, -1, 1)


def test_fallback_searches_several_samples_on_its_own_noise_stream():
    bundle = NoisyBundle()
    m = SafetyMonitor(bundle, MonitorConfig(fallback_samples=8, seed=0))
    choice = m.fallback_for(INFEASIBLE_S)
    assert bundle.batches == 8 and bundle.fallback_calls == 1
    # The chosen sample is the one the critic ranks safest (Q_h = s0 + a0: smallest a0).
    expected = np.clip(np.random.default_rng(np.random.SeedSequence(0, spawn_key=(1,)))
                       .standard_normal((8, 2)), -1, 1)
    np.testing.assert_allclose(choice.action, expected[np.argmin(expected[:, 0])], rtol=1e-6)
    # The controller's stream with the same seed differs from the monitor's.
    from saferl_ros.seeding import noise_rng
    assert not np.allclose(noise_rng(0, 'controller').standard_normal(4),
                           noise_rng(0, 'monitor').standard_normal(4))


def test_lazy_fallback_with_noise_drawn_on_arrival_gives_the_precomputed_actions():
    # precompute_fallback true (fallback per observation) and false (noise per observation, the
    # fallback only where a proposal needs it) publish the same actions.
    rng = np.random.default_rng(5)
    states = [FEASIBLE_S if rng.random() < 0.6 else INFEASIBLE_S for _ in range(40)]
    proposals = rng.uniform(-1, 1, (40, 2))
    # A third way, the node's worker thread: the noise drawn on arrival, the fallback computed
    # elsewhere and handed over as a function that is called only when the rule needs it.
    eager, lazy, pending = (SafetyMonitor(NoisyBundle(), MonitorConfig(
        fallback_samples=3, seed=7, min_hold=0.0)) for _ in range(3))
    waited = []
    for t, (s, a) in enumerate(zip(states, proposals)):
        ready = eager.fallback_for(s)
        noise = lazy.fallback_noise(s)
        computed = pending.fallback_for(s, noise=pending.fallback_noise(s))
        v_eager = eager.decide(s, a, t, t, t, fallback=ready)
        v_lazy = lazy.decide(s, a, t, t, t, fallback_noise=noise)
        v_pending = pending.decide(s, a, t, t, t,
                                   fallback=lambda c=computed: waited.append(t) or c)
        for v in (v_lazy, v_pending):
            assert v.state == v_eager.state and v.replaced == v_eager.replaced
            np.testing.assert_array_equal(v.action, v_eager.action)
    assert len(waited) == eager.counters.counts['RECOVERY'] + \
        eager.counters.counts['INTERVENING']
    assert eager.counters.replaced > 0 and eager.counters.counts['NOMINAL'] > 0
    # The lazy monitor ran its fallback only where the rule needed it.
    assert lazy.bundle.fallback_calls == eager.counters.counts['RECOVERY'] + \
        eager.counters.counts['INTERVENING'] < eager.bundle.fallback_calls == 40
    # No noise is drawn for an observation that can have no fallback.
    assert lazy.fallback_noise([math.nan, 0.0, 0.0]) is None


def test_precomputed_fallback_is_used_without_computing_another():
    m = monitor(min_hold=0.0)
    ready = m.fallback_for(INFEASIBLE_S)        # what the node computes on the observation
    assert m.bundle.fallback_calls == 1
    np.testing.assert_allclose(ready.action, [-0.5, 0.25])
    assert ready.risk == pytest.approx(0.0)
    v = m.decide(INFEASIBLE_S, [0.0, 0.0], 1.0, 1.0, 1.0, fallback=ready)
    assert v.state == MonitorState.RECOVERY and m.bundle.fallback_calls == 1
    np.testing.assert_allclose(v.action, ready.action)
    # A feasible proposal passes; the precomputed fallback is simply not used.
    v = m.decide(FEASIBLE_S, [0.2, 0.1], 2.0, 2.0, 2.0, fallback=ready)
    assert v.state == MonitorState.NOMINAL
    np.testing.assert_allclose(v.action, [0.2, 0.1])
    # An invalid observation has no fallback to precompute.
    assert m.fallback_for([math.nan, 0.0, 0.0]) is None and m.bundle.fallback_calls == 1


def test_thresholds_override_the_manifest():
    m = monitor(threshold_v=1.0, threshold_q=1.0)
    assert m.decide(INFEASIBLE_S, [0.4, 0], 1.0, 1.0, 1.0).state == MonitorState.NOMINAL
    m = monitor(threshold_v=-5.0)   # forces every state infeasible
    assert m.decide(FEASIBLE_S, [0, 0], 1.0, 1.0, 1.0).state == MonitorState.RECOVERY
    # the rule says which thresholds are in force (the node logs it at configure)
    assert monitor().rule.describe() == 'V_h <= 0, Q_h <= 0'
    assert monitor(threshold_v=3.0, threshold_q=2.5).rule.describe() == 'V_h <= 3, Q_h <= 2.5'


def test_min_hold_prevents_chattering():
    m = monitor(min_hold=0.1)
    dt = 0.02
    states = []
    for k in range(10):
        s = INFEASIBLE_S if k == 2 else FEASIBLE_S
        states.append(m.decide(s, [0, 0], k * dt, k * dt, k * dt).state)
    # fallback at step 2 keeps control until stamp 0.04 + 0.1 = 0.14 (steps 3..6), then passes
    assert states[:2] == [MonitorState.NOMINAL] * 2
    assert states[2] == MonitorState.RECOVERY
    assert states[3:7] == [MonitorState.INTERVENING] * 4
    assert states[7:] == [MonitorState.NOMINAL] * 3
    assert m.counters.interventions == 1
    assert m.counters.counts['INTERVENING'] == 4


@pytest.mark.parametrize('obs, act, what', [
    ([math.nan, 0, 0], [0, 0], 'NaN'),
    ([0, 0], [0, 0], 'entries'),
    (FEASIBLE_S, [0, math.inf], 'NaN/Inf'),
    (FEASIBLE_S, [0, 0, 0], 'entries'),
    (FEASIBLE_S, 'go', 'not numeric'),
])
def test_invalid_input_is_fault_with_safe_action(obs, act, what):
    m = monitor(safe_action=[0.0, 0.0])
    v = m.decide(obs, act, 1.0, 1.0, 1.0)
    assert v.state == MonitorState.FAULT
    assert what in v.reason
    np.testing.assert_array_equal(v.action, [0, 0])


def test_stale_observation_and_stale_proposal():
    m = monitor(observation_timeout=0.1, proposal_timeout=0.05)
    v = m.decide(FEASIBLE_S, [0, 0], obs_stamp=1.0, proposal_stamp=1.0, now=1.2)
    assert v.state == MonitorState.STALE and 'observation' in v.reason
    v = m.decide(FEASIBLE_S, [0, 0], obs_stamp=1.0, proposal_stamp=1.0, now=1.07)
    assert v.state == MonitorState.STALE and 'proposal' in v.reason
    v = m.decide(FEASIBLE_S, [0, 0], obs_stamp=1.0, proposal_stamp=0.98, now=1.0)
    assert v.state == MonitorState.STALE and 'older observation' in v.reason


def test_watchdog_stops_when_controller_or_sensor_falls_silent():
    m = monitor(observation_timeout=0.2, proposal_timeout=0.1)
    assert m.watchdog(None, None, 5.0) is None
    assert m.watchdog(1.0, 1.0, 1.05) is None
    v = m.watchdog(1.0, 0.98, 1.15)      # observation 1.0 unanswered for 150 ms
    assert v.state == MonitorState.STALE and 'controller silent' in v.reason
    v = m.watchdog(1.0, 1.0, 1.3)        # no observation for 300 ms
    assert v.state == MonitorState.STALE and 'no observation' in v.reason


def test_future_stamped_observation_or_proposal_is_fault_and_never_fresh():
    """Review 14: a stamp ahead of the clock has a negative age; it must not pass as fresh."""
    m = monitor(observation_timeout=0.25, proposal_timeout=0.25, safe_action=[0.0, 0.0])
    assert m.config.future_tolerance == 0.2      # the default
    assert m.decide(FEASIBLE_S, [0.3, 0], 10.0, 10.0, 10.0).state == MonitorState.NOMINAL
    # an hour ahead: refused, and the reason says by how much
    v = m.decide(FEASIBLE_S, [0.3, 0], 3610.0, 3610.0, now=10.0)
    assert v.state == MonitorState.FAULT and not v.passed
    assert 'observation stamp is 3600.000 s in the future' in v.reason
    assert 'future_tolerance 0.2 s' in v.reason
    np.testing.assert_array_equal(v.action, [0, 0])
    assert m.latest_stamp == 10.0      # the refused stamp is not the newest decided
    # a proposal stamped ahead (its observation is not): refused too
    v = m.decide(FEASIBLE_S, [0.3, 0], 10.0, 12.0, now=10.05)
    assert v.state == MonitorState.FAULT and 'proposal stamp is 1.950 s in the future' in v.reason
    # within the tolerance (clock skew, /clock arriving just after the observation): judged
    v = m.decide(FEASIBLE_S, [0.3, 0], 10.15, 10.15, now=10.0)
    assert v.state == MonitorState.NOMINAL
    # the tolerance is a parameter; 0 refuses any stamp ahead of the clock
    strict = monitor(future_tolerance=0.0)
    assert strict.decide(FEASIBLE_S, [0, 0], 10.001, 10.001, 10.0).state == MonitorState.FAULT
    assert monitor_config({'future_tolerance': '0.5'}).future_tolerance == 0.5


def test_watchdog_refuses_a_newest_stamp_in_the_future():
    """The watchdog never measures a negative silence: a stamp ahead of the clock is a FAULT."""
    m = monitor(observation_timeout=0.2, proposal_timeout=0.1)
    v = m.watchdog(3601.0, 3601.0, now=1.0)
    assert v.state == MonitorState.FAULT and 'in the future' in v.reason
    assert m.watchdog(1.1, 1.1, now=1.0) is None         # within future_tolerance


def test_clock_jumping_back_forgets_the_old_time_line():
    """Review 14b: a simulation reset its /clock (100 s -> 0.1 s) while the monitor ran."""
    m = monitor(min_hold=1.0)
    assert m.decide(INFEASIBLE_S, [0, 0], 100.0, 100.0, 100.0).replaced   # hold until 101 s
    reason = m.clock_jumped(-99.9)
    assert reason.startswith('clock jumped back by 99.900 s: ')
    assert 'no observation since' in reason
    assert m.hold_until == -math.inf and m.latest_stamp == -math.inf
    # the new time line is judged afresh: no hold carried over, nothing "in the future"
    assert m.decide(FEASIBLE_S, [0, 0], 0.2, 0.2, 0.2).state == MonitorState.NOMINAL
    # an observation stamped on the old time line is still refused as lying in the future
    v = m.decide(FEASIBLE_S, [0, 0], 100.1, 100.1, 0.3)
    assert v.state == MonitorState.FAULT and 'in the future' in v.reason
    assert m.clock_jumped(None, 'clock switched to /clock (use_sim_time true)').startswith(
        'clock switched to /clock')


def test_an_observation_before_the_first_clock_message_waits_for_the_clock():
    m = monitor()
    # use_sim_time and the clock still 0: ignored, not blamed on the sender's clock
    why = m.clock_waiting(100.0, 0.0, sim_time=True)
    assert 'before the first /clock message' in why and '100.000 s' in why
    assert m.clock_waiting(0.0, 0.0, sim_time=True) == ''      # lock-step starts at stamp 0
    assert m.clock_waiting(0.1, 0.0, sim_time=True) == ''      # within future_tolerance
    assert m.clock_waiting(100.0, 0.0, sim_time=False) == ''   # wall time: stamp_ahead's FAULT
    assert m.clock_waiting(100.0, 50.0, sim_time=True) == ''   # the clock runs


def test_cost_critic_uses_budget():
    m = monitor('cost', min_hold=0.0)
    assert m.decide([0.1, 0, 0], [0.3, 0], 1, 1, 1).state == MonitorState.NOMINAL   # 0.4 <= 0.5
    v = m.decide([0.1, 0, 0], [0.6, 0], 2, 2, 2)   # 0.7 > 0.5, fallback gives -0.4 -> feasible
    assert v.state == MonitorState.INTERVENING and 'budget' in v.reason
    v = m.decide([1.2, 0, 0], [0.6, 0], 3, 3, 3)   # even the fallback's 0.7 > 0.5
    assert v.state == MonitorState.RECOVERY
    assert m.rule.describe() == 'Q_c <= 0.5'


def test_safe_action_fallback_mode_and_clipping():
    with pytest.raises(MonitorConfigError, match=r'outside the action bounds'):
        monitor(fallback='safe_action', safe_action=[0.0, -2.0])
    m = monitor(fallback='safe_action', safe_action=[-0.5, -1.0])
    v = m.decide(INFEASIBLE_S, [0, 0], 1, 1, 1)     # Q_h 0.5; the safe action's Q_h is 0
    assert v.state == MonitorState.RECOVERY and v.replaced
    np.testing.assert_allclose(v.action, [-0.5, -1])
    v = m.decide(FEASIBLE_S, [-3, 0.5], 10, 10, 10)
    np.testing.assert_allclose(v.action, [-1, 0.5])     # proposals are clipped too


def test_bundle_without_critic_is_refused():
    with pytest.raises(MonitorConfigError, match='no critic'):
        SafetyMonitor(FakeBundle('none'))


@pytest.mark.parametrize('cfg, name', [
    ({'observation_timeout': 0}, 'observation_timeout'),
    ({'proposal_timeout': -1}, 'proposal_timeout'),
    ({'fallback': 'nothing'}, 'fallback'),
    ({'safe_action': [0, 0, 0]}, 'safe_action'),
    ({'safe_action': [0.0, 1.5]}, 'safe_action'),
    ({'fallback_samples': 0}, 'fallback_samples'),
    ({'threshold_v': math.nan}, 'threshold_v'),
    ({'future_tolerance': -0.1}, 'future_tolerance'),
    ({'future_tolerance': math.inf}, 'future_tolerance'),
])
def test_bad_config_names_the_parameter(cfg, name):
    with pytest.raises(MonitorConfigError, match=name):
        monitor(**cfg)


def test_one_safe_action_value_stands_for_every_dimension():
    # as the node's safe_action parameter: [-0.5] on a 2-D action is [-0.5, -0.5]
    m = monitor(fallback='safe_action', safe_action=[-0.5])
    np.testing.assert_allclose(m.safe_action, [-0.5, -0.5])
    assert monitor_config({'safe_action': '-0.5'}).safe_action == [-0.5]


def test_parameters_the_critic_never_reads_are_refused():
    with pytest.raises(MonitorConfigError, match='budget does not apply'):
        monitor(budget=0.5)                      # a feasibility critic
    with pytest.raises(MonitorConfigError, match='threshold_v does not apply'):
        monitor('cost', threshold_v=1.0)
    check_applies({'budget': None, 'threshold_v': 2.0}, 'feasibility')   # unset is fine


def test_counters_and_state_codes():
    m = monitor()
    m.decide(FEASIBLE_S, [0, 0], 1, 1, 1)
    m.decide([math.nan] * 3, [0, 0], 1, 1, 1)
    counts = m.counters.as_dict()
    assert counts['decisions'] == 2 and counts['nominal'] == 1 and counts['fault'] == 1
    assert state_names()[MonitorState.RECOVERY] == 'RECOVERY'


def test_a_third_critic_kind_is_one_rule_class_and_one_registry_line(monkeypatch):
    # A rule the monitor has never heard of (an ensemble's worst-case cost, say): decide() asks
    # it for the risk, the tests and the reasons; nothing in the monitor names the kind.
    from saferl_ros.monitor import CostRule, CRITIC_RULES

    class WorstCaseRule(CostRule):
        kind = 'worst_case'

        def action_reason(self, risk):
            return f'worst case over budget ({risk:.2f})'

    monkeypatch.setitem(CRITIC_RULES, 'worst_case', WorstCaseRule)
    bundle = FakeBundle('cost')
    bundle.critic_kind = 'worst_case'
    m = SafetyMonitor(bundle, MonitorConfig(min_hold=0.0))
    assert m.kind == 'worst_case'
    assert m.decide([0.1, 0, 0], [0.3, 0], 1, 1, 1).state == MonitorState.NOMINAL
    v = m.decide([0.1, 0, 0], [0.6, 0], 2, 2, 2)
    assert v.state == MonitorState.INTERVENING and v.reason.startswith('worst case over budget')
    assert v.replaced and v.risk_final == pytest.approx(-0.4)


def test_a_critic_kind_without_a_rule_is_refused():
    bundle = FakeBundle('cost')
    bundle.critic_kind = 'ensemble'
    with pytest.raises(MonitorConfigError, match=r"critic kind 'ensemble'.*cost.*feasibility"):
        SafetyMonitor(bundle)


def _ucb_monitor(k=2.0, **cfg):
    bundle = FakeBundle('cost')
    bundle.critic_kind = 'cost_ucb'
    bundle.critic_config = {'kind': 'cost_ucb', 'budget': 0.5, 'k': k}
    # a cost ensemble's mean s[0] + a[0] and spread |a[1]|
    bundle.critic = lambda obs, act: {'q_c_mean': obs[:, 0] + act[:, 0],
                                      'q_c_std': np.abs(act[:, 1])}
    return SafetyMonitor(bundle, MonitorConfig(**cfg))


def test_cost_ucb_rule_judges_the_ensembles_mean_plus_k_std():
    m = _ucb_monitor(min_hold=0.0)
    assert m.kind == 'cost_ucb'
    # mean 0.25 + 2 * std 0.125 = 0.5: at the budget, passes
    v = m.decide([0.125, 0, 0], [0.125, 0.125], 1.0, 1.0, 1.0)
    assert v.state == MonitorState.NOMINAL and v.q_c == 0.5
    # the same mean with std 0.25: 0.75 > 0.5; the fallback [-0.5, 0.25] scores
    # -0.375 + 2 * 0.25 = 0.125 and replaces the proposal
    v = m.decide([0.125, 0, 0], [0.125, 0.25], 2.0, 2.0, 2.0)
    assert v.state == MonitorState.INTERVENING and v.replaced
    assert v.q_c == 0.75 and v.risk_final == 0.125
    assert v.reason.startswith('cost over budget (Q_c mean + 2 std = 0.75 > 0.5)')
    # k = 0 judges the mean alone; a configured budget overrides the manifest's
    assert _ucb_monitor(k=0.0).decide([0.125, 0, 0], [0.125, 0.25], 1, 1, 1).passed
    assert _ucb_monitor(budget=1.0).decide([0.125, 0, 0], [0.125, 0.25], 1, 1, 1).passed
    assert _ucb_monitor(budget=1.0).rule.describe() == 'Q_c mean + 2 std <= 1'


def test_cost_ucb_rule_refuses_a_bad_k():
    with pytest.raises(MonitorConfigError, match='critic.k'):
        _ucb_monitor(k=-1.0)
    with pytest.raises(MonitorConfigError, match='critic.k'):
        _ucb_monitor(k=math.nan)
