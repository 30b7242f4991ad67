"""
Named observation channels of the Bullet-Safety-Gym tasks.

A policy trained on Bullet-Safety-Gym data sees a flat vector. On a robot that vector is assembled
from sensors, so every entry needs a name (to check that the robot builds the same vector, in the
same order, as the simulator the data came from) and its scale (the simulator multiplies raw SI
quantities by fixed factors before the policy sees them).

The layout mirrors bullet_safety_gym 1.4 exactly (``envs/agents.py``: each agent's
``agent_specific_observation``, then the sensors (none in Circle/Run), then ``envs/tasks.py``:
the task observation). ``test/test_ros_observation.py`` checks the sizes against the real
environments and the values of the mobile agents against the simulator's state.

This module is part of the runtime core: numpy-free even, no simulator import, so a robot can use
it with nothing but the Python standard library.
"""

from dataclasses import dataclass
import re
from typing import List, Sequence, Tuple

AGENTS = ('Ball', 'Car', 'Drone', 'Ant')
TASK_KINDS = ('Circle', 'Run')

# CircleTask (tasks.py): the zone is a circle of radius 7 m around the origin and the task
# observation is (|p_xy| - radius) / world.env_dim with env_dim = 10 for every Circle world.
CIRCLE_RADIUS = 7.0
WORLD_ENV_DIM = 10.0
# CircleTask: cost 1 when |x| > 6 (two line boundaries); RunTask: cost 1 when |y| > 2 or the
# agent exceeds its velocity constraint.
CIRCLE_X_LIMIT = 6.0
RUN_Y_LIMIT = 2.0

# Ant (agents.py, MJCFAgent): motor order as the URDF/MJCF lists them, and the feet.
ANT_JOINTS = ('hip_1', 'ankle_1', 'hip_2', 'ankle_2', 'hip_3', 'ankle_3', 'hip_4', 'ankle_4')
ANT_FEET = ('front_left_foot', 'front_right_foot', 'left_back_foot', 'right_back_foot')
DRONE_ROTORS = 4


class ObservationError(ValueError):
    """An observation layout that does not match what the model was trained on."""


@dataclass(frozen=True)
class Channel:
    """
    One entry of the observation vector.

    ``value = scale * quantity``, where ``quantity`` is described in SI units (world frame unless
    stated otherwise), exactly as the simulator computes it.
    """

    name: str
    scale: float
    quantity: str


def _xyz(prefix: str, scale: float, what: str, axes: str = 'xyz') -> List[Channel]:
    return [Channel(f'{prefix}{a}', scale, f'{what} {a} (world frame)') for a in axes]


def _agent_channels(agent: str) -> List[Channel]:
    if agent == 'Ball':
        # Ball.agent_specific_observation: 0.1 * xy, 0.2 * v_xy, 0.1 * angular velocity (3).
        return (_xyz('', 0.1, 'position [m]', 'xy') + _xyz('v', 0.2, 'linear velocity [m/s]', 'xy')
                + _xyz('w', 0.1, 'angular velocity [rad/s]'))
    if agent == 'Car':
        # RaceCar.agent_specific_observation: 0.1 * xy, v_xy unscaled, sin/cos yaw, 0.1 * yaw rate.
        return (_xyz('', 0.1, 'position [m]', 'xy') + _xyz('v', 1.0, 'linear velocity [m/s]', 'xy')
                + [Channel('sin_yaw', 1.0, 'sin(yaw)'), Channel('cos_yaw', 1.0, 'cos(yaw)'),
                   Channel('yaw_rate', 0.1, 'yaw rate [rad/s]')])
    if agent == 'Drone':
        # Drone.agent_specific_observation: 0.1 * xyz, 0.2 * v, quaternion (x, y, z, w),
        # 0.1 * angular velocity, 2.5e-3 * (rotor speed - hover speed).
        return (_xyz('', 0.1, 'position [m]') + _xyz('v', 0.2, 'linear velocity [m/s]')
                + [Channel(f'q{a}', 1.0, f'orientation quaternion {a}') for a in 'xyzw']
                + _xyz('w', 0.1, 'angular velocity [rad/s]')
                + [Channel(f'rotor_{i}_speed', 2.5e-3, f'rotor {i} speed - hover speed [rad/s]')
                   for i in range(DRONE_ROTORS)])
    if agent == 'Ant':
        # MJCFAgent.agent_specific_observation: 0.1 * xyz, 0.3 * v, quaternion, 0.15 * angular
        # velocity, 0.5 * (relative position, relative velocity) per motor, foot contacts.
        joints = []
        for j in ANT_JOINTS:
            joints += [Channel(f'{j}_pos', 0.5, f'{j} position relative to its limits [-1, 1]'),
                       Channel(f'{j}_vel', 0.5, f'{j} velocity (relative, 0.1 * rad/s)')]
        return (_xyz('', 0.1, 'position [m]') + _xyz('v', 0.3, 'linear velocity [m/s]')
                + [Channel(f'q{a}', 1.0, f'orientation quaternion {a}') for a in 'xyzw']
                + _xyz('w', 0.15, 'angular velocity [rad/s]') + joints
                + [Channel(f'{f}_contact', 1.0, f'{f} touches the ground (0/1)')
                   for f in ANT_FEET])
    raise ObservationError(f'unknown agent {agent!r}: expected one of {", ".join(AGENTS)}')


def _task_channels(kind: str) -> List[Channel]:
    if kind == 'Circle':
        return [Channel('circle_dist', 1.0 / WORLD_ENV_DIM,
                        f'distance from the circle of radius {CIRCLE_RADIUS:g} m [m]')]
    return []  # RunTask has no task observation


def parse_task(task) -> Tuple[str, str]:
    """
    Split a task name into (agent, kind), e.g. ``'SafetyCarRun-v0'`` -> ``('Car', 'Run')``.

    Accepts the DSRL task name (``BallCircle``), the simulator id (``SafetyBallCircle-v0``), the
    offline id (``OfflineBallCircle-v0``) or anything with a ``.name`` attribute (a TaskSpec).
    """
    name = getattr(task, 'name', task)
    key = re.sub(r'^(offline|safety)|(gymnasium)?-v\d+$', '', str(name).strip(), flags=re.I)
    for agent in AGENTS:
        for kind in TASK_KINDS:
            if key.lower() == (agent + kind).lower():
                return agent, kind
    raise ObservationError(
        f'unknown task {name!r}: expected an agent ({", ".join(AGENTS)}) followed by a task '
        f'({", ".join(TASK_KINDS)}), e.g. BallCircle or SafetyBallCircle-v0')


def channels(task) -> List[Channel]:
    """Return every observation entry of ``task`` in order, with its scale and meaning."""
    agent, kind = parse_task(task)
    return _agent_channels(agent) + _task_channels(kind)


def channel_names(task) -> List[str]:
    """Return the names of every observation entry of ``task`` in order."""
    return [c.name for c in channels(task)]


def check_channels(expected: Sequence[str], actual: Sequence[str], source: str = 'input') -> None:
    """
    Raise ObservationError unless ``actual`` names the same channels in the same order.

    A reordered observation is refused, not re-ordered silently: a robot driver that publishes its
    channels in a different order is misconfigured, and the message says how.
    """
    expected, actual = list(expected), list(actual)
    if expected == actual:
        return
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if missing or extra:
        detail = (f'missing {missing}' if missing else '') + (
            ('; ' if missing else '') + f'unexpected {extra}' if extra else '')
    else:
        first = next(i for i, (e, a) in enumerate(zip(expected, actual)) if e != a)
        detail = (f'same channels in a different order (first difference at index {first}: '
                  f'expected {expected[first]!r}, got {actual[first]!r})')
    raise ObservationError(
        f'{source} observation channels do not match the model: {detail}. Expected {expected}; '
        'publish the observation in exactly this order (see saferl_ros.observation.channel_names)')
