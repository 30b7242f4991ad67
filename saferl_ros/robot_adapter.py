"""
Mobile robot <-> Bullet-Safety-Gym task: observation from odometry, Twist from actions, cost.

A Ball or Car policy trained in the simulator sees positions, velocities and the heading scaled
and arranged as :mod:`saferl_ros.observation` documents. On a robot the same vector is built from
``nav_msgs/Odometry`` (pose in the odom frame, twist in the body frame): this module does that
arithmetic, the geofence cost (the task's boundaries) and the task reward, and maps the policy's
action back to a velocity command with speed limits. The robot adapter node only moves messages.

Conventions the simulator fixes (checked against PyBullet in test/test_ros_robot_adapter.py):
- Ball: rolls without slipping, so its angular velocity is (-vy / r, vx / r, yaw rate) with the
  simulator's ball radius r = 0.5 m; its action is a force along world x and y.
- Car (MIT racecar): its body frame is turned by pi, so the simulator's yaw is the heading + pi,
  a negative first action drives forward and a positive second action turns clockwise.
- ``position_scale`` maps robot metres to simulator metres (a 3 m lab for the 14 m circle arena
  is ``position_scale: 4.7``); velocities scale by ``velocity_scale``.

Differential drive (``drive='differential'``, TurtleBot-class bases, Nav2's convention): the
command is (v, 0, w), forward speed and yaw rate, never a sideways speed. Odometry gives every
observation channel: x, y from the pose, vx, vy from the body-frame twist turned into the odom
frame, the yaw from the pose orientation and the yaw rate from the twist's angular z (the Ball's
wx, wy from rolling without slipping, as for any base). Car actions are already (v, w) commands.
A Ball action is a world-frame direction; a differential base drives along it as far as its
heading allows, ``v = |d| cos(e)``, and turns towards it, ``w = heading_gain * e``, where d is the
action times ``max_linear`` (norm at most ``max_linear``) and e the heading error (to the
direction, or to its opposite when that is nearer: the base then backs up).
``drive='holonomic'`` sends the Ball's velocity as (v_forward, v_left, 0) instead (omni bases, and
the simulator standing in for a robot).

The hard fence (``fence_x``, ``fence_y``, robot metres in the odom frame, centred on its origin;
by default the task's boundary, which for Circle bounds only x and for Run only y) is enforced,
not only costed: at or beyond a fence line a command whose world velocity points
further out loses that component (holonomic) or its forward speed (differential: turning stays
allowed, and so does driving back in).

Runtime core: numpy only.
"""

from dataclasses import dataclass
import math
from typing import Optional, Tuple

import numpy as np
from saferl_ros.observation import (channels, CIRCLE_RADIUS, CIRCLE_X_LIMIT, parse_task,
                                    RUN_Y_LIMIT)

BALL_RADIUS = 0.5                    # bullet_safety_gym Ball.radius [m]
VELOCITY_CONSTRAINT = {'Ball': 2.5, 'Car': 1.5}   # Agent.velocity_constraint [m/s] (RunTask)
RUN_GOAL = (1000.0, 0.0)             # RunTask.calculate_task_potential's fictitious target
DRIVES = ('differential', 'holonomic')


class RobotConfigError(ValueError):
    """A robot adapter configuration that cannot be used."""


@dataclass
class RobotConfig:
    """How a physical (or odometry-only) robot maps onto a simulator task."""

    task: str = 'BallCircle'
    position_scale: float = 1.0      # simulator metres per robot metre
    velocity_scale: float = 1.0      # simulator m/s per robot m/s
    max_linear: float = 0.3          # speed limit of the command [m/s]
    max_angular: float = 1.0         # yaw-rate limit of the command [rad/s]
    command_timeout: float = 0.5     # no final action for this long -> zero command [s]
    # Geofence in simulator coordinates; None: the task's own boundary (Circle |x| <= 6,
    # Run |y| <= 2).
    x_limit: Optional[float] = None
    y_limit: Optional[float] = None
    # 'differential' (v, w) or 'holonomic' (v_forward, v_left); Car tasks are (v, w) either way.
    drive: str = 'differential'
    heading_gain: float = 2.0        # differential Ball: yaw rate per radian of heading error
    # Hard fence |x| <= fence_x, |y| <= fence_y in robot metres (odom frame); None: the geofence
    # above in robot metres (x_limit / position_scale), inf: no fence on that axis.
    fence_x: Optional[float] = None
    fence_y: Optional[float] = None

    def validate(self) -> None:
        """Raise RobotConfigError naming the first bad parameter."""
        agent, _ = parse_task(self.task)
        if agent not in ('Ball', 'Car'):
            raise RobotConfigError(f'task {self.task!r}: the robot adapter maps mobile agents '
                                   '(Ball*, Car*) onto odometry; Drone and Ant need their own '
                                   'state estimator')
        for name in ('position_scale', 'velocity_scale', 'max_linear', 'max_angular',
                     'command_timeout', 'heading_gain'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise RobotConfigError(f'{name} is {value!r}; it must be a positive number')
        if self.drive not in DRIVES:
            raise RobotConfigError(f'drive is {self.drive!r}; choose one of {DRIVES}')
        for name in ('x_limit', 'y_limit', 'fence_x', 'fence_y'):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise RobotConfigError(f'{name} is {value!r}; it must be a positive distance '
                                       '(inf: none)')


@dataclass
class RobotState:
    """Planar odometry: pose in the odom frame, velocity in the body frame."""

    x: float
    y: float
    yaw: float
    v_forward: float = 0.0           # body-frame linear x [m/s]
    v_left: float = 0.0              # body-frame linear y [m/s]
    yaw_rate: float = 0.0            # [rad/s]

    @classmethod
    def from_world_velocity(cls, x, y, yaw, vx, vy, yaw_rate=0.0) -> 'RobotState':
        """Build a state from a world-frame velocity (rotates it into the body frame)."""
        c, s = math.cos(yaw), math.sin(yaw)
        return cls(x, y, yaw, c * vx + s * vy, -s * vx + c * vy, yaw_rate)

    def world_velocity(self) -> Tuple[float, float]:
        """Return (vx, vy) in the odom frame."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return c * self.v_forward - s * self.v_left, s * self.v_forward + c * self.v_left


def yaw_from_quaternion(x: float, y: float, z: float, w: float) -> float:
    """Return the yaw (rotation about z) of a quaternion."""
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def wrap_angle(angle: float) -> float:
    """Return ``angle`` wrapped into [-pi, pi)."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


class RobotTask:
    """Observation, cost and reward of a Ball/Car task computed from odometry."""

    def __init__(self, config: RobotConfig):
        config.validate()
        self.config = config
        self.agent, self.kind = parse_task(config.task)
        self.channels = channels(config.task)
        self.names = [c.name for c in self.channels]
        self.scales = np.array([c.scale for c in self.channels], np.float32)
        self.x_limit = config.x_limit if config.x_limit is not None else (
            CIRCLE_X_LIMIT if self.kind == 'Circle' else math.inf)
        self.y_limit = config.y_limit if config.y_limit is not None else (
            RUN_Y_LIMIT if self.kind == 'Run' else math.inf)
        k = config.position_scale
        self.fence = (config.fence_x if config.fence_x is not None else self.x_limit / k,
                      config.fence_y if config.fence_y is not None else self.y_limit / k)

    def unfenced(self) -> str:
        """
        Return the axes left without a hard fence by default ('', 'x', 'y' or 'x, y').

        A Circle task bounds only x and a Run task only y, so their default fence leaves the
        other axis open: on a robot, set ``fence_x`` and ``fence_y`` (inf: none, on purpose).
        """
        given = (self.config.fence_x, self.config.fence_y)
        return ', '.join(a for a, f, g in zip('xy', self.fence, given)
                         if math.isinf(f) and g is None)

    def sim_quantities(self, state: RobotState) -> dict:
        """Return the unscaled simulator quantities (simulator units and frames) by channel."""
        k, kv = self.config.position_scale, self.config.velocity_scale
        x, y = k * state.x, k * state.y
        vx, vy = (kv * v for v in state.world_velocity())
        # The Car's simulator body is turned by pi relative to its driving direction.
        yaw = state.yaw + (math.pi if self.agent == 'Car' else 0.0)
        values = {'x': x, 'y': y, 'vx': vx, 'vy': vy, 'sin_yaw': math.sin(yaw),
                  'cos_yaw': math.cos(yaw), 'yaw_rate': state.yaw_rate,
                  # Rolling without slipping (Ball): omega = z x v / r.
                  'wx': -vy / BALL_RADIUS, 'wy': vx / BALL_RADIUS, 'wz': state.yaw_rate,
                  'circle_dist': math.hypot(x, y) - CIRCLE_RADIUS}
        return values

    def observation(self, state: RobotState) -> np.ndarray:
        """Return the observation vector the simulator task would produce in this state."""
        values = self.sim_quantities(state)
        return self.scales * np.array([values[n] for n in self.names], np.float32)

    def cost(self, state: RobotState) -> float:
        """Return the geofence cost: 1 outside the boundary (or over the Run speed limit)."""
        q = self.sim_quantities(state)
        outside = abs(q['x']) > self.x_limit or abs(q['y']) > self.y_limit
        too_fast = (self.kind == 'Run'
                    and math.hypot(q['vx'], q['vy']) > VELOCITY_CONSTRAINT[self.agent])
        return 1.0 if outside or too_fast else 0.0

    def reward(self, previous: Optional[RobotState], state: RobotState, action) -> float:
        """
        Return the task reward of the step ``previous`` -> ``state`` under ``action``.

        Circle (tasks.CircleTask.calculate_reward): 0.1 <p, (-vy, vx)> / (1 + |‖p‖ - R|);
        Run: 60 x the progress towards a far target on +x. Plus the Ball's action penalty
        0.01 x (-0.5 ‖a‖) (Circle) or -0.5 ‖a‖ (Run), as the simulator adds it.
        """
        q = self.sim_quantities(state)
        penalty = -0.5 * float(np.linalg.norm(action)) if self.agent == 'Ball' else 0.0
        if self.kind == 'Circle':
            dist = math.hypot(q['x'], q['y'])
            r = 0.1 * (q['x'] * -q['vy'] + q['y'] * q['vx']) / (1 + abs(dist - CIRCLE_RADIUS))
            return r + 0.01 * penalty
        if previous is None:
            return penalty
        p = self.sim_quantities(previous)
        goal_dist = math.hypot(RUN_GOAL[0] - q['x'], RUN_GOAL[1] - q['y'])
        prev_dist = math.hypot(RUN_GOAL[0] - p['x'], RUN_GOAL[1] - p['y'])
        return 60.0 * (prev_dist - goal_dist) + penalty

    def command(self, action, state: Optional[RobotState]) -> Tuple[float, float, float]:
        """
        Return the velocity command for an action: body-frame (v_forward, v_left, yaw_rate).

        Car: forward speed from -a[0] and yaw rate from -a[1] (the simulator's sign convention).
        Ball: the action is a world-frame direction d = a * max_linear (norm at most
        max_linear); a holonomic base moves along it (turned into the body frame with the
        current yaw), a differential one drives ``|d| cos(e)`` and turns ``heading_gain * e``
        (e: the heading error to d, or to -d when that is nearer). Every output is within
        ``max_linear`` / ``max_angular``.
        """
        a = np.clip(np.asarray(action, np.float64).reshape(-1)[:2], -1.0, 1.0)
        lim_v, lim_w = self.config.max_linear, self.config.max_angular
        if self.agent != 'Ball':
            return float(-a[0] * lim_v), 0.0, float(-a[1] * lim_w)
        vx, vy = a[0] * lim_v, a[1] * lim_v
        norm = math.hypot(vx, vy)
        if norm > lim_v:
            vx, vy, norm = vx * lim_v / norm, vy * lim_v / norm, lim_v
        yaw = state.yaw if state is not None else 0.0
        if self.config.drive == 'holonomic':
            c, s = math.cos(yaw), math.sin(yaw)
            return c * vx + s * vy, -s * vx + c * vy, 0.0
        if norm == 0.0:
            return 0.0, 0.0, 0.0
        error = wrap_angle(math.atan2(vy, vx) - yaw)
        turn = error if abs(error) <= math.pi / 2 else wrap_angle(error - math.pi)
        w = float(np.clip(self.config.heading_gain * turn, -lim_w, lim_w))
        return norm * math.cos(error), 0.0, w

    def fence_limit(self, command: Tuple[float, float, float],
                    state: RobotState) -> Tuple[Tuple[float, float, float], bool]:
        """
        Cut the part of ``command`` that would move the robot further out of the hard fence.

        Return (command, cut). At or beyond a fence line (|x| >= fence_x or |y| >= fence_y in
        robot metres), an outward world velocity along that axis is removed: a holonomic base
        keeps the rest, a differential base (or any Car) stops its forward motion and may still
        turn. Driving back inwards is never cut.
        """
        v_forward, v_left, yaw_rate = command
        c, s = math.cos(state.yaw), math.sin(state.yaw)
        world = [c * v_forward - s * v_left, s * v_forward + c * v_left]
        cut = False
        for axis, (position, limit) in enumerate(zip((state.x, state.y), self.fence)):
            if abs(position) >= limit and world[axis] * position > 0.0:
                world[axis], cut = 0.0, True
        if not cut:
            return command, False
        if self.agent == 'Ball' and self.config.drive == 'holonomic':
            return (c * world[0] + s * world[1], -s * world[0] + c * world[1], yaw_rate), True
        return (0.0, 0.0, yaw_rate), True

    def action_from_command(self, v_forward: float, v_left: float, yaw_rate: float,
                            state: Optional[RobotState]) -> np.ndarray:
        """
        Invert :meth:`command`: the action that asks for this body-frame velocity.

        Lets the simulator stand in for a robot that takes Twist commands.
        """
        lim_v, lim_w = self.config.max_linear, self.config.max_angular
        if self.agent == 'Ball':
            yaw = state.yaw if state is not None else 0.0
            c, s = math.cos(yaw), math.sin(yaw)
            vx, vy = c * v_forward - s * v_left, s * v_forward + c * v_left
            action = [vx / lim_v, vy / lim_v]
        else:
            action = [-v_forward / lim_v, -yaw_rate / lim_w]
        return np.clip(np.asarray(action, np.float32), -1.0, 1.0)
