"""launch_pytest: launch/sim.launch.py brings the loop up, runs episodes, records them."""

import os
from pathlib import Path
import threading
import time

import pytest

launch_pytest = pytest.importorskip(
    'launch_pytest', reason='launch_pytest is not installed (needs a ROS 2 distro)')

import launch  # noqa: E402, I100
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402, I100
import rclpy  # noqa: E402, I100
from rclpy.node import Node  # noqa: E402, I100
from sensor_msgs.msg import JointState  # noqa: E402, I100

from offline_training.data.dataset import validate_file  # noqa: E402, I100
from saferl_ros.nodes import common  # noqa: E402, I100
from test_ros_support import build_bundle, domain_fixture  # noqa: E402, I100

ros_domain = domain_fixture(71)
# A launch that cannot start (e.g. the package is not visible to ament_index after a plain
# `pip install -e .`: use `colcon build`) must fail within minutes, not hang for pytest-timeout.
pytestmark = pytest.mark.timeout(150)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('launch_sim')
    return {'bundle': build_bundle(root / 'bundle'), 'out': str(root / 'rec')}


@launch_pytest.fixture(scope='module')
def launch_description(workdir):
    include = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(REPO / 'launch' / 'sim.launch.py')),
        launch_arguments={'config': str(REPO / 'config' / 'sim.yaml'),
                          'bundle': workdir['bundle'], 'episodes': '2',
                          'output_dir': workdir['out']}.items())
    return launch.LaunchDescription([include, launch_pytest.actions.ReadyToTest()])


@pytest.mark.launch(fixture=launch_description)
def test_sim_launch_closes_the_loop(workdir):
    rclpy.init()
    node = Node('launch_probe')
    finals, observations = [], []
    node.create_subscription(JointState, common.FINAL, finals.append, common.COMMAND_QOS)
    node.create_subscription(JointState, common.OBSERVATION, observations.append,
                             common.SENSOR_QOS)
    thread = threading.Thread(target=rclpy.spin, args=(node,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(finals) < 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(finals) >= 50, 'the launched loop published no commands'
        stamps = {common.stamp_to_ns(m.header.stamp) for m in observations}
        answered = [common.stamp_to_ns(m.header.stamp) in stamps for m in finals[-20:]]
        assert sum(answered) >= 15
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    yield
    # after shutdown: the recorder consolidated its run into a valid DSRL file
    runs = sorted(Path(workdir['out']).glob('run_*'))
    assert runs, f'no run folder in {workdir["out"]}'
    episodes = sorted((runs[-1] / 'episodes').glob('*.hdf5'))
    assert len(episodes) >= 1
    for file in episodes:
        assert validate_file(file) == []
    assert os.path.isfile(runs[-1] / 'index.json')
