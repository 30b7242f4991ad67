"""
The task registry: the eight Bullet-Safety-Gym tasks that DSRL ships datasets for.

One :class:`TaskSpec` per task holds everything the project needs to know about it: sizes, the
DSRL horizon, the simulated time of one step, and DSRL's score constants; :func:`normalized_score`
is DSRL's score. Training, evaluation, collection, the sim node and the recorder all read them
from here.

The constants are DSRL's (``dsrl.infos``: ``DEFAULT_MAX_EPISODE_STEPS``, ``MAX_EPISODE_REWARD``,
``MIN_EPISODE_REWARD``, ``MAX_EPISODE_COST``, ``MIN_EPISODE_COST``, ``DATASET_URLS``), written
out to the last bit because the runtime core must not need dsrl (a robot has no simulator and no
dataset package); ``test/test_data_tasks.py`` checks every one against ``dsrl.infos`` exactly, and
the sizes and control periods against the real environments. Standard library only.
"""

from dataclasses import dataclass
import re
from typing import Dict, Tuple

from saferl_ros.errors import UnknownNameError


@dataclass(frozen=True)
class TaskSpec:
    """One Bullet-Safety-Gym task and DSRL's constants for it."""

    name: str                # DSRL's task name, e.g. BallCircle
    horizon: int             # DSRL's episode length (steps)
    obs_dim: int
    act_dim: int
    control_period: float    # simulated seconds of one env.step (PyBullet time step x frame skip)
    max_reward: float        # DSRL's reward normalisation bounds (episode returns)
    min_reward: float
    max_cost: float          # DSRL's cost cut-off of the dataset's trajectories
    min_cost: float
    dsrl_file_name: str      # the hosted DSRL dataset's file name

    @property
    def agent(self) -> str:
        """Return the agent name (Ball, Car, Drone or Ant)."""
        return re.match(r'[A-Z][a-z]+', self.name).group(0)

    @property
    def kind(self) -> str:
        """Return the task kind: Circle or Run."""
        return self.name[len(self.agent):]

    @property
    def env_id(self) -> str:
        """Return the Bullet-Safety-Gym environment id, e.g. SafetyBallCircle-v0."""
        return f'Safety{self.name}-v0'

    @property
    def offline_id(self) -> str:
        """Return dsrl's offline environment id, e.g. OfflineBallCircle-v0."""
        return f'Offline{self.name}-v0'

    @property
    def dsrl_num_trajectories(self) -> int:
        """Return the number of trajectories of DSRL's hosted dataset (from its file name)."""
        return int(re.search(r'-(\d+)\.hdf5$', self.dsrl_file_name).group(1))

    def make_env(self, offline: bool = False, **kwargs):
        """
        Return a new gymnasium environment of the task, time-limited to the DSRL horizon.

        ``offline=True`` gives dsrl's ``Offline<Task>-v0`` wrapper, whose ``get_dataset(h5path)``
        and ``get_normalized_score`` are the reference implementations; under gymnasium 1.x
        call them on ``env.unwrapped`` (wrappers no longer forward attributes).
        """
        from saferl_ros.sim import make_gym_env
        kwargs.setdefault('max_episode_steps', self.horizon)
        return make_gym_env(self.offline_id if offline else self.env_id, **kwargs)


# Simulated seconds per step: bullet_safety_gym.envs.builder.get_physics_parameters, time step x
# frame skip (Circle 1/60 s x 6, Run 1/120 s x 4, DroneRun 1/120 s x 2).
_CIRCLE, _RUN, _DRONE_RUN = 0.1, 1 / 30, 1 / 60
TASKS: Dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec('BallCircle', 200, 8, 2, _CIRCLE, 881.46337890625, 0.38312244415283203, 80.0, 0.0,
             'SafetyBallCircle-v0-80-886.hdf5'),
    TaskSpec('CarCircle', 300, 8, 2, _CIRCLE, 534.3060913085938, 3.484419822692871, 100.0, 0.0,
             'SafetyCarCircle-v0-100-1450.hdf5'),
    TaskSpec('DroneCircle', 300, 18, 4, _CIRCLE, 996.38916015625, 207.794189453125, 100.0, 0.0,
             'SafetyDroneCircle-v0-100-1923.hdf5'),
    TaskSpec('AntCircle', 500, 34, 8, _CIRCLE, 460.7091979980469, 0.0177031010389328, 200.0,
             0.0, 'SafetyAntCircle-v0-200-5728.hdf5'),
    TaskSpec('BallRun', 100, 7, 2, _RUN, 1327.445556640625, 26.339754104614258, 80.0, 0.0,
             'SafetyBallRun-v0-80-940.hdf5'),
    TaskSpec('CarRun', 200, 7, 2, _RUN, 574.6533203125, 204.28726196289062, 40.0, 0.0,
             'SafetyCarRun-v0-40-651.hdf5'),
    TaskSpec('DroneRun', 200, 17, 4, _DRONE_RUN, 682.8330078125, 10.557029724121094, 140.0, 0.0,
             'SafetyDroneRun-v0-140-1990.hdf5'),
    TaskSpec('AntRun', 200, 33, 8, _RUN, 955.4818725585938, 0.001767391717990563, 150.0, 0.0,
             'SafetyAntRun-v0-150-1816.hdf5'),
)}
TASK_NAMES: Tuple[str, ...] = tuple(TASKS)


def get_task(name) -> TaskSpec:
    """
    Return the TaskSpec for a task name, DSRL offline id or Bullet-Safety-Gym env id.

    Accepts ``BallCircle``, ``OfflineBallCircle-v0``, ``SafetyBallCircle-v0`` (any case) or a
    TaskSpec, which is returned unchanged; raises UnknownNameError for anything else.
    """
    if isinstance(name, TaskSpec):
        return name
    key = re.sub(r'^(offline|safety)|(gymnasium)?-v\d+$', '', str(name).strip(), flags=re.I)
    for task_name, spec in TASKS.items():
        if task_name.lower() == key.lower():
            return spec
    raise UnknownNameError(
        f'unknown task {name!r}: expected one of {", ".join(TASK_NAMES)} '
        '(or their ids such as SafetyBallCircle-v0 or OfflineBallCircle-v0)')


def normalized_score(task, reward, cost, kappa):
    """
    Return DSRL's (normalised reward, normalised cost), as OfflineEnv.get_normalized_score.

    ``R_norm = (R - R_min) / (R_max - R_min)`` with the task's DSRL constants and
    ``C_norm = (C + eps) / (kappa + eps)`` where ``eps = 1`` only when ``kappa == 0``.
    Scalars give floats, arrays give arrays. Safe means ``C_norm <= 1``.
    """
    spec = get_task(task)
    epsilon = 1 if kappa == 0 else 0
    normalized_reward = (reward - spec.min_reward) / (spec.max_reward - spec.min_reward)
    normalized_cost = (cost + epsilon) / (kappa + epsilon)
    return normalized_reward, normalized_cost
