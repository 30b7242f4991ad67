"""
sim_node: a Bullet-Safety-Gym task as a ROS 2 robot.

Publishes the stamped, named observation, one DSRL transition per step and episode events, and
applies the final command. Two timing modes (parameter ``mode``):

- ``lockstep``: the simulator steps when the command answering the current observation arrives
  (its stamp equals the observation's); if none arrives within ``command_timeout`` it applies
  the safe action and counts a miss. Reproducible evaluations: time is the simulation's. A
  simulation clock starts at 0 at configure, advances by the environment's control period
  (``SimEpisodes.dt``) per step and never goes back (not across episodes either); every
  observation, transition and odometry message is stamped with it (``lockstep_time: wall``
  stamps wall time instead).
- ``realtime``: steps at ``rate_hz`` with the latest command (zero-order hold); a command older
  than ``command_timeout`` is replaced by the safe action. What a physical robot does; stamps
  are wall time.

Either way the stamp time is published on ``/clock`` (rosgraph_msgs/Clock, as Gazebo does)
before each observation, so the other nodes run with ``use_sim_time: true`` in both modes. The
node itself never follows ``/clock`` (``use_sim_time: true`` fails configure): it paces itself
with a steady-clock timer and measures latency (observation published -> command received) with
``time.monotonic``.

For Ball and Car it also publishes ``odom`` (nav_msgs/Odometry) and can take ``cmd_vel``
(geometry_msgs/Twist or TwistStamped) instead of the action, so it stands in for a mobile robot
behind robot_adapter_node.
"""

import json
import math
import sys
import time
from typing import Any, Dict, List, Optional

from geometry_msgs.msg import Twist, TwistStamped
from nav_msgs.msg import Odometry
import numpy as np
from rclpy.clock import Clock as RclpyClock, ClockType
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from saferl_interfaces.msg import StepRecord
from saferl_ros import graph
from saferl_ros.nodes.common import (action_names, COMMAND_QOS, ConfigError, ConfiguredEntities,
                                     declare, EPISODE, fail, FINAL, joint_state, json_msg,
                                     ns_to_stamp, OBSERVATION, Param, RECORD_QOS, require_positive,
                                     run_node, SENSOR_QOS, stamp_to_ns, STEP, values)
from saferl_ros.nodes.records import step_msg, Transition
from saferl_ros.observation import parse_task
from saferl_ros.policy_runner import LatencyStats
from saferl_ros.robot_adapter import RobotConfig, RobotTask
from sensor_msgs.msg import JointState
from std_msgs.msg import String

CLOCK = '/clock'
# Reliable keep-last-1: compatible with rclpy's best-effort /clock subscription and with
# reliable ones (rclcpp's, rosbag2's); only the newest time matters.
CLOCK_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                       reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)

PARAMS = [
    Param('task', 'BallCircle', 'Bullet-Safety-Gym task (BallCircle, CarRun, ...).'),
    Param('seed', 0, 'Run seed; episode k starts from episode_seed(seed, k) = 100003 seed + k.'),
    Param('mode', 'lockstep', "'lockstep' (step when the command for the current observation "
          "arrives) or 'realtime' (step at rate_hz with the latest command)."),
    Param('lockstep_time', 'sim', "lockstep: the stamp time. 'sim' (a simulation clock from 0, "
          "the control period per step: reproducible runs) or 'wall' (system time, as in "
          'realtime: the other nodes can stay on wall time, so their watchdogs run while the '
          'loop is silent; not reproducible).'),
    Param('rate_hz', 0.0, 'realtime: step rate [Hz]. lockstep: the most observations per second '
          '(0 = as fast as the loop answers). Range 0-1000.', min_value=0.0, max_value=1000.0),
    Param('command_timeout', 0.5, 'lockstep: wait this long for the command, then apply the safe '
          'action and count a miss. realtime: a command older than this is replaced by the safe '
          'action [s].', min_value=0.0),
    Param('safe_action', [0.0], 'Action applied on a missed or stale command (one value per '
          'action dimension, or a single value for all).'),
    Param('episodes', 0, 'Stop stepping after this many episodes (0 = run until deactivated).'),
    Param('horizon', 0, 'Episode length in steps (0 = the DSRL horizon of the task).'),
    Param('min_subscribers', 1, 'Publish the first observation only when this many subscribers '
          'listen to it (controller + monitor = 2), so no step is lost at start-up.'),
    Param('wait_for_recorder', False, 'Also wait until a recorder subscribes to the step topic.'),
    Param('publish_odometry', True, 'Ball/Car: also publish nav_msgs/Odometry on odom.'),
    Param('publish_loop_topics', True, 'Publish observation, step and episode topics. false: '
          'behave as a bare robot (odom out, cmd_vel in) behind robot_adapter_node.'),
    Param('command_input', 'action', "'action' (JointState on action/final), 'twist' "
          "(geometry_msgs/Twist on cmd_vel) or 'twist_stamped' (TwistStamped on cmd_vel)."),
    Param('max_linear', 0.3, 'Twist input: speed that maps to a full action [m/s].',
          min_value=0.0),
    Param('max_angular', 1.0, 'Twist input: yaw rate that maps to a full action [rad/s].',
          min_value=0.0),
    Param('publish_clock', True, 'Publish the stamp time on /clock before each observation '
          '(lockstep: simulation time, realtime: wall time), so the other nodes can run with '
          'use_sim_time: true. false when another source owns /clock.'),
]


class SimNode(LifecycleNode):
    """The simulator behind the standard robot interface."""

    def __init__(self, name: str = graph.SIM, **kwargs):
        super().__init__(name, **kwargs)
        declare(self, PARAMS)
        self.entities = ConfiguredEntities(self)   # created in configure, gone in cleanup
        self.sim = None
        self.timer = None           # the step timer: created by activate, gone at deactivate
        self.active = False         # set by on_activate, cleared by on_deactivate
        self.done = False
        self.episode_summaries: List[dict] = []
        self.last_error = ''
        self.sim_time_ns = 0        # lockstep: simulation clock [ns]
        self.dt_ns = 0              # lockstep: its advance per step [ns]
        # Set by configure:
        self.cfg: Dict[str, Any] = {}
        self.safe_action: Optional[np.ndarray] = None
        self.robot: Optional[RobotTask] = None
        self.names: List[str] = []
        self.act_names: List[str] = []
        # Lifecycle publishers (silent while inactive); None when the topic is disabled.
        self.obs_pub = self.step_pub = self.episode_pub = None
        self.odom_pub = self.clock_pub = None
        # Reset by activate:
        self.stamp_ns: Optional[int] = None     # stamp of the observation awaiting a command
        self.published_at = 0.0
        self.next_publish = 0.0
        self.pending_obs = False
        self.started = False
        self.command = None                     # realtime: latest (action, receive time)
        self.latency = LatencyStats()
        self.episode_latency = LatencyStats()
        # The same interval in CPU time of this node's thread (time.thread_time): what the
        # thread computed between observation and command. When the controller and the monitor
        # spin on the same thread (saferl-bringup), that is the loop's compute on an idle core,
        # whatever else the machine runs; as its own process, only this node's share.
        self.cpu_latency = LatencyStats()
        self.published_cpu = 0.0
        self.misses = 0
        self.episode_misses = 0
        # realtime stamps: wall time, never the node's clock (that would follow /clock, which
        # this node publishes, if use_sim_time were set after configure)
        self.wall_clock = RclpyClock(clock_type=ClockType.SYSTEM_TIME)

    @property
    def finished(self) -> bool:
        """Return True once the requested episodes are done (its console script then exits)."""
        return self.done

    # -- lifecycle -----------------------------------------------------------------------------

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Validate the parameters, create the simulator, publishers and subscriptions."""
        from saferl_ros.sim import SimEpisodes
        try:
            cfg = values(self, PARAMS)
            if self.get_parameter('use_sim_time').value:
                raise ConfigError('parameter use_sim_time is true; sim_node is the source of '
                                  '/clock and runs on its own clock: set use_sim_time only on '
                                  'the other nodes')
            agent, _ = parse_task(cfg['task'])
            if cfg['mode'] not in ('lockstep', 'realtime'):
                raise ConfigError(f"parameter mode is {cfg['mode']!r}; use 'lockstep' or "
                                  "'realtime'")
            if cfg['mode'] == 'realtime':
                require_positive(cfg, 'rate_hz')
            if cfg['lockstep_time'] not in ('sim', 'wall'):
                raise ConfigError(f"parameter lockstep_time is {cfg['lockstep_time']!r}; use "
                                  "'sim' or 'wall'")
            require_positive(cfg, 'command_timeout')
            if cfg['command_input'] not in ('action', 'twist', 'twist_stamped'):
                raise ConfigError(f"parameter command_input is {cfg['command_input']!r}; use "
                                  "'action', 'twist' or 'twist_stamped'")
            mobile = agent in ('Ball', 'Car')
            if not cfg['publish_loop_topics'] and not (mobile and cfg['publish_odometry']):
                raise ConfigError('publish_loop_topics false needs a mobile agent (Ball/Car) '
                                  'with publish_odometry true: odometry is all it publishes')
            if cfg['command_input'] != 'action' and not mobile:
                raise ConfigError(f"command_input {cfg['command_input']!r} needs a mobile agent "
                                  f'(Ball/Car); {cfg["task"]} takes its action vector')
            self.sim = SimEpisodes(cfg['task'], seed=cfg['seed'], horizon=cfg['horizon'] or None)
            safe = list(cfg['safe_action'])
            if len(safe) == 1:
                safe = safe * self.sim.act_dim
            if len(safe) != self.sim.act_dim or not all(math.isfinite(v) for v in safe):
                raise ConfigError(f'parameter safe_action is {safe}; give {self.sim.act_dim} '
                                  'finite values (or one for all)')
            self.cfg = cfg
            self.dt_ns = int(round(self.sim.dt * 1e9))
            self.sim_time_ns = 0
            safe = np.asarray(safe, np.float32)
            if np.any(safe < self.sim.action_low) or np.any(safe > self.sim.action_high):
                raise ConfigError(f'parameter safe_action is {safe.tolist()}, outside the '
                                  f'action bounds [{self.sim.action_low.tolist()}, '
                                  f'{self.sim.action_high.tolist()}]; give values inside them')
            self.safe_action = safe
            self.robot = RobotTask(RobotConfig(task=cfg['task'], max_linear=cfg['max_linear'],
                                               max_angular=cfg['max_angular'])) if mobile else None
        except Exception as exc:  # any bad parameter or simulator failure fails configure
            if self.sim is not None:
                self.sim.close()
                self.sim = None
            return fail(self, exc)
        self.names = self.sim.channels
        self.act_names = action_names(self.sim.act_dim)
        loop = cfg['publish_loop_topics']
        publisher = self.entities.lifecycle_publisher
        self.obs_pub = publisher(JointState, OBSERVATION, SENSOR_QOS) if loop else None
        self.step_pub = publisher(StepRecord, STEP, RECORD_QOS) if loop else None
        self.episode_pub = publisher(String, EPISODE, RECORD_QOS) if loop else None
        self.odom_pub = publisher(Odometry, 'odom', SENSOR_QOS) \
            if self.robot is not None and cfg['publish_odometry'] else None
        self.clock_pub = publisher(Clock, CLOCK, CLOCK_QOS) if cfg['publish_clock'] else None
        if cfg['command_input'] == 'action':
            self.entities.subscription(JointState, FINAL, self._on_action, COMMAND_QOS)
        elif cfg['command_input'] == 'twist':
            self.entities.subscription(Twist, 'cmd_vel', self._on_twist, COMMAND_QOS)
        else:
            self.entities.subscription(TwistStamped, 'cmd_vel', self._on_twist, COMMAND_QOS)
        self.get_logger().info(f'configured {self.sim.task} ({cfg["mode"]}, horizon '
                               f'{self.sim.horizon}, {cfg["command_input"]} input, '
                               f'{self.sim.dt * 1e3:.1f} ms simulated per step)')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Start the first episode once the subscribers are there, and the step timer."""
        self.active = True
        self.done = False
        self.stamp_ns = None
        self.published_at = 0.0
        self.next_publish = 0.0
        self.pending_obs = False
        self.started = False
        self.command = None
        self.latency = LatencyStats()
        self.episode_latency = LatencyStats()
        self.cpu_latency = LatencyStats()
        self.misses = 0
        self.episode_misses = 0
        period = 1.0 / self.cfg['rate_hz'] if self.cfg['mode'] == 'realtime' else 0.002
        # Steady time, never the node's ROS clock: the pace must not depend on /clock.
        self.timer = self.create_timer(period, self._on_timer,
                                       clock=RclpyClock(clock_type=ClockType.STEADY_TIME))
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop stepping (the robot stands still: nothing more is applied)."""
        self.active = False
        self._stop_timer()
        return super().on_deactivate(state)

    def _stop_timer(self):
        if self.timer is not None:
            self.destroy_timer(self.timer)
            self.timer = None

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Release the simulator and destroy what configure created."""
        self._stop_timer()          # shutdown from active comes here without a deactivate
        self.entities.destroy()
        self.obs_pub = self.step_pub = self.episode_pub = None
        self.odom_pub = self.clock_pub = None
        self.robot = None
        if self.sim is not None:
            self.sim.close()
            self.sim = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        """Release the simulator."""
        return self.on_cleanup(state)

    # -- loop ----------------------------------------------------------------------------------

    def _ready(self) -> bool:
        topic = OBSERVATION if self.cfg['publish_loop_topics'] else 'odom'
        if self.count_subscribers(topic) < self.cfg['min_subscribers']:
            return False
        if self.cfg['wait_for_recorder'] and self.count_subscribers(STEP) < 1:
            return False
        return True

    def _on_timer(self):
        if not self.active or self.done:
            return
        now = time.monotonic()
        if not self.started:
            if not self._ready():
                return
            self.started = True
            self._begin_episode()
            return
        if self.cfg['mode'] == 'realtime':
            action, fresh = self.safe_action, False
            if self.command is not None and now - self.command[1] <= self.cfg['command_timeout']:
                action, fresh = self.command[0], True
            self._step(action, missed=not fresh)
            return
        if self.pending_obs and now >= self.next_publish:
            self._publish_observation()
        elif self.stamp_ns is not None and now - self.published_at > self.cfg['command_timeout']:
            self._step(self.safe_action, missed=True)

    def _on_action(self, msg: JointState):
        action = np.asarray(msg.position, np.float32)
        if action.shape != (self.sim.act_dim,) or not np.isfinite(action).all():
            self.get_logger().error(f'ignoring command with {len(msg.position)} entries or '
                                    f'NaN (expected {self.sim.act_dim} finite values)')
            return
        self._command(action, stamp_to_ns(msg.header.stamp))

    def _on_twist(self, msg):
        twist = msg.twist if isinstance(msg, TwistStamped) else msg
        action = self.robot.action_from_command(twist.linear.x, twist.linear.y, twist.angular.z,
                                                self.sim.robot_state())
        stamp = stamp_to_ns(msg.header.stamp) if isinstance(msg, TwistStamped) else None
        self._command(action, stamp)

    def _command(self, action: np.ndarray, stamp_ns: Optional[int]):
        if not self.active or self.done:
            return
        # Latency on the steady clock (stamps may be simulation time).
        latency = time.monotonic() - self.published_at
        cpu = time.thread_time() - self.published_cpu
        if self.cfg['mode'] == 'realtime':
            self.command = (action, time.monotonic())
            if stamp_ns is not None and stamp_ns == self.stamp_ns:   # answers the latest one
                self.latency.add(latency)
                self.episode_latency.add(latency)
                self.cpu_latency.add(cpu)
            return
        if self.stamp_ns is None or (stamp_ns is not None and stamp_ns != self.stamp_ns):
            return  # answers an older observation (or arrives between steps): not ours
        self.latency.add(latency)
        self.episode_latency.add(latency)
        self.cpu_latency.add(cpu)
        self._step(action, missed=False)

    def _begin_episode(self):
        self.sim.reset()
        self.episode_latency = LatencyStats()
        self.episode_misses = 0
        self._emit(self.episode_pub, json_msg({'event': 'start', 'episode': self.sim.episode,
                                               'task': self.sim.task}))
        self._publish_observation()

    def _now_ns(self) -> int:
        """Return the stamp time: the simulation clock (lockstep) or wall time."""
        if self.cfg['mode'] == 'lockstep' and self.cfg['lockstep_time'] == 'sim':
            return self.sim_time_ns
        return self.wall_clock.now().nanoseconds

    def _publish_observation(self):
        """Publish /clock, then the observation of the current state and odometry, stamped now."""
        self.pending_obs = False
        self.stamp_ns = self._now_ns()
        if self.clock_pub is not None:
            msg = Clock()
            msg.clock = ns_to_stamp(self.stamp_ns)
            self.clock_pub.publish(msg)
        self.published_at = time.monotonic()
        self.published_cpu = time.thread_time()
        self._emit(self.obs_pub, joint_state(self.names, self.sim.observation, self.stamp_ns))
        # Odometry after the observation: building it (two 36-entry covariances) is not on the
        # controller's path when the loop runs on the observation topic.
        if self.odom_pub is not None:
            self.odom_pub.publish(self._odometry(self.stamp_ns))

    @staticmethod
    def _emit(publisher, msg):
        if publisher is not None:   # None: topic disabled (publish_loop_topics false)
            publisher.publish(msg)

    def _odometry(self, stamp_ns: int) -> Odometry:
        state = self.sim.robot_state()
        msg = Odometry()
        msg.header = joint_state([], [], stamp_ns, 'odom').header
        msg.child_frame_id = 'base_link'
        msg.pose.pose.position.x, msg.pose.pose.position.y = state.x, state.y
        msg.pose.pose.orientation.z = math.sin(state.yaw / 2)
        msg.pose.pose.orientation.w = math.cos(state.yaw / 2)
        msg.twist.twist.linear.x, msg.twist.twist.linear.y = state.v_forward, state.v_left
        msg.twist.twist.angular.z = state.yaw_rate
        return msg

    def _step(self, action, missed: bool):
        obs = self.sim.observation
        stamp = self.stamp_ns if self.stamp_ns is not None else self._now_ns()
        self.stamp_ns = None
        applied = np.clip(np.asarray(action, np.float32), self.sim.action_low,
                          self.sim.action_high)
        result = self.sim.step(applied)
        self.sim_time_ns += self.dt_ns      # lockstep time; also after the episode's last step
        self.misses += int(missed)
        self.episode_misses += int(missed)
        self._emit(self.step_pub, step_msg(Transition(
            stamp_ns=stamp, task=self.sim.task, episode=self.sim.episode, step=self.sim.steps,
            reward=result.reward, cost=result.cost, terminated=result.terminated,
            truncated=result.truncated, missed=missed, observation_names=self.names,
            observation=obs, next_observation=result.observation, action=applied)))
        if result.terminated or result.truncated:
            self._end_episode(result.terminated)
            return
        if self.cfg['mode'] == 'realtime':
            self._publish_observation()
            return
        rate = self.cfg['rate_hz']
        if rate > 0:
            self.pending_obs = True
            self.next_publish = self.published_at + 1.0 / rate
        else:
            self._publish_observation()

    def _end_episode(self, terminated: bool):
        from saferl_ros.tasks import normalized_score
        summary = {'event': 'end', 'episode': self.sim.episode, 'task': self.sim.task,
                   'steps': self.sim.steps, 'reward': self.sim.episode_reward,
                   'cost': self.sim.episode_cost, 'terminated': terminated,
                   'missed': self.episode_misses, 'latency': self.episode_latency.summary()}
        try:
            r_norm, c_norm = normalized_score(self.sim.task, summary['reward'], summary['cost'],
                                              kappa=10.0)
            summary.update(normalized_reward=r_norm, normalized_cost_kappa10=c_norm)
        except ImportError:
            pass
        self.episode_summaries.append(summary)
        self._emit(self.episode_pub, json_msg(summary))
        self.get_logger().info('episode ' + json.dumps(
            {k: summary[k] for k in ('episode', 'steps', 'reward', 'cost', 'missed')},
            default=float))
        if self.cfg['episodes'] and len(self.episode_summaries) >= self.cfg['episodes']:
            self.done = True
            self._emit(self.episode_pub, json_msg({'event': 'done',
                                                   'episodes': len(self.episode_summaries)}))
            return
        self._begin_episode()


def main(args=None):
    """Console script: sim_node [--autostart] [--ros-args ...]."""
    sys.exit(run_node(SimNode, args))


if __name__ == '__main__':
    main()
