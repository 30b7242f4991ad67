"""
unicycle_node: a kinematic differential-drive robot standing in for the real one.

Takes geometry_msgs/Twist (or TwistStamped) on ``cmd_vel`` (linear.x and angular.z; a sideways
linear.y is ignored, as a differential base does), integrates it at ``rate_hz``
(saferl_ros.unicycle) and publishes nav_msgs/Odometry on ``odom``: pose in the odom frame, twist in
the body frame, stamped with the node's clock. Like a robot driver it stops by itself when no
command arrives within ``command_timeout``. For fault tests two parameters can be changed while
it runs (``ros2 param set`` or a parameter client): ``drop_odometry`` (keeps moving, publishes
nothing: odometry loss) and ``stamp_offset`` (added to every stamp: a jump of the robot's clock).
"""

import sys
import time

from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from saferl_ros import graph
from saferl_ros.nodes.common import (CMD_VEL, COMMAND_QOS, ConfiguredEntities, declare, fail,
                                     ns_to_stamp, ODOM, Param, run_node, SENSOR_QOS, values)
from saferl_ros.unicycle import Unicycle, UnicycleLimits

PARAMS = [
    Param('rate_hz', 50.0, 'Integration and odometry rate [Hz].', min_value=1.0,
          max_value=1000.0),
    Param('max_linear', 0.0, 'Speed limit of the base [m/s] (0: none).', min_value=0.0),
    Param('max_angular', 0.0, 'Yaw-rate limit of the base [rad/s] (0: none).', min_value=0.0),
    Param('max_linear_accel', 0.0, 'Linear acceleration limit [m/s^2] (0: none).',
          min_value=0.0),
    Param('max_angular_accel', 0.0, 'Angular acceleration limit [rad/s^2] (0: none).',
          min_value=0.0),
    Param('command_timeout', 0.5, 'No command for this long: the base stops by itself, as a '
          'robot driver does [s].', min_value=0.0),
    Param('x', 0.0, 'Start position x in the odom frame [m] (set on activate).'),
    Param('y', 0.0, 'Start position y in the odom frame [m] (set on activate).'),
    Param('yaw', 0.0, 'Start heading [rad] (set on activate).'),
    Param('twist_stamped', False, 'Take geometry_msgs/TwistStamped instead of Twist.'),
    Param('odom_frame', 'odom', 'frame_id of the odometry.'),
    Param('base_frame', 'base_link', 'child_frame_id of the odometry.'),
    Param('drop_odometry', False, 'Test fault, may change while running: publish no odometry '
          '(the base keeps moving).'),
    Param('stamp_offset', 0.0, 'Test fault, may change while running: add this to every '
          'odometry stamp (a jump of the robot clock) [s].'),
]


class UnicycleNode(LifecycleNode):
    """Twist in, Odometry out: a kinematic unicycle at a fixed rate."""

    def __init__(self, name: str = graph.UNICYCLE, **kwargs):
        super().__init__(name, **kwargs)
        declare(self, PARAMS)
        self.entities = ConfiguredEntities(self)   # created in configure, gone in cleanup
        self.active = False
        self.last_error = ''
        self.cfg = {}
        self.odom_pub = None
        self.robot = None                # set by activate
        self.command = (0.0, 0.0)        # (v, w) last commanded
        self.command_at = -float('inf')  # monotonic time of the last command
        self.stepped_at = None           # monotonic time of the last integration step
        self.published = 0               # odometry messages sent since activate

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Check the limits; create the odometry publisher, the command subscription, the timer."""
        try:
            cfg = values(self, PARAMS)
            self.limits = UnicycleLimits(cfg['max_linear'], cfg['max_angular'],
                                         cfg['max_linear_accel'], cfg['max_angular_accel'])
            self.limits.validate()
        except ValueError as exc:
            return fail(self, exc)
        self.cfg = cfg
        self.odom_pub = self.entities.lifecycle_publisher(Odometry, ODOM, SENSOR_QOS)
        self.entities.subscription(TwistStamped if cfg['twist_stamped'] else Twist, CMD_VEL,
                                   self._on_command, COMMAND_QOS)
        self.entities.timer(1.0 / cfg['rate_hz'], self._on_tick)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Place the robot at its start pose, at rest."""
        result = super().on_activate(state)
        self.robot = Unicycle(self.cfg['x'], self.cfg['y'], self.cfg['yaw'], limits=self.limits)
        self.command, self.command_at = (0.0, 0.0), -float('inf')
        self.stepped_at, self.published = time.monotonic(), 0
        self.active = True
        return result

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop integrating and publishing."""
        self.active = False
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Destroy what configure created."""
        self.entities.destroy()
        self.odom_pub = self.robot = None
        return TransitionCallbackReturn.SUCCESS

    def _on_command(self, msg):
        twist = msg.twist if isinstance(msg, TwistStamped) else msg
        self.command = (twist.linear.x, twist.angular.z)
        self.command_at = time.monotonic()

    def _on_tick(self):
        if not self.active:
            return
        now = time.monotonic()
        fresh = now - self.command_at <= self.cfg['command_timeout']
        v, w = self.command if fresh else (0.0, 0.0)
        self.robot.step(v, w, now - self.stepped_at)
        self.stepped_at = now
        if self.get_parameter('drop_odometry').value:
            return
        offset_ns = int(self.get_parameter('stamp_offset').value * 1e9)
        msg = Odometry()
        msg.header.stamp = ns_to_stamp(self.get_clock().now().nanoseconds + offset_ns)
        msg.header.frame_id = self.cfg['odom_frame']
        msg.child_frame_id = self.cfg['base_frame']
        msg.pose.pose.position.x, msg.pose.pose.position.y = self.robot.x, self.robot.y
        q = msg.pose.pose.orientation
        q.x, q.y, q.z, q.w = self.robot.quaternion()
        msg.twist.twist.linear.x, msg.twist.twist.angular.z = self.robot.v, self.robot.w
        self.odom_pub.publish(msg)
        self.published += 1


def main(args=None):
    """Console script: unicycle_node [--autostart] [--ros-args ...]."""
    sys.exit(run_node(UnicycleNode, args))


if __name__ == '__main__':
    main()
