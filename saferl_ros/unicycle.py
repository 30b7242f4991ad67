"""
A kinematic unicycle: the differential-drive robot that unicycle_node plays for the tests.

State (x, y, yaw) in the odom frame and the current (v, w). Each step moves the velocity towards
the command within the acceleration limits, clips it to the speed limits, and integrates the
pose exactly along the arc (a straight line when w = 0). No dynamics, slip or noise: a stand-in
that does what a well-behaved base does with a Twist, so that what the adapter sends can be
checked in the pose that results. Numpy-free, ROS-free.
"""

from dataclasses import dataclass
import math
from typing import Tuple

from saferl_ros.robot_adapter import wrap_angle


@dataclass
class UnicycleLimits:
    """Speed and acceleration limits of the base; 0 or inf: none."""

    max_linear: float = 0.0          # [m/s]
    max_angular: float = 0.0         # [rad/s]
    max_linear_accel: float = 0.0    # [m/s^2]
    max_angular_accel: float = 0.0   # [rad/s^2]

    def validate(self) -> None:
        """Raise ValueError naming the first negative or NaN limit."""
        for name, value in vars(self).items():
            if not value >= 0:
                raise ValueError(f'{name} is {value!r}; it must be >= 0 (0: no limit)')


def _limit(value: float, limit: float) -> float:
    return value if limit <= 0 or math.isinf(limit) else max(-limit, min(limit, value))


@dataclass
class Unicycle:
    """Pose and velocity of a unicycle, integrated by :meth:`step`."""

    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0
    v: float = 0.0                   # forward speed [m/s]
    w: float = 0.0                   # yaw rate [rad/s]
    limits: UnicycleLimits = None

    def __post_init__(self):
        """Use no limits unless given; check them."""
        self.limits = self.limits or UnicycleLimits()
        self.limits.validate()

    def step(self, v_command: float, w_command: float, dt: float) -> None:
        """Advance ``dt`` seconds under the command; a non-finite command counts as 0."""
        if dt <= 0:
            return
        lim = self.limits
        v_command = v_command if math.isfinite(v_command) else 0.0
        w_command = w_command if math.isfinite(w_command) else 0.0
        v_target = _limit(v_command, lim.max_linear)
        w_target = _limit(w_command, lim.max_angular)
        self.v += _limit(v_target - self.v, lim.max_linear_accel * dt)
        self.w += _limit(w_target - self.w, lim.max_angular_accel * dt)
        if abs(self.w) < 1e-9:
            self.x += self.v * math.cos(self.yaw) * dt
            self.y += self.v * math.sin(self.yaw) * dt
        else:
            yaw_end = self.yaw + self.w * dt
            radius = self.v / self.w
            self.x += radius * (math.sin(yaw_end) - math.sin(self.yaw))
            self.y -= radius * (math.cos(yaw_end) - math.cos(self.yaw))
            self.yaw = yaw_end
        self.yaw = wrap_angle(self.yaw)

    def quaternion(self) -> Tuple[float, float, float, float]:
        """Return the heading as a quaternion about z, ordered x, y, z, w."""
        return 0.0, 0.0, math.sin(self.yaw / 2.0), math.cos(self.yaw / 2.0)
