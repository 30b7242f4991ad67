"""
Registry of the eight Bullet-Safety-Gym tasks that DSRL ships datasets for.

The normalisation constants (reward bounds, cost cut-off, horizon) are read from ``dsrl.infos`` at
import time, never retyped, so a score computed here is exactly the score DSRL would report.
"""

from dataclasses import dataclass
import os
import re
from typing import Dict

# dsrl's __init__ also tries to import its Safety-Gymnasium and MetaDrive sub-packages, which are
# not installed here; without this it prints a misleading "failed to import" warning.
os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')

from dsrl import infos as dsrl_infos  # noqa: E402
from saferl_ros.errors import UnknownNameError  # noqa: E402
from saferl_ros.sim import quiet_observation_bounds_warning  # noqa: E402

TASK_NAMES = ('BallCircle', 'CarCircle', 'DroneCircle', 'AntCircle',
              'BallRun', 'CarRun', 'DroneRun', 'AntRun')

# Observation and action sizes of the Bullet-Safety-Gym environments (checked against the real
# environments by test/test_data_tasks.py). Kept here so that validating a dataset does not have
# to start a physics simulation.
_SPACE_SIZES = {
    'BallCircle': (8, 2), 'CarCircle': (8, 2), 'DroneCircle': (18, 4), 'AntCircle': (34, 8),
    'BallRun': (7, 2), 'CarRun': (7, 2), 'DroneRun': (17, 4), 'AntRun': (33, 8),
}


def make_bullet_safety_gym_capture_safe() -> None:
    """
    Let Bullet-Safety-Gym run when sys.stdout/sys.stderr are not the process's C streams.

    Its ``RedirectStream`` flushes the C stream whose symbol is named after ``sys.stdout.name``
    (``<stdout>`` -> ``stdout``). Under pytest's capture, Jupyter or a logging wrapper that name is
    no C symbol and creating any environment fails with "undefined symbol". Flushing every C
    stream (``fflush(NULL)``) is what is needed there, and is harmless otherwise.
    """
    import ctypes

    from bullet_safety_gym.envs import builder

    original = builder.RedirectStream._flush_c_stream
    if getattr(original, 'capture_safe', False):
        return

    def flush(stream):
        if getattr(stream, 'name', None) in ('<stdout>', '<stderr>'):
            return original(stream)
        ctypes.CDLL(None).fflush(None)

    flush.capture_safe = True
    builder.RedirectStream._flush_c_stream = staticmethod(flush)


@dataclass(frozen=True)
class TaskSpec:
    """One Bullet-Safety-Gym task and DSRL's constants for it."""

    name: str
    env_id: str
    offline_id: str
    horizon: int
    obs_dim: int
    act_dim: int
    max_reward: float
    min_reward: float
    max_cost: float
    min_cost: float
    dsrl_num_trajectories: int
    dsrl_file_name: str

    @property
    def agent(self) -> str:
        """Return the agent name (Ball, Car, Drone or Ant)."""
        return re.match(r'[A-Z][a-z]+', self.name).group(0)

    def make_env(self, offline: bool = False, **kwargs):
        """
        Create the gymnasium environment, time-limited to the DSRL horizon.

        ``offline=True`` gives dsrl's ``Offline<Task>-v0`` wrapper, whose ``get_dataset(h5path)``
        and ``get_normalized_score`` are the reference implementations; under gymnasium 1.x
        call them on ``env.unwrapped`` (wrappers no longer forward attributes).
        """
        import bullet_safety_gym  # noqa: F401  (registers the Safety*-v0 ids)
        import dsrl  # noqa: F401  (registers the Offline*-v0 ids)
        import gymnasium as gym

        make_bullet_safety_gym_capture_safe()
        env_id = self.offline_id if offline else self.env_id
        with quiet_observation_bounds_warning():
            return gym.make(env_id, max_episode_steps=self.horizon, **kwargs)


def _build(name: str) -> TaskSpec:
    url = dsrl_infos.DATASET_URLS[name]
    file_name = url.rsplit('/', 1)[-1]
    num_trajectories = int(re.search(r'-(\d+)\.hdf5$', file_name).group(1))
    obs_dim, act_dim = _SPACE_SIZES[name]
    return TaskSpec(
        name=name,
        env_id=f'Safety{name}-v0',
        offline_id=f'Offline{name}-v0',
        horizon=int(dsrl_infos.DEFAULT_MAX_EPISODE_STEPS[name]),
        obs_dim=obs_dim,
        act_dim=act_dim,
        max_reward=float(dsrl_infos.MAX_EPISODE_REWARD[name]),
        min_reward=float(dsrl_infos.MIN_EPISODE_REWARD[name]),
        max_cost=float(dsrl_infos.MAX_EPISODE_COST[name]),
        min_cost=float(dsrl_infos.MIN_EPISODE_COST[name]),
        dsrl_num_trajectories=num_trajectories,
        dsrl_file_name=file_name,
    )


TASKS: Dict[str, TaskSpec] = {name: _build(name) for name in TASK_NAMES}


def get_task(name) -> TaskSpec:
    """
    Return the TaskSpec for a task name, DSRL offline id or Bullet-Safety-Gym env id.

    Accepts ``BallCircle``, ``OfflineBallCircle-v0``, ``SafetyBallCircle-v0`` (any case) or a
    TaskSpec, which is returned unchanged.
    """
    if isinstance(name, TaskSpec):
        return name
    key = re.sub(r'^(offline|safety)|(gymnasium)?-v\d+$', '', str(name).strip(), flags=re.I)
    for task_name, spec in TASKS.items():
        if task_name.lower() == key.lower():
            return spec
    raise UnknownNameError(
        f'unknown task {name!r}: expected one of {", ".join(TASK_NAMES)} '
        '(or their DSRL ids such as OfflineBallCircle-v0)')
