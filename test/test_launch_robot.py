"""launch_pytest: launch/robot.launch.py with a stand-in simulator drives cmd_vel safely."""

import math
from pathlib import Path
import threading
import time

import pytest

launch_pytest = pytest.importorskip(
    'launch_pytest', reason='launch_pytest is not installed (needs a ROS 2 distro)')

from geometry_msgs.msg import Twist  # noqa: E402, I100
import launch  # noqa: E402, I100
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402, I100
import rclpy  # noqa: E402, I100
from rclpy.node import Node  # noqa: E402, I100
from sensor_msgs.msg import JointState  # noqa: E402, I100

from saferl_ros.nodes import common  # noqa: E402, I100
from test_ros_support import build_bundle, domain_fixture  # noqa: E402, I100

ros_domain = domain_fixture(72)
# A launch that cannot start (e.g. the package is not visible to ament_index after a plain
# `pip install -e .`: use `colcon build`) must fail within minutes, not hang for pytest-timeout.
pytestmark = pytest.mark.timeout(150)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('launch_robot')
    return {'bundle': build_bundle(root / 'bundle'), 'out': str(root / 'rec')}


@launch_pytest.fixture(scope='module')
def launch_description(workdir):
    include = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(REPO / 'launch' / 'robot.launch.py')),
        launch_arguments={'config': str(REPO / 'config' / 'robot.yaml'),
                          'bundle': workdir['bundle'], 'output_dir': workdir['out'],
                          'sim': 'true'}.items())
    return launch.LaunchDescription([include, launch_pytest.actions.ReadyToTest()])


@pytest.mark.launch(fixture=launch_description)
def test_robot_launch_commands_within_limits(workdir):
    rclpy.init()
    node = Node('launch_robot_probe')
    twists, observations = [], []
    node.create_subscription(Twist, 'cmd_vel', twists.append, common.COMMAND_QOS)
    node.create_subscription(JointState, common.OBSERVATION, observations.append,
                             common.SENSOR_QOS)
    thread = threading.Thread(target=rclpy.spin, args=(node,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(observations) < 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(observations) >= 100, 'the robot adapter published no observations'
        assert list(observations[-1].name)[:2] == ['x', 'y']
        assert twists and max(math.hypot(t.linear.x, t.linear.y) for t in twists) <= 0.3 + 1e-9
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
