"""The robot path over DDS: odometry -> robot adapter -> controller -> monitor -> Twist."""

import math

from geometry_msgs.msg import Twist
from offline_training.data.dataset import validate_file
from rclpy.node import Node
from saferl_ros.bringup import apply_overrides, Graph, load_parameters
from saferl_ros.graph import MONITOR, RECORDER, ROBOT_ADAPTER
from saferl_ros.nodes import common
from test_ros_support import build_bundle, domain_fixture, spin_for, spin_until

ros_domain = domain_fixture(63)


def test_robot_adapter_drives_the_sim_standing_in_for_a_robot(tmp_path):
    bundle = build_bundle(tmp_path / 'bundle')
    nodes = load_parameters('config/robot_sim.yaml')
    apply_overrides(nodes, [f'controller_node.bundle={bundle}',
                            f'safety_monitor_node.bundle={bundle}',
                            f'recorder_node.output_dir={tmp_path}', 'recorder_node.run_name=r',
                            'robot_adapter_node.horizon=40', 'robot_adapter_node.max_linear=0.2',
                            'sim_node.max_linear=0.2'])
    graph = Graph(nodes)
    probe = Node('probe')
    twists = []
    probe.create_subscription(Twist, 'cmd_vel', twists.append, common.COMMAND_QOS)
    graph.executor.add_node(probe)
    try:
        assert graph.configure() == []
        graph.activate()
        recorder = graph.nodes[RECORDER]
        assert spin_until(graph.executor, lambda: recorder.writer is not None and
                          len(recorder.writer.index['episodes']) >= 2, 30.0)
        moving = [t for t in twists if t.linear.x or t.linear.y]
        assert moving, 'the policy never moved the robot'
        assert max(math.hypot(t.linear.x, t.linear.y) for t in twists) <= 0.2 + 1e-9
        # The monitor dies without a word: the adapter's own command timeout (0.3 s) sends an
        # explicit zero (the on-robot watchdog).
        graph.remove(MONITOR)
        spin_for(graph.executor, 0.8)
        last = twists[-1]
        assert (last.linear.x, last.linear.y, last.angular.z) == (0.0, 0.0, 0.0)
        assert graph.nodes[ROBOT_ADAPTER].timeouts >= 1
        graph.deactivate()
    finally:
        graph.executor.remove_node(probe)
        probe.destroy_node()
        graph.shutdown()
    out = tmp_path / 'r' / 'recording.hdf5'
    assert validate_file(out) == []
