"""
Shared pieces of the launch_pytest tests (test_launch_*.py).

They need the ROS 2 launch tools (launch, launch_ros, launch_pytest), which come with a ROS 2
distribution, not from the package registries; each test module skips without them before it
imports this one.
"""

from contextlib import contextmanager
from pathlib import Path
import threading
import time
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import launch
from launch.launch_description_sources import PythonLaunchDescriptionSource
import launch_pytest
import pytest
import rclpy
from rclpy.node import Node
from test_ros_support import build_bundle

REPO = Path(__file__).resolve().parents[1]


def loop_fixtures(name: str, launch_file: str, config: str, **arguments: str):
    """
    Return the module fixtures (workdir, launch_description) of one launch file.

    ``workdir`` holds a freshly exported test bundle and the recording folder;
    ``launch_description`` includes ``launch/<launch_file>`` with ``config/<config>``, that
    bundle, that folder and ``arguments``.
    """
    @pytest.fixture(scope='module')
    def workdir(tmp_path_factory) -> Dict[str, str]:
        root = tmp_path_factory.mktemp(name)
        return {'bundle': build_bundle(root / 'bundle'), 'out': str(root / 'rec')}

    @launch_pytest.fixture(scope='module')
    def launch_description(workdir):
        include = launch.actions.IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(REPO / 'launch' / launch_file)),
            launch_arguments={'config': str(REPO / 'config' / config),
                              'bundle': workdir['bundle'], 'output_dir': workdir['out'],
                              **arguments}.items())
        return launch.LaunchDescription([include, launch_pytest.actions.ReadyToTest()])

    return workdir, launch_description


@contextmanager
def probe(name: str, topics: Sequence[Tuple[type, str, object]]) -> Iterator[List[list]]:
    """Spin a node ``name`` subscribed to each (type, topic, qos); yield one list per topic."""
    rclpy.init()
    node = Node(name)
    received: List[list] = [[] for _ in topics]
    for (msg_type, topic, qos), into in zip(topics, received):
        node.create_subscription(msg_type, topic, into.append, qos)
    threading.Thread(target=rclpy.spin, args=(node,), daemon=True).start()
    try:
        yield received
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll ``condition`` every 0.1 s until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()
