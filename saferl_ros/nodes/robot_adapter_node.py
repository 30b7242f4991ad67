"""
robot_adapter_node: a mobile robot (nav_msgs/Odometry in, Twist out) as a Ball/Car task.

Turns each odometry message into the observation the simulator task would produce (named,
stamped with the odometry's stamp), publishes one DSRL transition per control step (reward and
geofence cost computed from the pose, so robot runs become offline data), and turns the final
action into a velocity command with speed limits. If no final action arrives within
``command_timeout`` it publishes an explicit zero command: the on-robot watchdog, which holds
even when the monitor or the link to it is gone.
"""

import math
import sys
import time
from typing import Any, Dict, Optional

from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
import numpy as np
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from saferl_interfaces.msg import StepRecord
from saferl_ros import graph
from saferl_ros.nodes.common import (COMMAND_QOS, ConfiguredEntities, declare, EPISODE, fail,
                                     FINAL, joint_state, json_msg, ns_to_stamp, OBSERVATION,
                                     optional_float, Param, RECORD_QOS, run_node, SENSOR_QOS,
                                     stamp_to_ns, STEP, values)
from saferl_ros.nodes.records import step_msg, Transition
from saferl_ros.robot_adapter import (RobotConfig, RobotState, RobotTask, yaw_from_quaternion)
from sensor_msgs.msg import JointState
from std_msgs.msg import String

PARAMS = [
    Param('task', 'BallCircle', 'Ball/Car task whose observation the robot imitates.'),
    Param('position_scale', 1.0, 'Simulator metres per robot metre.', min_value=0.0),
    Param('velocity_scale', 1.0, 'Simulator m/s per robot m/s.', min_value=0.0),
    Param('max_linear', 0.3, 'Speed limit of the command [m/s]; a full action maps to it.',
          min_value=0.0),
    Param('max_angular', 1.0, 'Yaw-rate limit of the command [rad/s].', min_value=0.0),
    Param('command_timeout', 0.5, 'No final action for this long -> zero command [s].',
          min_value=0.0),
    Param('x_limit', math.nan, 'Geofence |x| limit in simulator metres (NaN: the task rule).'),
    Param('y_limit', math.nan, 'Geofence |y| limit in simulator metres (NaN: the task rule).'),
    Param('horizon', 0, 'Steps per recorded episode (0 = the DSRL horizon of the task).'),
    Param('twist_stamped', False, 'Publish geometry_msgs/TwistStamped instead of Twist.'),
    Param('watchdog_rate_hz', 20.0, 'How often the command timeout is checked [Hz].',
          min_value=1.0, max_value=1000.0),
]


class RobotAdapterNode(LifecycleNode):
    """Odometry -> observation, final action -> velocity command."""

    def __init__(self, name: str = graph.ROBOT_ADAPTER, **kwargs):
        super().__init__(name, **kwargs)
        declare(self, PARAMS)
        self.entities = ConfiguredEntities(self)   # created in configure, gone in cleanup
        self.active = False            # set by on_activate, cleared by on_deactivate
        self.last_error = ''
        self.act_dim = 2
        # Set by configure:
        self.cfg: Dict[str, Any] = {}
        self.task: Optional[RobotTask] = None
        self.horizon = 0
        # Lifecycle publishers: silent while inactive (activate and deactivate send their zero
        # command while they are enabled).
        self.obs_pub = self.step_pub = self.episode_pub = self.cmd_pub = None
        # Reset by activate:
        self.state: Optional[RobotState] = None
        self.previous = None            # (stamp, observation, state) of the last observation
        self.action = np.zeros(self.act_dim, np.float32)
        self.last_command = -math.inf   # monotonic time of the last final action
        self.episode, self.steps = 0, 0
        self.timeouts = 0

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Validate the parameters; create publishers and subscriptions."""
        from saferl_ros.tasks import get_task
        try:
            cfg = values(self, PARAMS)
            self.task = RobotTask(RobotConfig(
                task=cfg['task'], position_scale=cfg['position_scale'],
                velocity_scale=cfg['velocity_scale'], max_linear=cfg['max_linear'],
                max_angular=cfg['max_angular'], command_timeout=cfg['command_timeout'],
                x_limit=optional_float(cfg['x_limit']), y_limit=optional_float(cfg['y_limit'])))
            self.horizon = cfg['horizon'] or get_task(cfg['task']).horizon
        except Exception as exc:  # RobotConfigError, unknown task
            return fail(self, exc)
        self.cfg = cfg
        self.obs_pub = self.entities.lifecycle_publisher(JointState, OBSERVATION, SENSOR_QOS)
        self.step_pub = self.entities.lifecycle_publisher(StepRecord, STEP, RECORD_QOS)
        self.episode_pub = self.entities.lifecycle_publisher(String, EPISODE, RECORD_QOS)
        self.cmd_pub = self.entities.lifecycle_publisher(
            TwistStamped if cfg['twist_stamped'] else Twist, 'cmd_vel', COMMAND_QOS)
        self.entities.subscription(Odometry, 'odom', self._on_odometry, SENSOR_QOS)
        self.entities.subscription(JointState, FINAL, self._on_final, COMMAND_QOS)
        if cfg['watchdog_rate_hz'] > 0:
            self.entities.timer(1.0 / cfg['watchdog_rate_hz'], self._on_watchdog)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Start publishing observations; the robot is held at zero until commands come."""
        result = super().on_activate(state)    # enables the lifecycle publishers
        self.active = True
        self.state = None
        self.previous = None
        self.action = np.zeros(self.act_dim, np.float32)
        self.last_command = -math.inf
        self.episode, self.steps = 0, 0
        self.timeouts = 0
        self._send_zero()
        return result

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Safe stop: zero command (sent before super() disables the publishers)."""
        self.active = False
        self._send_zero()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Destroy what configure created."""
        self.entities.destroy()
        self.task = None
        self.obs_pub = self.step_pub = self.episode_pub = self.cmd_pub = None
        return TransitionCallbackReturn.SUCCESS

    def _on_odometry(self, msg: Odometry):
        if not self.active:
            return
        q = msg.pose.pose.orientation
        state = RobotState(msg.pose.pose.position.x, msg.pose.pose.position.y,
                           yaw_from_quaternion(q.x, q.y, q.z, q.w), msg.twist.twist.linear.x,
                           msg.twist.twist.linear.y, msg.twist.twist.angular.z)
        stamp = stamp_to_ns(msg.header.stamp) or self.get_clock().now().nanoseconds
        obs = self.task.observation(state)
        if self.previous is not None:
            self._publish_step(stamp, obs, state)
        self.state = state
        self.previous = (stamp, obs, state)
        self.obs_pub.publish(joint_state(self.task.names, obs, stamp))

    def _publish_step(self, stamp, obs, state):
        prev_stamp, prev_obs, prev_state = self.previous
        self.steps += 1
        truncated = self.steps >= self.horizon
        self.step_pub.publish(step_msg(Transition(
            stamp_ns=prev_stamp, task=self.cfg['task'], episode=self.episode, step=self.steps,
            reward=self.task.reward(prev_state, state, self.action), cost=self.task.cost(state),
            terminated=False, truncated=truncated, missed=False,
            observation_names=self.task.names, observation=prev_obs, next_observation=obs,
            action=self.action)))
        if truncated:
            self.episode_pub.publish(json_msg({'event': 'end', 'episode': self.episode,
                                               'steps': self.steps}))
            self.episode, self.steps = self.episode + 1, 0

    def _on_final(self, msg: JointState):
        if not self.active:
            return
        action = np.asarray(msg.position, np.float32)
        if action.shape != (self.act_dim,) or not np.isfinite(action).all():
            self.get_logger().error('final action with wrong size or NaN: zero command',
                                    throttle_duration_sec=2.0)
            self._send_zero()
            return
        self.action = np.clip(action, -1.0, 1.0)
        self.last_command = time.monotonic()
        self._send(*self.task.command(self.action, self.state))

    def _on_watchdog(self):
        if self.active and time.monotonic() - self.last_command > self.cfg['command_timeout']:
            if self.action.any():
                self.timeouts += 1
                self.get_logger().warning('no final action within command_timeout: zero command',
                                          throttle_duration_sec=2.0)
            self.action = np.zeros(self.act_dim, np.float32)
            self._send_zero()

    def _send_zero(self):
        self._send(0.0, 0.0, 0.0)

    def _send(self, v_forward: float, v_left: float, yaw_rate: float):
        twist = Twist()
        twist.linear.x, twist.linear.y, twist.angular.z = v_forward, v_left, yaw_rate
        if self.cfg['twist_stamped']:
            msg = TwistStamped(twist=twist)
            msg.header.stamp = ns_to_stamp(self.get_clock().now().nanoseconds)
            msg.header.frame_id = 'base_link'
            self.cmd_pub.publish(msg)
        else:
            self.cmd_pub.publish(twist)


def main(args=None):
    """Console script: robot_adapter_node [--autostart] [--ros-args ...]."""
    sys.exit(run_node(RobotAdapterNode, args))


if __name__ == '__main__':
    main()
