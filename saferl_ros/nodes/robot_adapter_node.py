"""
robot_adapter_node: a mobile robot (nav_msgs/Odometry in, Twist out) as a Ball/Car task.

Turns each odometry message into the observation the simulator task would produce (named,
stamped with the odometry's stamp), publishes one DSRL transition per control step (reward and
geofence cost computed from the pose, so robot runs become offline data), and turns the final
action into a velocity command for a differential-drive (or holonomic) base within the speed
limits and the hard fence (saferl_ros.robot_adapter). Behind the monitor it is the on-robot
guard (saferl_ros.robot_guard): an explicit zero command while the e-stop is engaged (``estop``
topic, latched, or the ``set_estop`` service), while odometry is missing or its clock jumped, and
when no final action arrived within ``command_timeout``. Its state is on /diagnostics.
"""

import sys
import time
from typing import Any, Dict, Optional, Set, Tuple

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
import numpy as np
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from saferl_interfaces.msg import StepRecord
from saferl_ros import graph
from saferl_ros.nodes.common import (CMD_VEL, COMMAND_QOS, ConfiguredEntities, declare,
                                     diagnostic, diagnostic_array, DIAGNOSTICS, DIAGNOSTICS_QOS,
                                     EPISODE, ESTOP, ESTOP_QOS, fail, FINAL, joint_state,
                                     json_msg, ns_to_stamp, OBSERVATION, ODOM, Param,
                                     RECORD_QOS, run_node, SENSOR_QOS, SET_ESTOP,
                                     stamp_to_ns, STEP, values)
from saferl_ros.nodes.records import step_msg, Transition
from saferl_ros.robot_adapter import (DRIVES, RobotConfig, RobotState, RobotTask,
                                      yaw_from_quaternion)
from saferl_ros.robot_guard import (ESTOP as ESTOP_STATE, GuardConfig, INACTIVE, LEVEL,
                                    RobotGuard, STARTUP)
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import SetBool

PARAMS = [
    Param('task', 'BallCircle', 'Ball/Car task whose observation the robot imitates.'),
    Param('drive', 'differential', "Base kinematics: 'differential' (Twist linear.x and "
          "angular.z only; a Ball action becomes drive-and-turn) or 'holonomic' (Ball: "
          'linear.x and linear.y). Car tasks are (v, w) either way.'),
    Param('heading_gain', 2.0, 'Differential Ball: yaw rate per radian of heading error [1/s].',
          min_value=0.0),
    Param('position_scale', 1.0, 'Simulator metres per robot metre.', min_value=0.0),
    Param('velocity_scale', 1.0, 'Simulator m/s per robot m/s.', min_value=0.0),
    Param('max_linear', 0.3, 'Speed limit of the command [m/s]; a full action maps to it.',
          min_value=0.0),
    Param('max_angular', 1.0, 'Yaw-rate limit of the command [rad/s].', min_value=0.0),
    Param('command_timeout', 0.5, 'No final action for this long -> zero command [s].',
          min_value=0.0),
    Param('odometry_timeout', 0.5, 'No odometry for this long -> zero command [s].',
          min_value=0.0),
    Param('max_stamp_skew', 1.0, 'Odometry whose stamp is further than this from the adapter '
          'clock, or goes backwards, is refused and holds the robot at zero [s] (inf: no '
          'skew check).', min_value=0.0),
    Param('x_limit', 0.0, 'Geofence |x| limit of the cost in simulator metres (0: the task '
          'rule; inf: none).', min_value=0.0),
    Param('y_limit', 0.0, 'Geofence |y| limit of the cost in simulator metres (0: the task '
          'rule; inf: none).', min_value=0.0),
    Param('fence_x', 0.0, 'Hard fence |x| in robot metres (odom frame): outward motion is '
          'cut there (0: x_limit / position_scale; inf: none).', min_value=0.0),
    Param('fence_y', 0.0, 'Hard fence |y| in robot metres (odom frame): outward motion is '
          'cut there (0: y_limit / position_scale; inf: none).', min_value=0.0),
    Param('estop_at_start', True, 'Start with the e-stop engaged: nothing moves until a '
          'release (false on estop, or set_estop false).'),
    Param('horizon', 0, 'Steps per recorded episode (0 = the DSRL horizon of the task).',
          min_value=0),
    Param('twist_stamped', False, 'Publish geometry_msgs/TwistStamped instead of Twist.'),
    Param('watchdog_rate_hz', 20.0, 'How often the command timeout is checked [Hz].',
          min_value=1.0, max_value=1000.0),
    Param('diagnostics_period', 1.0, 'Publish /diagnostics at least this often (and on every '
          'change of state) [s] (0: on a change of state only).', min_value=0.0),
]


class RobotAdapterNode(LifecycleNode):
    """Odometry -> observation, final action -> guarded velocity command."""

    def __init__(self, name: str = graph.ROBOT_ADAPTER, **kwargs):
        super().__init__(name, **kwargs)
        declare(self, PARAMS)
        self.entities = ConfiguredEntities(self)   # created in configure, gone in cleanup
        self.active = False            # set by on_activate, cleared by on_deactivate
        self.last_error = ''
        self.act_dim = 2
        # Set by configure (the guard keeps the e-stop across activations):
        self.cfg: Dict[str, Any] = {}
        self.task: Optional[RobotTask] = None
        self.guard: Optional[RobotGuard] = None
        # The inputs holding the e-stop when cleanup destroyed the guard: the next guard starts
        # with them (only an explicit release clears a stop).
        self.held_estops: Set[str] = set()
        self.horizon = 0
        # Lifecycle publishers: silent while inactive (activate and deactivate send their zero
        # command while they are enabled). Diagnostics: a plain publisher, also while inactive.
        self.obs_pub = self.step_pub = self.episode_pub = self.cmd_pub = None
        self.diag_pub = None
        # Reset by activate:
        self.previous = None            # (stamp, observation, state) of the last observation
        self.applied = np.zeros(self.act_dim, np.float32)   # action of the last command out
        self.status: Optional[Tuple[str, str]] = None   # (state, reason) on /diagnostics
        self.episode, self.steps = 0, 0

    @property
    def timeouts(self) -> int:
        """Return how often commands stopped while driving (the command timeout fired)."""
        return self.guard.counts['timeouts'] if self.guard is not None else 0

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Validate the parameters; create publishers, subscriptions, the service and timers."""
        from saferl_ros.tasks import get_task
        try:
            cfg = values(self, PARAMS)
            if cfg['drive'] not in DRIVES:
                raise ValueError(f"parameter drive is {cfg['drive']!r}; choose one of {DRIVES}")
            self.task = RobotTask(RobotConfig(
                task=cfg['task'], position_scale=cfg['position_scale'],
                velocity_scale=cfg['velocity_scale'], max_linear=cfg['max_linear'],
                max_angular=cfg['max_angular'], command_timeout=cfg['command_timeout'],
                x_limit=cfg['x_limit'] or None, y_limit=cfg['y_limit'] or None,
                drive=cfg['drive'], heading_gain=cfg['heading_gain'],
                fence_x=cfg['fence_x'] or None, fence_y=cfg['fence_y'] or None))
            self.guard = RobotGuard(self.task, GuardConfig(
                command_timeout=cfg['command_timeout'], odometry_timeout=cfg['odometry_timeout'],
                max_stamp_skew=cfg['max_stamp_skew'], estop_at_start=cfg['estop_at_start']),
                self.act_dim, estops=self.held_estops)
            self.horizon = cfg['horizon'] or get_task(cfg['task']).horizon
        except Exception as exc:  # RobotConfigError, unknown task
            return fail(self, exc)
        self.cfg = cfg
        if self.task.unfenced():
            self.get_logger().warning(
                f'no hard fence on {self.task.unfenced()} (the {cfg["task"]} boundary does not '
                'bound it): on a robot set fence_x and fence_y (docs/robot.md, step 3)')
        self.obs_pub = self.entities.lifecycle_publisher(JointState, OBSERVATION, SENSOR_QOS)
        self.step_pub = self.entities.lifecycle_publisher(StepRecord, STEP, RECORD_QOS)
        self.episode_pub = self.entities.lifecycle_publisher(String, EPISODE, RECORD_QOS)
        self.cmd_pub = self.entities.lifecycle_publisher(
            TwistStamped if cfg['twist_stamped'] else Twist, CMD_VEL, COMMAND_QOS)
        self.diag_pub = self.entities.publisher(DiagnosticArray, DIAGNOSTICS, DIAGNOSTICS_QOS)
        self.entities.subscription(Odometry, ODOM, self._on_odometry, SENSOR_QOS)
        self.entities.subscription(JointState, FINAL, self._on_final, COMMAND_QOS)
        self.entities.subscription(Bool, ESTOP, self._on_estop_topic, ESTOP_QOS)
        self.entities.service(SetBool, SET_ESTOP, self._on_estop_service)
        self.entities.timer(1.0 / cfg['watchdog_rate_hz'], self._on_watchdog)
        if cfg['diagnostics_period'] > 0:
            self.entities.timer(cfg['diagnostics_period'], self._publish_diagnostics)
        self.status = None
        self._update()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Start publishing observations; the robot is held at zero until commands come."""
        result = super().on_activate(state)    # enables the lifecycle publishers
        self.active = True
        self.guard.reset()
        self.previous = None
        self.applied = np.zeros(self.act_dim, np.float32)
        self.episode, self.steps = 0, 0
        self._send_zero()
        self._update()
        return result

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Safe stop: zero command (sent before super() disables the publishers)."""
        self.active = False
        self._send_zero()
        self._update()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Destroy what configure created (the e-stop inputs holding it are kept)."""
        self.entities.destroy()
        self.held_estops = self.guard.estops - {STARTUP} if self.guard is not None else set()
        self.task = self.guard = self.status = None
        self.obs_pub = self.step_pub = self.episode_pub = self.cmd_pub = self.diag_pub = None
        return TransitionCallbackReturn.SUCCESS

    def _on_odometry(self, msg: Odometry):
        if not self.active:
            return
        q = msg.pose.pose.orientation
        state = RobotState(msg.pose.pose.position.x, msg.pose.pose.position.y,
                           yaw_from_quaternion(q.x, q.y, q.z, q.w), msg.twist.twist.linear.x,
                           msg.twist.twist.linear.y, msg.twist.twist.angular.z)
        now = self.get_clock().now().nanoseconds
        stamp = stamp_to_ns(msg.header.stamp) or now
        refused = self.guard.odometry(state, stamp, now, time.monotonic())
        if refused:
            self.get_logger().error(f'{refused}: zero command', throttle_duration_sec=2.0)
            self._update()
            return
        obs = self.task.observation(state)
        if self.previous is not None:
            self._publish_step(stamp, obs, state)
        self.previous = (stamp, obs, state)
        self.obs_pub.publish(joint_state(self.task.names, obs, stamp))

    def _publish_step(self, stamp, obs, state):
        prev_stamp, prev_obs, prev_state = self.previous
        self.steps += 1
        truncated = self.steps >= self.horizon
        self.step_pub.publish(step_msg(Transition(
            stamp_ns=prev_stamp, task=self.cfg['task'], episode=self.episode, step=self.steps,
            reward=self.task.reward(prev_state, state, self.applied),
            cost=self.task.cost(state), terminated=False, truncated=truncated, missed=False,
            observation_names=self.task.names, observation=prev_obs, next_observation=obs,
            action=self.applied)))
        if truncated:
            self.episode_pub.publish(json_msg({'event': 'end', 'episode': self.episode,
                                               'steps': self.steps}))
            self.episode, self.steps = self.episode + 1, 0

    def _on_final(self, msg: JointState):
        if not self.active:
            return
        if not self.guard.final_action(msg.position, time.monotonic()):
            self.get_logger().error('final action with wrong size or NaN: zero command',
                                    throttle_duration_sec=2.0)
        self._update(send=True)

    def _on_estop_topic(self, msg: Bool):
        self._estop(bool(msg.data), 'topic ' + self.resolve_topic_name(ESTOP))

    def _on_estop_service(self, request, response):
        changed = self._estop(bool(request.data), 'service ' +
                              self.resolve_service_name(SET_ESTOP))
        response.success = True
        response.message = ('engaged' if self.guard.engaged else 'released') + (
            '' if changed else ' (unchanged)')
        return response

    def _estop(self, engaged: bool, source: str) -> bool:
        """Engage or release from ``source``; zero command at once when engaged."""
        if self.guard is None:
            return False
        changed = self.guard.estop(engaged, source)
        # rclpy refuses two severities from one logging call site: one call per severity.
        if changed and engaged:
            self.get_logger().error(f'e-stop engaged by {source}')
        elif changed:
            self.get_logger().warning(f'e-stop released by {source}')
        elif not engaged and self.guard.engaged:
            self.get_logger().warning(f'e-stop release by {source}: still engaged by '
                                      f'{sorted(self.guard.estops)}')
        if engaged and self.active:
            self._send_zero()
        self._update()
        return changed

    def _on_watchdog(self):
        if self.active:
            self._update()

    def _update(self, send: bool = False):
        """
        Decide; send the command if a final action asked for it or if it is a hold at zero.

        The guard's holds (e-stop, no odometry, clock, timeout) and fence cuts go out at every
        watchdog tick; a driving command goes out once per final action. A change of state is
        published on /diagnostics at once.
        """
        if self.active:
            decision = self.guard.decide(time.monotonic())
            if send or decision.resent:
                self.applied = decision.action
                self._send(*decision.command)
            state, reason = decision.state, decision.reason
        elif self.guard is not None and self.guard.engaged:
            state, reason = ESTOP_STATE, self.guard.estop_reason()
        else:
            state, reason = INACTIVE, 'inactive'
        changed = self.status is None or self.status[0] != state
        self.status = (state, reason)
        if changed:
            self._publish_diagnostics()

    def _publish_diagnostics(self):
        if self.diag_pub is None or self.guard is None:
            return
        guard = self.guard
        state, reason = self.status or (INACTIVE, 'configured')
        status = diagnostic(
            f'{self.get_name()}: robot adapter', LEVEL[state], state,
            {'reason': reason, 'estop': 'engaged' if guard.engaged else 'released',
             'estop_inputs': ', '.join(sorted(guard.estops)),
             'odometry_age_s': time.monotonic() - guard.odometry_at,
             'drive': self.cfg['drive'], 'max_linear': self.cfg['max_linear'],
             'max_angular': self.cfg['max_angular'], 'fence_x': self.task.fence[0],
             'fence_y': self.task.fence[1], **guard.counts})
        self.diag_pub.publish(diagnostic_array(self, [status]))

    def _send_zero(self):
        self.applied = np.zeros(self.act_dim, np.float32)
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
