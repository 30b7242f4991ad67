"""
Check the installed environment: simulator and DSRL ids register, ROS 2 and ONNX import.

A tool, not part of either layer: it touches training (gymnasium, dsrl) and ROS (rclpy) alike.

Run by ``make venv`` after installing bullet-safety-gym and dsrl without their stale pins, so a
broken install fails at setup time with a clear message instead of deep inside a test.
"""

from importlib import metadata
import os
import sys


def main() -> int:
    """Print one line per check; return 1 if any fails."""
    os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')
    failures = []

    def check(what, func):
        try:
            detail = func()
            print(f'ok    {what}' + (f': {detail}' if detail else ''))
        except Exception as err:  # noqa: B902  (report any failure, keep checking)
            failures.append(what)
            print(f'FAIL  {what}: {type(err).__name__}: {err}')

    def versions():
        names = ('torch', 'numpy', 'gymnasium', 'pybullet', 'bullet-safety-gym', 'dsrl',
                 'onnxruntime', 'h5py', 'ros-rclpy')
        return ', '.join(f'{n} {metadata.version(n)}' for n in names)

    def env_ids():
        import bullet_safety_gym  # noqa: F401
        import dsrl  # noqa: F401
        import gymnasium as gym

        from saferl_ros.tasks import TASKS
        missing = [i for spec in TASKS.values() for i in (spec.env_id, spec.offline_id)
                   if i not in gym.envs.registry]
        if missing:
            raise RuntimeError('not registered: ' + ', '.join(missing))
        return f'{2 * len(TASKS)} ids registered'

    def one_step():
        from saferl_ros.tasks import get_task
        env = get_task('BallCircle').make_env(offline=True)
        env.reset(seed=0)
        _, _, _, _, info = env.step(env.action_space.sample())
        env.close()
        return f'OfflineBallCircle-v0 steps, info cost = {info["cost"]}'

    def ros():
        import rclpy
        import rclpy.lifecycle  # noqa: F401
        from std_msgs.msg import Float32MultiArray  # noqa: F401
        rclpy.init()
        rclpy.shutdown()
        return 'rclpy initialises (rmw_fastrtps_cpp)'

    def messages():
        from rclpy.serialization import deserialize_message, serialize_message
        from saferl_interfaces.msg import MonitorVerdict, StepRecord
        for cls in (StepRecord, MonitorVerdict):
            assert deserialize_message(serialize_message(cls()), cls) == cls()
        return 'saferl_interfaces StepRecord, MonitorVerdict (tools/build_interfaces.sh)'

    check('package versions', versions)
    check('Bullet-Safety-Gym and DSRL environment ids', env_ids)
    check('simulation', one_step)
    check('ROS 2 client library', ros)
    check('saferl_interfaces messages', messages)
    if failures:
        print('environment check failed: ' + ', '.join(failures) + '. Re-run `make venv`.')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
