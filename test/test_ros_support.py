"""
Helpers shared by the rclpy integration tests (and a check of the helpers themselves).

Each test module declares ``ros_domain = domain_fixture(N)`` with its own ROS_DOMAIN_ID so that
modules running in parallel (or another engineer's tests on the same machine) never see each
other's topics.
"""

from contextlib import contextmanager
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def isolated_domain(domain_id: int):
    """Use ROS_DOMAIN_ID ``domain_id`` inside the block (rclpy.init and subprocesses read it)."""
    saved = os.environ.get('ROS_DOMAIN_ID')
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    try:
        yield domain_id
    finally:
        if saved is None:
            os.environ.pop('ROS_DOMAIN_ID', None)
        else:
            os.environ['ROS_DOMAIN_ID'] = saved


def domain_fixture(domain_id: int):
    """
    Return an autouse, module-scoped fixture that runs the module in its own ROS domain.

    Set at module set-up, not at import: pytest imports every module before running any, so an
    import-time setting would leave all modules in the domain of the last one imported.
    """
    @pytest.fixture(autouse=True, scope='module')
    def ros_domain():
        with isolated_domain(domain_id):
            yield domain_id
    return ros_domain


def build_bundle(out_dir, algorithm: str = 'fisor', task: str = 'BallCircle') -> str:
    """Return a fresh make_test_bundle bundle (tiny model, a second or two on one core)."""
    import torch
    torch.set_num_threads(1)
    from offline_training.export import make_test_bundle
    return str(make_test_bundle(out_dir, task=task, algorithm=algorithm))


def tampered_copy(bundle: str, out_dir) -> str:
    """Copy a bundle and flip one byte of its policy graph (checksum no longer matches)."""
    out = Path(out_dir)
    shutil.copytree(bundle, out)
    data = bytearray((out / 'policy.onnx').read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / 'policy.onnx').write_bytes(bytes(data))
    return str(out)


def spin_until(executor, condition, timeout: float) -> bool:
    """Spin ``executor`` until ``condition()`` or ``timeout`` seconds; return condition()."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.01)
    return bool(condition())


def spin_for(executor, seconds: float) -> None:
    """Spin ``executor`` for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.01)


def start_node(executable: str, params: dict, log_path) -> subprocess.Popen:
    """Start a console-script node in its own process, configured and activated."""
    args = [executable, '--autostart', '--ros-args']
    for key, value in params.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = '[' + ','.join(repr(float(v)) for v in value) + ']'
        args += ['-p', f'{key}:={value}']
    exe = shutil.which(executable, path=os.path.dirname(sys.executable))
    cmd = [exe] + args[1:] if exe else [sys.executable, '-m',
                                        f'saferl_ros.nodes.{executable}'] + args[1:]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'PYTHONPATH': str(REPO)}
    return subprocess.Popen(cmd, stdout=open(log_path, 'w'), stderr=subprocess.STDOUT, env=env)


def stop_nodes(procs) -> None:
    """SIGINT every node process still running, then wait; kill one that ignores the signal."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(10)
        except Exception:  # a node that ignores SIGINT must not outlive the test
            proc.kill()


def recorded(run_dir) -> dict:
    """Load a recording folder's consolidated file (or its episodes) as arrays."""
    from saferl_ros.recorder import load_episodes
    return load_episodes(run_dir)


def test_tampered_copy_changes_the_policy_checksum(tmp_path):
    from saferl_ros.files import sha256_file
    src = tmp_path / 'b'
    src.mkdir()
    (src / 'policy.onnx').write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    out = tampered_copy(str(src), tmp_path / 'c')
    assert sha256_file(Path(out) / 'policy.onnx') != sha256_file(src / 'policy.onnx')


def test_make_executor_names_the_choices():
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from saferl_ros.nodes.common import make_executor
    with pytest.raises(ValueError, match=r"unknown executor 'fast'.*events.*single"):
        make_executor('fast')
    with isolated_domain(57):
        rclpy.init()
        try:
            assert isinstance(make_executor('single'), SingleThreadedExecutor)
            assert type(make_executor('events')).__name__ == 'EventsExecutor'
        finally:
            rclpy.try_shutdown()
