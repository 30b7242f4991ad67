"""launch_pytest: launch/sim.launch.py brings the loop up, runs episodes, records them."""

import os
from pathlib import Path

import pytest

launch_pytest = pytest.importorskip(
    'launch_pytest', reason='launch_pytest is not installed (needs a ROS 2 distro)')

from launch_support import loop_fixtures, probe, wait_for  # noqa: E402, I100
from offline_training.data.dataset import validate_file  # noqa: E402, I100
from saferl_ros.nodes import common  # noqa: E402, I100
from sensor_msgs.msg import JointState  # noqa: E402, I100
from test_ros_support import domain_fixture  # noqa: E402, I100

ros_domain = domain_fixture(71)
# A launch that cannot start (e.g. the package is not visible to ament_index after a plain
# `pip install -e .`: use `colcon build`) must fail within minutes, not hang for pytest-timeout.
pytestmark = pytest.mark.timeout(150)
workdir, launch_description = loop_fixtures('launch_sim', 'sim.launch.py', 'sim.yaml',
                                            episodes='2')


@pytest.mark.launch(fixture=launch_description)
def test_sim_launch_closes_the_loop(workdir):
    with probe('launch_probe', [(JointState, common.FINAL, common.COMMAND_QOS),
                                (JointState, common.OBSERVATION, common.SENSOR_QOS)]) as (
            finals, observations):
        assert wait_for(lambda: len(finals) >= 50), 'the launched loop published no commands'
        stamps = {common.stamp_to_ns(m.header.stamp) for m in observations}
        answered = [common.stamp_to_ns(m.header.stamp) in stamps for m in finals[-20:]]
        assert sum(answered) >= 15
    yield
    # after shutdown: the recorder consolidated its run into a valid DSRL file
    runs = sorted(Path(workdir['out']).glob('run_*'))
    assert runs, f'no run folder in {workdir["out"]}'
    episodes = sorted((runs[-1] / 'episodes').glob('*.hdf5'))
    assert len(episodes) >= 1
    for file in episodes:
        assert validate_file(file) == []
    assert os.path.isfile(runs[-1] / 'index.json')
