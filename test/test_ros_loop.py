"""The ROS 2 loop in one process over real DDS: sim, controller, safety monitor, recorder."""

import math
from pathlib import Path
import time

from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
from offline_training.data.dataset import validate_file
import pytest
from rclpy.node import Node
from saferl_interfaces.msg import MonitorVerdict, StepRecord
from saferl_ros.bringup import Graph, run
from saferl_ros.bundle import load_bundle
from saferl_ros.graph import CONTROLLER, MONITOR, RECORDER, SIM
from saferl_ros.monitor import MonitorState
from saferl_ros.nodes import common
from saferl_ros.observation import channel_names
from saferl_ros.seeding import noise_rng
from saferl_ros.sim import make_gym_env
from sensor_msgs.msg import JointState
from test_ros_support import (build_bundle, domain_fixture, recorded, spin_for,
                              spin_until, tampered_copy)

ros_domain = domain_fixture(61)
CHANNELS = channel_names('BallCircle')


@pytest.fixture(scope='module')
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp('bundles')
    fisor = build_bundle(root / 'fisor')
    return {'fisor': fisor, 'bc_all': build_bundle(root / 'bc', algorithm='bc_all'),
            'tampered': tampered_copy(fisor, root / 'tampered')}


class Probe(Node):
    """Collects messages of the loop's topics."""

    def __init__(self):
        super().__init__('probe')
        self.msgs = {t: [] for t in (common.OBSERVATION, common.FINAL, common.PROPOSED,
                                     common.STEP, common.VERDICT, common.STATUS)}
        # Commands are keep-last-1 for the robot; the probe keeps a queue (reliable, depth 200)
        # so that it sees every one, including those followed at once by the safe stop.
        for topic, cls, qos in ((common.OBSERVATION, JointState, common.SENSOR_QOS),
                                (common.FINAL, JointState, common.RECORD_QOS),
                                (common.PROPOSED, JointState, common.RECORD_QOS),
                                (common.STEP, StepRecord, common.RECORD_QOS),
                                (common.VERDICT, MonitorVerdict, common.RECORD_QOS)):
            self.create_subscription(cls, topic, lambda m, t=topic: self.msgs[t].append(m), qos)
        self.create_subscription(DiagnosticStatus, common.STATUS,
                                 lambda m: self.msgs[common.STATUS].append(m), common.STATUS_QOS)
        self.obs_pub = self.create_publisher(JointState, common.OBSERVATION, common.SENSOR_QOS)
        self.prop_pub = self.create_publisher(JointState, common.PROPOSED, common.COMMAND_QOS)

    def now_ns(self) -> int:
        return self.get_clock().now().nanoseconds


def loop_params(bundles, tmp_path, sim=None, controller=None, monitor=None, recorder=True):
    nodes = {
        SIM: {'task': 'BallCircle', 'mode': 'lockstep', 'horizon': 25, 'episodes': 2,
              'command_timeout': 0.5, 'min_subscribers': 2, 'wait_for_recorder': recorder,
              **(sim or {})},
        CONTROLLER: {'bundle': bundles['fisor'], 'use_sim_time': True, **(controller or {})},
        MONITOR: {'bundle': bundles['fisor'], 'use_sim_time': True, 'observation_timeout': 1.0,
                  'proposal_timeout': 1.0, **(monitor or {})},
    }
    if recorder:
        nodes[RECORDER] = {'task': 'BallCircle', 'output_dir': str(tmp_path / 'rec'),
                           'run_name': 'run', 'bundle': bundles['fisor'], 'use_sim_time': True}
    return nodes


class Loop:
    """One graph of a test and its probe: configured by start(), torn down by stop()."""

    def __init__(self):
        self.graph = None
        self.probe = None

    def start(self, nodes, probe=True):
        """Create and configure the graph; return (graph, probe or None, configure errors)."""
        self.stop()
        self.graph = Graph(nodes)
        self.probe = Probe() if probe else None
        if self.probe:
            self.graph.executor.add_node(self.probe)
        return self.graph, self.probe, self.graph.configure()

    def run(self, nodes, probe=False, timeout=60.0):
        """Start, activate, spin until the simulator's episodes are done, stop."""
        graph, probe, errors = self.start(nodes, probe)
        assert errors == []
        graph.activate()
        assert graph.spin_until(lambda: graph.nodes[SIM].done, timeout)
        self.stop()
        return graph, probe

    def stop(self):
        """Deactivate (the recorder closes its run), remove the probe, shut the graph down."""
        if self.graph is None:
            return
        graph, probe, self.graph, self.probe = self.graph, self.probe, None, None
        try:
            graph.deactivate()
        finally:
            if probe:
                graph.executor.remove_node(probe)
                probe.destroy_node()
            graph.shutdown()


@pytest.fixture
def loop():
    """Yield a Loop; whatever graph it still holds is torn down after the test, pass or fail."""
    held = Loop()
    try:
        yield held
    finally:
        held.stop()


def missed(probe_or_data) -> np.ndarray:
    """Return the 'missed' flags of the probe's step messages or of a recording."""
    if isinstance(probe_or_data, dict):
        return probe_or_data['missed']
    return np.array([m.missed for m in probe_or_data.msgs[common.STEP]])


def test_feasible_actions_pass_through_and_the_recording_is_dsrl_data(bundles, tmp_path, loop):
    nodes = loop_params(bundles, tmp_path, monitor={'threshold_v': 1e6, 'threshold_q': 1e6})
    _, probe = loop.run(nodes, probe=True)
    # observation -> command: every final command answers an observation, with its stamp
    # (the probe's observation subscription is best effort, so it may miss one; the recorded
    # steps come over a reliable topic and name every observation the simulator stepped from)
    data = recorded(tmp_path / 'rec' / 'run')
    obs_stamps = {common.stamp_to_ns(m.header.stamp) for m in probe.msgs[common.OBSERVATION]}
    finals = {common.stamp_to_ns(m.header.stamp) for m in probe.msgs[common.FINAL]}
    assert len(obs_stamps) >= 45 and obs_stamps <= finals
    assert set(data['stamps_ns'].tolist()) <= finals
    assert not missed(probe).any() and not missed(data).any()
    assert data['observations'].shape == (50, 8)
    assert (data['verdicts'] == MonitorState.NOMINAL).all()
    np.testing.assert_allclose(data['actions'], data['proposed_actions'], atol=1e-6)
    out = tmp_path / 'rec' / 'run' / 'recording.hdf5'
    assert validate_file(out) == []
    dsrl = make_gym_env('OfflineBallCircle-v0').unwrapped.get_dataset(str(out))
    assert dsrl['observations'].shape == (50, 8) and dsrl['timeouts'].sum() == 2


@pytest.mark.parametrize('thresholds, state', [
    ({'threshold_v': 1e6, 'threshold_q': -1e6}, MonitorState.INTERVENING),
    ({'threshold_v': -1e6}, MonitorState.RECOVERY),
])
def test_infeasible_proposals_are_replaced_by_the_fallback(bundles, tmp_path, loop, thresholds,
                                                           state):
    nodes = loop_params(bundles, tmp_path, sim={'episodes': 1, 'horizon': 15},
                        monitor={**thresholds, 'seed': 3, 'fallback_samples': 1})
    loop.run(nodes)
    data = recorded(tmp_path / 'rec' / 'run')
    assert (data['verdicts'] == state).all()
    # The applied actions are exactly the fallback policy's, drawn from the monitor's own noise
    # stream, wherever the critic ranks it safer than the proposal; the proposal elsewhere.
    bundle = load_bundle(bundles['fisor'])
    rng = noise_rng(3, 'monitor')
    expected = []
    for obs, proposed, q_proposed in zip(data['observations'], data['proposed_actions'],
                                         data['critic_q_h']):
        fallback = np.clip(bundle.fallback(obs[None], noise=bundle.sample_noise(
            1, rng, graph='fallback')), -1, 1)
        q_fallback = float(bundle.critic(obs[None], fallback)['q_h'][0])
        expected.append(fallback[0] if q_fallback < q_proposed else proposed)
    np.testing.assert_allclose(data['actions'], expected, atol=1e-5)
    assert data['replaced'].any()
    changed = np.abs(data['actions'] - data['proposed_actions']).max(axis=1) > 1e-6
    np.testing.assert_array_equal(changed, data['replaced'])
    assert np.isfinite(data['critic_v_h']).all() and np.isfinite(data['critic_q_h']).all()


def test_monitor_stops_on_nan_stale_reordered_and_silent_controller(bundles, loop):
    nodes = {MONITOR: {'bundle': bundles['fisor'], 'observation_timeout': 0.3,
                       'proposal_timeout': 0.15, 'watchdog_rate_hz': 50.0,
                       'safe_action': [0.0, 0.0]}}
    graph, probe, errors = loop.start(nodes)
    assert errors == []
    graph.activate()
    assert spin_until(graph.executor, lambda: probe.count_publishers(common.FINAL) >= 1, 5.0)
    spin_for(graph.executor, 0.3)
    finals = probe.msgs[common.FINAL]

    statuses = probe.msgs[common.STATUS]

    def exchange(obs, names=CHANNELS, proposal=(0.5, 0.5), stamp=None, answer=True):
        """Send an observation (and a proposal); return the statuses published meanwhile."""
        since, n = len(statuses), len(finals)
        stamp = probe.now_ns() if stamp is None else stamp
        probe.obs_pub.publish(common.joint_state(names, obs, stamp))
        spin_for(graph.executor, 0.05)
        if answer:
            probe.prop_pub.publish(common.joint_state(['action_0', 'action_1'], proposal, stamp))
        assert spin_until(graph.executor, lambda: len(finals) > n, 3.0)
        spin_for(graph.executor, 0.1)
        return statuses[since:]

    def stopped(published, state, *words):
        """Return True if one of ``published`` has ``state`` and a reason with any of ``words``."""
        reasons = [next(v.value for v in m.values if v.key == 'reason') for m in published
                   if m.message == state]
        return any(word in reason for reason in reasons for word in words)

    assert stopped(exchange([math.nan] + [0.0] * 7), 'FAULT', 'NaN')
    assert list(finals[-1].position) == [0.0, 0.0]
    # monitor/verdict carries the decision for the observation's stamp: state, why, proposal
    verdict = probe.msgs[common.VERDICT][-1]
    assert verdict.state == MonitorVerdict.FAULT == MonitorState.FAULT and 'NaN' in verdict.reason
    assert verdict.header.stamp == finals[-1].header.stamp
    assert list(verdict.proposed) == [0.5, 0.5] and list(verdict.action) == [0.0, 0.0]
    assert not verdict.replaced and math.isnan(verdict.risk_final)
    assert stopped(exchange([0.0] * 8, stamp=probe.now_ns() - 2_000_000_000),   # 2 s old
                   'STALE', 'old')
    swapped = list(CHANNELS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert stopped(exchange([0.0] * 8, names=swapped), 'FAULT', 'channels do not match',
                   'order')
    assert stopped(exchange([0.0] * 8, proposal=(math.inf, 0.0)), 'FAULT', 'proposed action')
    assert stopped(exchange([0.0] * 8, answer=False), 'STALE', 'silent')   # controller silent
    assert list(finals[-1].position) == [0.0, 0.0]
    # The status topic is transient local: a subscriber that joins now still gets the state.
    late = []
    late_node = Node('late_subscriber')
    late_node.create_subscription(DiagnosticStatus, common.STATUS, late.append,
                                  common.STATUS_QOS)
    graph.executor.add_node(late_node)
    assert spin_until(graph.executor, lambda: late, 5.0)
    assert late[-1].message in ('STALE', 'FAULT')
    graph.executor.remove_node(late_node)
    late_node.destroy_node()


def test_controller_death_makes_the_monitor_stop_the_robot(bundles, tmp_path, loop):
    # Wall time: under simulation time the loop's clock stands still while the controller is
    # silent, so the monitor's watchdog would not fire (the simulator's command_timeout acts).
    nodes = loop_params(bundles, tmp_path, sim={'episodes': 0, 'horizon': 200,
                                                'lockstep_time': 'wall'},
                        monitor={'proposal_timeout': 0.2, 'observation_timeout': 0.5,
                                 'threshold_v': 1e6, 'threshold_q': 1e6,
                                 'use_sim_time': False})
    graph, probe, errors = loop.start(nodes)
    assert errors == []
    graph.activate()
    steps = probe.msgs[common.STEP]
    assert spin_until(graph.executor, lambda: len(steps) >= 20, 30.0)
    # saferl-bringup's executor: it dispatches queued events of a removed node, which must not
    # raise InvalidHandle (Graph.remove)
    assert type(graph.executor).__name__ == 'EventsExecutor'
    graph.remove(CONTROLLER)                       # the controller process is gone
    steps_at_death = len(steps)
    assert spin_until(graph.executor, lambda: len(steps) >= steps_at_death + 6, 10.0)
    loop.stop()
    data = recorded(tmp_path / 'rec' / 'run')
    # The probe counts the steps it received, so it may lag the simulator: the death is at or
    # after steps_at_death, and from the death on every step is stopped. Before it, a proposal
    # that one slow step of the shared thread made late is stopped too (STALE for that step,
    # then normal again: seen once in CI); such isolated stops are allowed, a few at most.
    verdicts = data['verdicts']
    answered = np.flatnonzero(verdicts != MonitorState.STALE)
    assert answered.size > 0
    final_stop = int(answered[-1]) + 1             # the run of stops that never ends
    assert len(verdicts) - final_stop >= 4 and final_stop >= steps_at_death, (
        final_stop, steps_at_death, verdicts.tolist())
    transient = np.flatnonzero(verdicts[:final_stop] == MonitorState.STALE)
    assert transient.size <= 2, (transient.tolist(), verdicts.tolist())
    np.testing.assert_array_equal(data['actions'][final_stop:], 0.0)
    assert not missed(data).any()     # the monitor answered every observation with the stop


def test_tampered_or_mismatched_bundle_fails_configure_and_robot_stays_stopped(bundles, tmp_path,
                                                                               loop):
    nodes = loop_params(bundles, tmp_path, sim={'episodes': 0, 'command_timeout': 0.05,
                                                'min_subscribers': 1},
                        controller={'task': 'BallRun'},
                        monitor={'bundle': bundles['tampered']}, recorder=False)
    graph, probe, errors = loop.start(nodes)
    text = '\n'.join(errors)
    assert 'safety_monitor_node' in text and 'sha256 mismatch' in text and 'policy.onnx' in text
    assert 'controller_node' in text and 'observation channels do not match' in text
    # Only the simulator is configured; it must apply nothing but the safe action.
    graph.nodes[SIM].trigger_activate()
    assert spin_until(graph.executor, lambda: len(probe.msgs[common.STEP]) >= 5, 10.0)
    loop.stop()
    assert missed(probe).all()
    np.testing.assert_array_equal([m.action for m in probe.msgs[common.STEP]], 0.0)
    assert {tuple(m.observation_names) for m in probe.msgs[common.STEP]} == {tuple(CHANNELS)}


def test_policy_without_critics_is_shielded_by_another_bundle(bundles, tmp_path, loop):
    nodes = loop_params(bundles, tmp_path, sim={'episodes': 1, 'horizon': 20},
                        controller={'bundle': bundles['bc_all']})
    loop.run(nodes)
    data = recorded(tmp_path / 'rec' / 'run')
    assert np.isin(data['verdicts'], [0, 1, 2]).all() and np.isfinite(data['critic_q_h']).all()
    # and a bundle without critics cannot be the monitor
    _, _, errors = loop.start({MONITOR: {'bundle': bundles['bc_all']}}, probe=False)
    assert 'no critic' in '\n'.join(errors)


def test_bringup_runs_a_parameters_file(bundles, tmp_path):
    b = bundles['fisor']
    start = time.monotonic()
    summary = run('config/demo.yaml', episodes=1, quiet=True, overrides=[
        f'controller_node.bundle={b}', f'safety_monitor_node.bundle={b}',
        f'recorder_node.bundle={b}', f'recorder_node.monitor_bundle={b}',
        f'recorder_node.output_dir={tmp_path}', 'recorder_node.run_name=demo',
        'sim_node.horizon=30'])
    assert time.monotonic() - start < 60
    assert len(summary['episodes']) == 1 and summary['episodes'][0]['steps'] == 30
    assert summary['latency']['count'] == 30
    # the loop thread's CPU time per step: one per step, and never more than the wall time
    cpu = summary['latency_cpu']
    assert cpu['count'] == 30 and 0 < cpu['p50_ms'] <= summary['latency']['p50_ms'] + 0.5
    assert validate_file(summary['recording']) == []
    # The MCAP bag decodes with mcap-ros2-support's own reader (schema names pkg/msg/Type).
    from mcap_ros2.reader import read_ros2_messages
    topics = {}
    for m in read_ros2_messages(str(tmp_path / 'demo' / 'raw' / 'episode_000000.mcap')):
        topics.setdefault(m.channel.topic, []).append(m)
    assert len(topics['/step']) == 30 and len(topics['/observation']) == 30
    step = topics['/step'][0]
    assert step.schema.name == 'saferl_interfaces/msg/StepRecord'
    assert list(step.ros_msg.observation_names) == CHANNELS and step.ros_msg.step == 1
    assert len(step.ros_msg.observation) == 8 and len(step.ros_msg.action) == 2
    assert topics['/step'][-1].ros_msg.truncated and topics['/step'][-1].ros_msg.step == 30
    # verdicts for this episode's observations (one near the end may fall in the next file:
    # DDS does not order topics against each other)
    verdicts = topics['/monitor/verdict']
    assert verdicts[0].schema.name == 'saferl_interfaces/msg/MonitorVerdict'

    def stamp(m):
        return (m.ros_msg.header.stamp.sec, m.ros_msg.header.stamp.nanosec)
    assert {stamp(v) for v in verdicts} <= {stamp(s) for s in topics['/step']}
    assert len(verdicts) >= 25 and {v.ros_msg.state for v in verdicts} <= {0, 1, 2}
    assert list(topics['/observation'][0].ros_msg.name) == CHANNELS
    assert topics['/monitor/status'][-1].schema.name == 'diagnostic_msgs/msg/DiagnosticStatus'


def test_demo_runs_any_task_with_its_bundle(tmp_path, capsys):
    from saferl_ros.demo import main as demo
    bundle = build_bundle(tmp_path / 'drone', task='DroneRun')     # 4 rotor commands, not 2
    assert demo(['--task', 'DroneRun', '--bundle', bundle, '--episodes', '1',
                 '--output', str(tmp_path / 'rec')]) == 0
    out = capsys.readouterr().out
    assert '1 episodes of DroneRun' in out
    data = recorded(next((tmp_path / 'rec').iterdir()))
    assert data['actions'].shape[1] == 4                       # the drone's rotor commands
    assert 0 < len(data['rewards']) <= 200                      # DroneRun's horizon (or a crash)
    assert data['terminals'][-1] or data['timeouts'][-1]
    # a task without a shipped bundle is one line naming the bundles there are
    assert demo(['--task', 'AntRun', '--episodes', '1']) == 2
    err = capsys.readouterr().err
    assert 'no shipped bundle for AntRun' in err and 'fisor-ballcircle' in err
    with pytest.raises(SystemExit) as info:       # refused before any banner or bundle
        demo(['--episodes', '0'])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert '--episodes must be >= 1, got 0' in captured.err and captured.out == ''


def test_demo_runs_drcorl_under_its_own_critics_and_under_a_fisor_monitor(tmp_path, capsys):
    from saferl_ros.demo import main as demo
    drcorl = build_bundle(tmp_path / 'drcorl', algorithm='drcorl', task='BallRun')
    fisor = build_bundle(tmp_path / 'fisor', task='BallRun')
    # without --task the bundle's own task runs
    for name, extra in (('own', []), ('fisor', ['--task', 'BallRun', '--monitor-bundle', fisor])):
        out = tmp_path / f'rec-{name}'
        assert demo(['--bundle', drcorl, '--episodes', '1', '--output', str(out), *extra]) == 0
        data = recorded(next(out.iterdir()))
        # every step was judged by the monitor's critic (no miss, a critic value per step)
        assert len(data['rewards']) == 100 and not missed(data).any(), name
        assert np.isin(data['verdicts'], [0, 1, 2]).all(), name
    out = capsys.readouterr().out
    assert 'monitor ' + fisor in out and out.count('1 episodes of BallRun') == 2
    # another task's bundle is refused in one line before anything starts (its observation
    # channels are another robot's: the nodes would only ever hold the safe action)
    carcircle = str(Path(__file__).resolve().parents[1] / 'models' / 'fisor-carcircle')
    for args, wrong in ((['--task', 'BallCircle', '--bundle', drcorl], 'a BallRun bundle'),
                        (['--bundle', drcorl, '--monitor-bundle', carcircle],
                         'a CarCircle bundle')):
        assert demo(args + ['--output', str(tmp_path / 'refused')]) == 2
        err = capsys.readouterr().err
        assert wrong in err and 'pass --task' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'refused').exists()


def test_controller_refuses_reordered_channels_and_nan(bundles, loop):
    graph, probe, errors = loop.start({CONTROLLER: {'bundle': bundles['fisor']}})
    assert errors == []
    graph.activate()
    controller = graph.nodes[CONTROLLER]
    assert spin_until(graph.executor, lambda: probe.count_subscribers(common.OBSERVATION) >= 2
                      and probe.count_publishers(common.PROPOSED) >= 1, 5.0)
    spin_for(graph.executor, 0.3)
    swapped = list(CHANNELS)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    for names, values in ((swapped, [0.1] * 8), (CHANNELS, [math.nan] + [0.1] * 7),
                          (CHANNELS, [0.1] * 8)):
        probe.obs_pub.publish(common.joint_state(names, values, probe.now_ns()))
        spin_for(graph.executor, 0.2)
    # Only the well-formed observation got a proposal; the other two were refused and counted.
    assert len(probe.msgs[common.PROPOSED]) == 1 and controller.refused == 2


@pytest.mark.parametrize('sim', [
    {'mode': 'lockstep', 'rate_hz': 100.0},    # paced lock-step: at most 100 observations/s
    {'mode': 'realtime', 'rate_hz': 50.0},     # fixed rate, zero-order hold
])
def test_timing_modes(bundles, tmp_path, loop, sim):
    nodes = loop_params(bundles, tmp_path, sim={'episodes': 1, 'horizon': 25, **sim})
    start = time.monotonic()
    graph, _ = loop.run(nodes, timeout=30.0)
    elapsed = time.monotonic() - start
    node = graph.nodes[SIM]
    assert elapsed >= 24 / sim['rate_hz']          # the rate bounds the pace
    data = recorded(tmp_path / 'rec' / 'run')
    assert data['observations'].shape[0] == 25
    assert validate_file(tmp_path / 'rec' / 'run' / 'recording.hdf5') == []
    if sim['mode'] == 'lockstep':
        assert not missed(data).any() and node.latency.summary()['count'] == 25
    else:
        # zero-order hold: each step applies the latest command received within
        # command_timeout (the first step may come before any command: a miss). Whether that
        # command answers the latest observation or the one before depends on the machine's
        # speed (a loaded 2-core machine answered none within its 20 ms period), so the count
        # of exact answers is the benchmark's business (bench/bench_ros_latency.py), not a test's.
        held = ~missed(data)
        assert held.sum() >= 17 and not missed(data)[1:].all(), missed(data)
        assert np.abs(data['actions'][held]).sum(axis=1).min() > 0    # the policy's, not the stop
