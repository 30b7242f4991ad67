"""
Lifecycle hygiene, judged by what each node publishes.

Every node goes configure -> cleanup -> configure (one output per input afterwards, not two) and
deactivate -> activate (nothing while inactive except the deliberate safe stop; one output per
input again after reactivation).
"""

from contextlib import contextmanager
import json
import math
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import TwistStamped
from nav_msgs.msg import Odometry
import numpy as np
import pytest
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from saferl_interfaces.msg import MonitorVerdict, StepRecord
from saferl_ros import graph
from saferl_ros.bringup import Graph
from saferl_ros.monitor import MonitorState, Verdict
from saferl_ros.nodes import common
from saferl_ros.nodes.recorder_node import read_mcap
from saferl_ros.nodes.records import step_msg, Transition, verdict_msg
from saferl_ros.observation import channel_names
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from test_ros_support import domain_fixture, recorded, spin_for, spin_until

ros_domain = domain_fixture(66)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = str(REPO / 'models' / 'fisor-ballcircle')
CHANNELS = channel_names('BallCircle')
SUCCESS = TransitionCallbackReturn.SUCCESS
QUIET = 0.4      # how long "nothing more arrives" is watched [s]


class Probe(Node):
    """Publishes a node's inputs and keeps every message of its outputs."""

    def __init__(self, outputs):
        super().__init__('lifecycle_probe')
        self.msgs = {topic: [] for topic, _, _ in outputs}
        for topic, cls, qos in outputs:
            self.create_subscription(cls, topic, lambda m, t=topic: self.msgs[t].append(m), qos)
        self.pubs = {}

    def publisher(self, cls, topic, qos):
        if topic not in self.pubs:
            self.pubs[topic] = self.create_publisher(cls, topic, qos)
        return self.pubs[topic]

    def now_ns(self) -> int:
        return self.get_clock().now().nanoseconds


@contextmanager
def one_node(name, params, outputs):
    """Yield (graph, node, probe): node ``name`` alone in a graph, plus a probe."""
    nodes = Graph({name: params})
    probe = Probe(outputs)
    nodes.executor.add_node(probe)
    try:
        yield nodes, nodes.nodes[name], probe
    finally:
        nodes.executor.remove_node(probe)
        probe.destroy_node()
        nodes.shutdown()


def configure_cleanup_configure(node):
    assert node.trigger_configure() == SUCCESS
    assert node.trigger_cleanup() == SUCCESS
    assert node.trigger_configure() == SUCCESS


def new(probe, topic, since):
    return probe.msgs[topic][since:]


def settle(nodes, probe, topic, since, count, timeout=5.0):
    """Spin until ``count`` new messages arrived on ``topic``, then QUIET more; return them."""
    assert spin_until(nodes.executor, lambda: len(new(probe, topic, since)) >= count, timeout), \
        f'{topic}: {len(new(probe, topic, since))} of {count} messages'
    spin_for(nodes.executor, QUIET)
    return new(probe, topic, since)


def quiet(nodes, probe, topics, seconds=QUIET * 2):
    """Spin ``seconds`` and return how many messages arrived on ``topics`` meanwhile."""
    before = {t: len(probe.msgs[t]) for t in topics}
    spin_for(nodes.executor, seconds)
    return {t: len(probe.msgs[t]) - before[t] for t in topics}


def test_controller_proposes_once_per_observation_and_never_while_inactive():
    outputs = [(common.PROPOSED, JointState, common.RECORD_QOS)]
    with one_node(graph.CONTROLLER, {'bundle': BUNDLE, 'diagnostics_period': 0.0},
                  outputs) as (nodes, node, probe):
        configure_cleanup_configure(node)
        obs_pub = probe.publisher(JointState, common.OBSERVATION, common.SENSOR_QOS)

        def observe():
            since = len(probe.msgs[common.PROPOSED])
            stamp = probe.now_ns()
            obs_pub.publish(common.joint_state(CHANNELS, [0.1] * 8, stamp))
            return since, stamp

        assert node.trigger_activate() == SUCCESS
        assert spin_until(nodes.executor, lambda: probe.count_subscribers(common.OBSERVATION)
                          >= 1 and probe.count_publishers(common.PROPOSED) >= 1, 5.0)
        spin_for(nodes.executor, 0.3)
        for cycle in range(2):
            since, stamp = observe()
            got = settle(nodes, probe, common.PROPOSED, since, 1)
            assert [common.stamp_to_ns(m.header.stamp) for m in got] == [stamp], cycle
            assert node.trigger_deactivate() == SUCCESS
            since, _ = observe()
            assert quiet(nodes, probe, [common.PROPOSED]) == {common.PROPOSED: 0}
            assert node.trigger_activate() == SUCCESS
        # one subscription after the reconfigure, not two
        assert probe.count_subscribers(common.OBSERVATION) == 1


def test_monitor_answers_once_stops_once_on_deactivate_and_is_silent_while_inactive():
    outputs = [(common.FINAL, JointState, common.RECORD_QOS),
               (common.STATUS, DiagnosticStatus, common.STATUS_QOS)]
    # Timeouts far above the test's pauses: no watchdog stop among the counted answers.
    params = {'bundle': BUNDLE, 'observation_timeout': 5.0, 'proposal_timeout': 5.0,
              'safe_action': [0.0, 0.0], 'diagnostics_period': 0.0}
    with one_node(graph.MONITOR, params, outputs) as (nodes, node, probe):
        configure_cleanup_configure(node)
        # configured, inactive: the latched status says so (published while inactive)
        assert spin_until(nodes.executor, lambda: probe.msgs[common.STATUS], 5.0)
        assert probe.msgs[common.STATUS][-1].message == 'INACTIVE'
        obs_pub = probe.publisher(JointState, common.OBSERVATION, common.SENSOR_QOS)
        prop_pub = probe.publisher(JointState, common.PROPOSED, common.COMMAND_QOS)

        def exchange():
            since = len(probe.msgs[common.FINAL])
            stamp = probe.now_ns()
            obs_pub.publish(common.joint_state(CHANNELS, [0.1] * 8, stamp))
            spin_for(nodes.executor, 0.1)
            prop_pub.publish(common.joint_state(['action_0', 'action_1'], [0.0, 0.0], stamp))
            return since, stamp

        assert node.trigger_activate() == SUCCESS
        assert spin_until(nodes.executor, lambda: probe.count_subscribers(common.PROPOSED) >= 1
                          and probe.count_publishers(common.FINAL) >= 1, 5.0)
        spin_for(nodes.executor, 0.3)
        for cycle in range(2):
            since, stamp = exchange()
            got = settle(nodes, probe, common.FINAL, since, 1)
            assert [common.stamp_to_ns(m.header.stamp) for m in got] == [stamp], cycle
            since = len(probe.msgs[common.FINAL])
            assert node.trigger_deactivate() == SUCCESS
            stop = settle(nodes, probe, common.FINAL, since, 1)   # the deliberate safe stop
            assert len(stop) == 1 and list(stop[0].position) == [0.0, 0.0]
            assert probe.msgs[common.STATUS][-1].message == 'INACTIVE'
            exchange()
            assert quiet(nodes, probe, [common.FINAL]) == {common.FINAL: 0}
            assert node.trigger_activate() == SUCCESS
        assert probe.count_subscribers(common.PROPOSED) == 1


def test_sim_steps_once_per_command_and_stands_still_while_inactive():
    outputs = [(common.OBSERVATION, JointState, common.SENSOR_QOS),
               (common.STEP, StepRecord, common.RECORD_QOS),
               (common.EPISODE, String, common.RECORD_QOS)]
    params = {'task': 'BallCircle', 'min_subscribers': 1, 'command_timeout': 30.0,
              'publish_clock': False, 'publish_odometry': False}
    with one_node(graph.SIM, params, outputs) as (nodes, node, probe):
        configure_cleanup_configure(node)
        final_pub = probe.publisher(JointState, common.FINAL, common.COMMAND_QOS)
        assert spin_until(nodes.executor, lambda: probe.count_publishers(common.FINAL) >= 1
                          and probe.count_subscribers(common.FINAL) >= 1, 5.0)

        def command(observation):
            final_pub.publish(common.joint_state(['action_0', 'action_1'], [0.2, 0.0],
                                                 common.stamp_to_ns(observation.header.stamp)))

        for cycle in range(2):
            since = {t: len(probe.msgs[t]) for t in probe.msgs}
            assert node.trigger_activate() == SUCCESS
            first = settle(nodes, probe, common.OBSERVATION, since[common.OBSERVATION], 1)
            assert len(first) == 1, cycle                  # waits for its command
            starts = [json.loads(m.data) for m in new(probe, common.EPISODE,
                                                      since[common.EPISODE])]
            assert [e['event'] for e in starts] == ['start'], cycle
            command(first[0])
            steps = settle(nodes, probe, common.STEP, since[common.STEP], 1)
            assert len(steps) == 1, cycle
            # the transition from the first observation, with the commanded action applied
            assert steps[0].header.stamp == first[0].header.stamp and steps[0].step == 1
            assert list(steps[0].action) == pytest.approx([0.2, 0.0])
            assert len(new(probe, common.OBSERVATION, since[common.OBSERVATION])) == 2
            assert node.trigger_deactivate() == SUCCESS
            command(probe.msgs[common.OBSERVATION][-1])    # answers the pending observation
            assert quiet(nodes, probe, list(probe.msgs)) == dict.fromkeys(probe.msgs, 0)
        assert probe.count_subscribers(common.FINAL) == 1


def _step_message(episode: int, step: int, truncated: bool, stamp: int, names=CHANNELS,
                  action=(0.0, 0.0)) -> StepRecord:
    return step_msg(Transition(stamp_ns=stamp, task='BallCircle', episode=episode, step=step,
                               reward=1.0, cost=0.0, terminated=False, truncated=truncated,
                               missed=False, observation_names=names,
                               observation=[0.1] * 8, next_observation=[0.1] * 8,
                               action=list(action)))


def test_recorder_writes_each_step_once_and_nothing_while_inactive(tmp_path):
    params = {'task': 'BallCircle', 'output_dir': str(tmp_path), 'join_timeout': 0.05,
              'mcap': True}
    with one_node(graph.RECORDER, params, []) as (nodes, node, probe):
        configure_cleanup_configure(node)
        step_pub = probe.publisher(StepRecord, common.STEP, common.RECORD_QOS)
        assert spin_until(nodes.executor, lambda: probe.count_subscribers(common.STEP) >= 1,
                          5.0)
        lengths = (3, 4)
        for length in lengths:
            assert node.trigger_activate() == SUCCESS
            spin_for(nodes.executor, 0.2)
            for k in range(length):
                step_pub.publish(_step_message(0, k + 1, k == length - 1, probe.now_ns()))
                spin_for(nodes.executor, 0.05)
            spin_for(nodes.executor, 0.5)
            assert node.trigger_deactivate() == SUCCESS
            for k in range(2):        # inactive: not recorded anywhere
                step_pub.publish(_step_message(1, k + 1, k == 1, probe.now_ns()))
            spin_for(nodes.executor, 0.5)
        assert probe.count_subscribers(common.STEP) == 1   # one subscription feeds both formats
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run, length in zip(runs, lengths):
        data = recorded(run)
        assert data['observations'].shape == (length, 8), run
        assert data['timeouts'].sum() == 1
        raw = read_mcap(run / 'raw' / 'episode_000000.mcap')
        assert [m.step for m in raw['/step']] == list(range(1, length + 1)), run


def test_recorder_joins_verdicts_and_refuses_steps_of_other_channels(tmp_path):
    params = {'task': 'BallCircle', 'output_dir': str(tmp_path), 'run_name': 'run',
              'join_timeout': 0.5}
    with one_node(graph.RECORDER, params, []) as (nodes, node, probe):
        assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
        step_pub = probe.publisher(StepRecord, common.STEP, common.RECORD_QOS)
        verdict_pub = probe.publisher(MonitorVerdict, common.VERDICT, common.RECORD_QOS)
        assert spin_until(nodes.executor, lambda: probe.count_subscribers(common.STEP) >= 1
                          and probe.count_subscribers(common.VERDICT) >= 1, 5.0)
        spin_for(nodes.executor, 0.2)
        swapped = [CHANNELS[1], CHANNELS[0]] + CHANNELS[2:]
        stamps = [probe.now_ns() + k for k in range(5)]
        steps = [_step_message(0, 1, False, stamps[0]),
                 _step_message(0, 2, False, stamps[1], names=swapped),         # refused
                 _step_message(0, 2, False, stamps[2], action=(0.0, 0.0, 0.0)),  # refused
                 _step_message(0, 2, False, stamps[3], action=(0.5, 0.5)),
                 _step_message(0, 3, True, stamps[4])]
        judged = Verdict(MonitorState.INTERVENING, np.array([0.5, 0.5]), np.array([0.9, -0.9]),
                         0.0, 'proposal infeasible', v_h=-1.0, q_h=0.5, q_c=math.nan,
                         risk_final=-0.2, replaced=True)
        verdict_pub.publish(verdict_msg(judged, stamps[3]))
        for msg in steps:
            step_pub.publish(msg)
            spin_for(nodes.executor, 0.05)
        spin_for(nodes.executor, 1.0)
        assert node.trigger_deactivate() == SUCCESS
    data = recorded(tmp_path / 'run')
    assert data['observations'].shape == (3, 8) and data['stamps_ns'].tolist() == [
        stamps[0], stamps[3], stamps[4]]
    # the step with a verdict carries it; the others were written without one
    assert data['verdicts'].tolist() == [-1, int(MonitorState.INTERVENING), -1]
    np.testing.assert_allclose(data['proposed_actions'][1], [0.9, -0.9])
    np.testing.assert_allclose(data['actions'][1], [0.5, 0.5])
    assert data['replaced'].tolist() == [False, True, False]
    assert data['critic_q_h'][1] == 0.5 and data['critic_risk_final'][1] == pytest.approx(-0.2)


def _transition(episode, step, stamp, obs, reward=1.0, cost=0.0, terminated=False,
                truncated=False) -> StepRecord:
    """Return a BallCircle step whose next observation is ``obs + 0.01`` (continuous)."""
    obs = np.asarray(obs, np.float64)
    return step_msg(Transition(stamp_ns=stamp, task='BallCircle', episode=episode, step=step,
                               reward=reward, cost=cost, terminated=terminated,
                               truncated=truncated, missed=False, observation_names=CHANNELS,
                               observation=obs, next_observation=obs + 0.01,
                               action=[0.5, -0.5]))


def _activate_recorder(nodes, node, probe):
    """Configure and activate the recorder under test; return a publisher of its step topic."""
    step_pub = probe.publisher(StepRecord, common.STEP, common.RECORD_QOS)
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
    assert spin_until(nodes.executor, lambda: probe.count_subscribers(common.STEP) >= 1, 5.0)
    spin_for(nodes.executor, 0.2)
    return step_pub


def test_recorder_refuses_a_run_folder_in_use_before_the_first_step(tmp_path, capfd):
    """
    Refuse a run folder in use at configure and activate, in one line each (review 14).

    With run_name naming an existing run, configure and activate succeeded and the first step
    raised RecordingError inside the subscription callback (traceback, run lost).
    """
    from saferl_ros.recorder import RecordingWriter
    RecordingWriter(tmp_path / 'taken', 'BallCircle', 8, 2).close()
    params = {'task': 'BallCircle', 'output_dir': str(tmp_path), 'run_name': 'taken',
              'join_timeout': 0.0}
    with one_node(graph.RECORDER, params, []) as (nodes, node, probe):
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert f'run folder {tmp_path}/taken already exists' in node.last_error
        assert 'set run_name to a new name' in node.last_error
    # activate refuses it too: a folder taken after configure, or a second activation
    params['run_name'] = 'run'
    with one_node(graph.RECORDER, params, []) as (nodes, node, probe):
        step_pub = _activate_recorder(nodes, node, probe)
        step_pub.publish(_transition(0, 1, 1000, [0.1] * 8, truncated=True))
        assert spin_until(nodes.executor, lambda: node.received == 1, 5.0)
        assert node.trigger_deactivate() == SUCCESS          # closes tmp_path/run
        assert node.trigger_activate() == TransitionCallbackReturn.FAILURE
        assert f'run folder {tmp_path}/run already exists' in node.last_error
        assert not node.active
        step_pub.publish(_transition(1, 1, 2000, [0.2] * 8, truncated=True))
        spin_for(nodes.executor, 0.5)      # a step now neither raises nor reaches the old run
        assert node.received == 1
    data = recorded(tmp_path / 'run')
    assert data['stamps_ns'].tolist() == [1000]
    err = capfd.readouterr().err
    assert 'Traceback' not in err and 'RecordingError' not in err
    lines = [line for line in err.splitlines() if 'already exists' in line]
    assert len(lines) == 2, err        # configure's line and activate's, one each
    assert 'configure failed' in lines[0] and 'activate failed' in lines[1]


@pytest.mark.parametrize('where', ['a file', '/proc'])
def test_recorder_refuses_an_output_folder_it_cannot_write_at_configure(tmp_path, where):
    """
    An output_dir that cannot be written fails configure, before anything moves.

    It was accepted, and every step of the run was then refused in a log line (the run lost,
    saferl-bringup exiting 0). /proc: root's permission bits say writable, the write fails.
    """
    if where == 'a file':
        (tmp_path / 'taken').write_text('not a folder')
        output_dir, fragment = tmp_path / 'taken' / 'rec', 'Not a directory'
    else:
        output_dir, fragment = Path('/proc/saferl_no_such_folder'), 'cannot be written'
    params = {'task': 'BallCircle', 'output_dir': str(output_dir), 'run_name': ''}
    with one_node(graph.RECORDER, params, []) as (nodes, node, probe):
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert f'output_dir {output_dir}' in node.last_error, node.last_error
        assert fragment in node.last_error and 'set output_dir to a folder you can write to' \
            in node.last_error, node.last_error


def test_recorder_drops_non_finite_steps_and_the_run_stays_valid(tmp_path):
    """Review 14: a NaN/Inf step was written, and the whole run then failed merge."""
    from offline_training.data.dataset import validate_file
    from saferl_ros.recorder import read_index
    params = {'task': 'BallCircle', 'output_dir': str(tmp_path), 'run_name': 'run',
              'join_timeout': 0.0}
    nan_obs = [math.nan] + [0.0] * 7
    with one_node(graph.RECORDER, params, []) as (nodes, node, probe):
        step_pub = _activate_recorder(nodes, node, probe)
        sent = [
            # episode 0: step 3 holds a NaN observation and an infinite reward
            _transition(0, 1, 101, [0.10] * 8), _transition(0, 2, 102, [0.11] * 8),
            _transition(0, 3, 103, nan_obs, reward=math.inf),
            _transition(0, 4, 104, [0.13] * 8), _transition(0, 5, 105, [0.14] * 8,
                                                            truncated=True),
            # episode 1: its terminal step has a NaN cost
            _transition(1, 1, 201, [0.20] * 8), _transition(1, 2, 202, [0.21] * 8,
                                                            cost=math.nan, terminated=True),
            _transition(2, 1, 301, [0.30] * 8), _transition(2, 2, 302, [0.31] * 8,
                                                            truncated=True)]
        for msg in sent:
            step_pub.publish(msg)
            spin_for(nodes.executor, 0.03)
        assert spin_until(nodes.executor, lambda: node.received == len(sent), 5.0)
        spin_for(nodes.executor, 0.2)
        assert node.trigger_deactivate() == SUCCESS
        dropped = getattr(node, 'dropped_non_finite', None)
    run = tmp_path / 'run'
    data = recorded(run)
    assert data['stamps_ns'].tolist() == [101, 102, 104, 105, 201, 301, 302]
    for key in ('observations', 'next_observations', 'actions', 'rewards', 'costs'):
        assert np.isfinite(data[key]).all(), key
    # each dropped step cuts its episode: the pieces stay continuous, the cut ones truncated
    episodes = read_index(run)['episodes']
    assert [e['steps'] for e in episodes] == [2, 2, 1, 2]
    assert [e.get('cut') for e in episodes] == ['non-finite', None, 'non-finite', None]
    assert episodes[0]['non_finite'] == ['observation', 'next_observation', 'reward']
    assert episodes[2]['non_finite'] == ['cost']
    assert data['terminals'].sum() == 0 and data['timeouts'].sum() == 4
    assert validate_file(run / 'recording.hdf5') == []
    for entry in episodes:
        assert validate_file(run / entry['file']) == [], entry
    assert dropped == 2          # counted by the node (and in the log line closing the run)


def test_robot_adapter_answers_once_and_sends_only_its_safe_stop_while_inactive():
    outputs = [(common.OBSERVATION, JointState, common.SENSOR_QOS),
               (common.STEP, StepRecord, common.RECORD_QOS),
               ('cmd_vel', TwistStamped, common.RECORD_QOS)]
    # The watchdog would send a zero command 20 times a second while active (no final action
    # within command_timeout): a node that kept doing so while inactive would show. Stamped
    # commands tell the deactivate's zero from the watchdog's last ones still in flight.
    params = {'task': 'BallCircle', 'command_timeout': 0.2, 'watchdog_rate_hz': 20.0,
              'twist_stamped': True, 'estop_at_start': False, 'odometry_timeout': 5.0}
    with one_node(graph.ROBOT_ADAPTER, params, outputs) as (nodes, node, probe):
        configure_cleanup_configure(node)
        odom_pub = probe.publisher(Odometry, 'odom', common.SENSOR_QOS)
        final_pub = probe.publisher(JointState, common.FINAL, common.COMMAND_QOS)
        assert spin_until(nodes.executor, lambda: probe.count_subscribers('odom') >= 1
                          and probe.count_publishers(common.OBSERVATION) >= 1, 5.0)

        def odometry(x):
            msg = Odometry()
            msg.header.stamp = common.ns_to_stamp(probe.now_ns())
            msg.pose.pose.position.x = x
            msg.pose.pose.orientation.w = 1.0
            odom_pub.publish(msg)

        def moving(since):
            return [m for m in new(probe, 'cmd_vel', since)
                    if (m.twist.linear.x, m.twist.linear.y, m.twist.angular.z) != (0, 0, 0)]

        for cycle in range(2):
            since = {t: len(probe.msgs[t]) for t in probe.msgs}
            assert node.trigger_activate() == SUCCESS
            # activation holds the robot: zero commands, nothing else moves it
            settle(nodes, probe, 'cmd_vel', since['cmd_vel'], 1)
            assert not moving(since['cmd_vel'])
            odometry(0.0)
            assert len(settle(nodes, probe, common.OBSERVATION, since[common.OBSERVATION],
                              1)) == 1, cycle
            odometry(0.1)
            assert len(settle(nodes, probe, common.OBSERVATION, since[common.OBSERVATION],
                              2)) == 2, cycle
            assert len(new(probe, common.STEP, since[common.STEP])) == 1, cycle
            final_pub.publish(common.joint_state(['action_0', 'action_1'], [0.5, 0.0],
                                                 probe.now_ns()))
            assert spin_until(nodes.executor, lambda: moving(since['cmd_vel']), 3.0)
            spin_for(nodes.executor, QUIET)
            assert len(moving(since['cmd_vel'])) == 1, cycle
            since_stop, deactivated = len(probe.msgs['cmd_vel']), node.get_clock().now()
            assert node.trigger_deactivate() == SUCCESS
            settle(nodes, probe, 'cmd_vel', since_stop, 1)
            stop = [m for m in new(probe, 'cmd_vel', since_stop)
                    if common.stamp_to_ns(m.header.stamp) >= deactivated.nanoseconds]
            assert len(stop) == 1 and not moving(since_stop)     # the deliberate zero command
            odometry(0.2)
            final_pub.publish(common.joint_state(['action_0', 'action_1'], [0.5, 0.0],
                                                 probe.now_ns()))
            assert quiet(nodes, probe, list(probe.msgs)) == dict.fromkeys(probe.msgs, 0)
        assert probe.count_subscribers('odom') == 1


def test_robot_adapter_keeps_an_engaged_estop_across_cleanup_and_configure():
    """Only an explicit release clears the e-stop: a cleanup and configure does not."""
    from std_srvs.srv import SetBool
    params = {'task': 'BallCircle', 'estop_at_start': False}
    with one_node(graph.ROBOT_ADAPTER, params, []) as (nodes, node, probe):
        assert node.trigger_configure() == SUCCESS
        assert not node.guard.engaged
        response = node._on_estop_service(SetBool.Request(data=True), SetBool.Response())
        assert response.success and node.guard.engaged
        assert node.trigger_cleanup() == SUCCESS
        assert node.trigger_configure() == SUCCESS
        assert node.guard.engaged and node.guard.estops == {
            'service /robot_adapter_node/set_estop'}
        node._on_estop_service(SetBool.Request(data=False), SetBool.Response())
        assert not node.guard.engaged
        assert node.trigger_cleanup() == SUCCESS
        assert node.trigger_configure() == SUCCESS
        assert not node.guard.engaged


@pytest.mark.parametrize('name', graph.START_ORDER)
def test_configure_cleanup_configure_restores_the_same_entities(name, tmp_path):
    params = {
        graph.SIM: {'task': 'BallCircle', 'min_subscribers': 5},   # configured, never stepping
        graph.CONTROLLER: {'bundle': BUNDLE},
        graph.MONITOR: {'bundle': BUNDLE},
        graph.RECORDER: {'task': 'BallCircle', 'output_dir': str(tmp_path), 'mcap': True},
        graph.ROBOT_ADAPTER: {'task': 'BallCircle'},
        graph.UNICYCLE: {},
    }[name]

    def entities(node):
        # the monitor's fallback worker thread pool too: created by configure, gone at cleanup
        return (len(list(node.publishers)), len(list(node.subscriptions)),
                len(list(node.timers)), getattr(node, 'worker', None) is not None)

    with one_node(name, params, []) as (_, node, _probe):
        bare = entities(node)
        assert node.trigger_configure() == SUCCESS
        configured = entities(node)
        assert configured != bare, f'{name} created nothing at configure'
        assert node.trigger_cleanup() == SUCCESS
        assert entities(node) == bare, f'{name}: cleanup left {entities(node)} of {bare}'
        assert node.trigger_configure() == SUCCESS
        assert entities(node) == configured, f'{name}: reconfigure doubled its entities'
        for _ in range(2):
            assert node.trigger_activate() == SUCCESS
            assert node.trigger_deactivate() == SUCCESS
        assert entities(node) == configured, f'{name}: activation cycles leaked entities'
