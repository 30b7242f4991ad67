"""launch_pytest: launch/robot.launch.py with a stand-in simulator drives cmd_vel safely."""

import math

import pytest

launch_pytest = pytest.importorskip(
    'launch_pytest', reason='launch_pytest is not installed (needs a ROS 2 distro)')

from geometry_msgs.msg import Twist  # noqa: E402, I100
from launch_support import loop_fixtures, probe, wait_for  # noqa: E402, I100
from saferl_ros.nodes import common  # noqa: E402, I100
from sensor_msgs.msg import JointState  # noqa: E402, I100
from test_ros_support import domain_fixture  # noqa: E402, I100

ros_domain = domain_fixture(72)
# A launch that cannot start must fail within minutes, not hang for pytest-timeout.
pytestmark = pytest.mark.timeout(150)
workdir, launch_description = loop_fixtures('launch_robot', 'robot.launch.py', 'robot.yaml',
                                            sim='true')


@pytest.mark.launch(fixture=launch_description)
def test_robot_launch_commands_within_limits(workdir):
    with probe('launch_robot_probe', [(Twist, 'cmd_vel', common.COMMAND_QOS),
                                      (JointState, common.OBSERVATION, common.SENSOR_QOS)]) as (
            twists, observations):
        assert wait_for(lambda: len(observations) >= 100), \
            'the robot adapter published no observations'
        assert list(observations[-1].name)[:2] == ['x', 'y']
        assert twists and max(math.hypot(t.linear.x, t.linear.y) for t in twists) <= 0.3 + 1e-9
