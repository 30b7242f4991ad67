"""flake8 with ament's configuration (ament_flake8), as every ROS 2 Python package runs it."""

import gc

from ament_flake8.main import main_with_errors
import pytest


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    # flake8 forks its workers: garbage left by earlier in-process ROS tests (rclpy handles in
    # unreachable cycles) must be freed here, not by a worker's collector (which segfaults and
    # is replaced forever: the test hangs).
    gc.collect()
    rc, errors = main_with_errors(argv=[])
    assert rc == 0, 'Found %d code style errors / warnings:\n' % len(errors) + '\n'.join(errors)
