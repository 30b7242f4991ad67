"""Lifecycle hygiene: configure/cleanup/configure and deactivate/activate leave no trace."""

from pathlib import Path

from lifecycle_msgs.msg import State
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from saferl_ros.bringup import Graph
from saferl_ros.nodes import common
from saferl_ros.observation import channel_names
from sensor_msgs.msg import JointState
from test_ros_support import domain_fixture, spin_for, spin_until

ros_domain = domain_fixture(66)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = str(REPO / 'models' / 'fisor-ballcircle')


def node_params(tmp_path):
    return {
        'sim_node': {'task': 'BallCircle', 'min_subscribers': 5},   # configured, never stepping
        'controller_node': {'bundle': BUNDLE},
        'safety_monitor_node': {'bundle': BUNDLE},
        'recorder_node': {'task': 'BallCircle', 'output_dir': str(tmp_path), 'mcap': True},
        'robot_adapter_node': {'task': 'BallCircle'},
    }


def entities(node):
    return (len(list(node.publishers)), len(list(node.subscriptions)), len(list(node.timers)))


def state(node):
    return node._state_machine.current_state[0]


def test_every_node_survives_configure_cleanup_configure_and_reactivation(tmp_path):
    graph = Graph(node_params(tmp_path))
    try:
        for name, node in graph.nodes.items():
            bare = entities(node)
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, name
            configured = entities(node)
            assert configured != bare, f'{name} created nothing at configure'
            assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS, name
            assert entities(node) == bare, f'{name}: cleanup left {entities(node)} of {bare}'
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, name
            assert entities(node) == configured, f'{name}: reconfigure doubled its entities'
            for _ in range(2):
                assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS, name
                assert state(node) == State.PRIMARY_STATE_ACTIVE
                assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS, name
            assert entities(node) == configured, f'{name}: activation cycles leaked entities'
    finally:
        graph.shutdown()


def test_a_reconfigured_monitor_answers_each_proposal_once(tmp_path):
    graph = Graph({'safety_monitor_node': {'bundle': BUNDLE, 'observation_timeout': 1.0,
                                           'proposal_timeout': 1.0}})
    probe = Node('lifecycle_probe')
    finals = []
    probe.create_subscription(JointState, common.FINAL, finals.append, common.RECORD_QOS)
    obs_pub = probe.create_publisher(JointState, common.OBSERVATION, common.SENSOR_QOS)
    prop_pub = probe.create_publisher(JointState, common.PROPOSED, common.COMMAND_QOS)
    graph.executor.add_node(probe)
    monitor = graph.nodes['safety_monitor_node']
    try:
        for _ in range(2):   # configure -> cleanup, then configure again
            assert monitor.trigger_configure() == TransitionCallbackReturn.SUCCESS
            if _ == 0:
                assert monitor.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert monitor.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert spin_until(graph.executor, lambda: probe.count_subscribers(common.PROPOSED) == 1
                          and probe.count_publishers(common.FINAL) == 1, 5.0)
        spin_for(graph.executor, 0.3)
        stamp = probe.get_clock().now().nanoseconds
        obs_pub.publish(common.joint_state(channel_names('BallCircle'), [0.1] * 8, stamp))
        spin_for(graph.executor, 0.1)
        prop_pub.publish(common.joint_state(['action_0', 'action_1'], [0.0, 0.0], stamp))
        spin_for(graph.executor, 0.5)
        answers = [m for m in finals if common.stamp_to_ns(m.header.stamp) == stamp]
        assert len(answers) == 1, f'{len(answers)} commands for one proposal'
        assert monitor.monitor.counters.decisions >= 1
    finally:
        graph.executor.remove_node(probe)
        probe.destroy_node()
        graph.shutdown()
