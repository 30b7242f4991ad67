"""
The differential-drive robot path as real processes over DDS: robot_adapter_node + unicycle_node.

The unicycle stands in for the robot (Twist in, Odometry out); this test process plays the
safety monitor (final actions at 20 Hz), the operator (the latched e-stop topic and the
set_estop service) and the faults (the unicycle's drop_odometry and stamp_offset parameters).
One BallCircle adapter process goes through the scenarios in order: e-stop at start-up, driving
within the speed limits, the fence, odometry loss, clock jumps, the e-stop while driving, a
silent monitor (the command timeout), then SIGINT; a CarRun adapter then drives the same
unicycle.
Bounds are loose on purpose (the machine runs training jobs): a hold must be in force within
1 s, which the 0.3 s timeouts meet with room to spare.
"""

import math
import signal
import time

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from saferl_ros.graph import ROBOT_ADAPTER, UNICYCLE
from saferl_ros.nodes import common
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool
from std_srvs.srv import SetBool
from test_ros_support import domain_fixture, spin_for, spin_until, start_node, stop_nodes

ros_domain = domain_fixture(91)

MAX_LINEAR, MAX_ANGULAR, FENCE = 0.3, 1.0, 0.6
LOGS = {UNICYCLE: 'unicycle.log', ROBOT_ADAPTER: 'adapter.log'}
HOLD_WITHIN = 1.0     # a hold (zero command) must be in force this long after its cause [s]


class Operator(Node):
    """Plays monitor and operator: final actions, e-stop; keeps what the robot side says."""

    def __init__(self):
        super().__init__('robot_test_operator')
        self.cmd, self.odom, self.obs, self.diag = [], [], [], []
        keep = common.RECORD_QOS      # reliable with a queue: the probe sees every command
        self.create_subscription(Twist, common.CMD_VEL,
                                 lambda m: self.cmd.append((time.monotonic(), m)), keep)
        self.create_subscription(Odometry, common.ODOM, self.odom.append, common.SENSOR_QOS)
        self.create_subscription(JointState, common.OBSERVATION, self.obs.append,
                                 common.SENSOR_QOS)
        self.create_subscription(DiagnosticArray, common.DIAGNOSTICS, self._on_diag,
                                 common.DIAGNOSTICS_QOS)
        self.final_pub = self.create_publisher(JointState, common.FINAL, common.COMMAND_QOS)
        self.estop_pub = self.create_publisher(Bool, common.ESTOP, common.ESTOP_QOS)
        self.estop_client = self.create_client(SetBool, f'/{ROBOT_ADAPTER}/set_estop')
        self.unicycle = AsyncParameterClient(self, UNICYCLE)
        self.action = None            # published at 20 Hz while set
        self.create_timer(0.05, self._on_timer)

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.startswith(ROBOT_ADAPTER):
                values = {kv.key: kv.value for kv in status.values}
                self.diag.append((time.monotonic(), status.level[0], status.message, values))

    def _on_timer(self):
        if self.action is not None:
            self.final_pub.publish(common.joint_state(
                ['action_0', 'action_1'], self.action, self.get_clock().now().nanoseconds))

    def commands_since(self, t):
        return [m for at, m in self.cmd if at >= t]

    def state(self):
        return self.diag[-1][2] if self.diag else None

    def driving(self):
        """Return True while commands go out (a fence cut still lets it turn)."""
        return self.state() in ('DRIVING', 'GEOFENCE')


def moving(msgs):
    return [m for m in msgs if (m.linear.x, m.linear.y, m.angular.z) != (0.0, 0.0, 0.0)]


def pose(op):
    p = op.odom[-1].pose.pose.position
    return p.x, p.y


@pytest.fixture(scope='module')
def robot(tmp_path_factory):
    logs = tmp_path_factory.mktemp('robot_logs')
    rclpy.init()
    op = Operator()
    executor = SingleThreadedExecutor()
    executor.add_node(op)
    # A stop published before the adapter exists must hold once it starts (transient local).
    op.estop_pub.publish(Bool(data=True))
    procs = {
        UNICYCLE: start_node(UNICYCLE, {'rate_hz': 50.0, 'command_timeout': 0.5,
                                        'max_linear_accel': 2.0, 'max_angular_accel': 6.0},
                             logs / LOGS[UNICYCLE]),
        # estop_at_start is left at its default (true)
        ROBOT_ADAPTER: start_node(ROBOT_ADAPTER, {
            'task': 'BallCircle', 'drive': 'differential', 'max_linear': MAX_LINEAR,
            'max_angular': MAX_ANGULAR, 'fence_x': FENCE, 'fence_y': FENCE,
            'command_timeout': 0.3, 'odometry_timeout': 0.3, 'max_stamp_skew': 0.5,
            'diagnostics_period': 0.5}, logs / LOGS[ROBOT_ADAPTER]),
    }
    try:
        assert spin_until(executor, lambda: op.odom and op.diag and
                          op.count_subscribers(common.FINAL) >= 1, 60.0), \
            {k: (p.poll(), (logs / LOGS[k]).read_text()[-2000:]) for k, p in procs.items()}
        assert op.unicycle.wait_for_services(10.0)
        yield op, executor, procs, logs
    finally:
        stop_nodes(procs.values())
        executor.remove_node(op)
        op.destroy_node()
        rclpy.try_shutdown()


def set_unicycle(op, executor, **params):
    future = op.unicycle.set_parameters([Parameter(k, value=v) for k, v in params.items()])
    assert spin_until(executor, future.done, 10.0)
    assert all(r.successful for r in future.result().results), future.result()
    return time.monotonic()


def call_estop(op, executor, engage: bool):
    assert op.estop_client.wait_for_service(10.0)
    future = op.estop_client.call_async(SetBool.Request(data=engage))
    assert spin_until(executor, future.done, 10.0)
    return future.result()


def test_estop_at_start_and_latched_then_released_by_each_input(robot):
    op, executor, _, _ = robot
    op.action = [1.0, 0.0]                                # the monitor asks to drive +x
    spin_for(executor, 1.5)
    assert op.cmd and not moving(op.commands_since(0.0)), 'moved while the e-stop was engaged'
    level, message, values = op.diag[-1][1:]
    assert (level, message) == (2, 'ESTOP') and values['reason'].startswith('e-stop')
    assert 'start-up' in values['estop_inputs'] and 'topic /estop' in values['estop_inputs']
    assert abs(pose(op)[0]) < 1e-6
    # The service releases its own stop and the start-up latch; the topic's stop stays.
    response = call_estop(op, executor, False)
    assert response.success and response.message.startswith('engaged')
    spin_for(executor, 1.0)
    assert op.diag[-1][3]['estop_inputs'] == 'topic /estop'
    assert not moving(op.commands_since(0.0))
    released = time.monotonic()
    op.estop_pub.publish(Bool(data=False))
    assert spin_until(executor, lambda: moving(op.commands_since(released)), 5.0)
    assert spin_until(executor, lambda: op.state() in ('DRIVING', 'GEOFENCE'), 5.0)


def test_commands_move_the_unicycle_within_the_limits_and_the_fence_stops_it(robot):
    op, executor, _, _ = robot
    start = time.monotonic()
    op.action = [1.0, 0.0]
    # driving +x: the unicycle moves, then the fence at 0.6 m cuts the forward speed
    assert spin_until(executor, lambda: op.state() == 'GEOFENCE', 20.0), op.diag[-3:]
    spin_for(executor, 1.5)
    sent = op.commands_since(start)
    assert moving(sent)
    assert max(abs(m.linear.x) for m in sent) <= MAX_LINEAR + 1e-9
    assert max(abs(m.angular.z) for m in sent) <= MAX_ANGULAR + 1e-9
    assert all(m.linear.y == 0.0 for m in sent)           # differential: never sideways
    x, _ = pose(op)
    assert FENCE - 0.05 <= x <= FENCE + 0.1, x            # stopped at the fence
    assert max(m.twist.twist.linear.x for m in op.odom) <= MAX_LINEAR + 1e-6
    assert op.commands_since(time.monotonic() - 0.5)[-1].linear.x == 0.0
    # driving back inwards is never cut: the base backs up towards -x
    back = time.monotonic()
    op.action = [-1.0, 0.0]
    assert spin_until(executor, lambda: pose(op)[0] < FENCE - 0.2, 10.0), pose(op)
    assert all(m.linear.x <= 0.0 for m in moving(op.commands_since(back + 0.3)))


def test_odometry_loss_stops_the_robot_and_it_recovers(robot):
    op, executor, _, _ = robot
    op.action = [0.3, 0.3]                                # slowly, inside the fence
    assert spin_until(executor, op.driving, 10.0), op.diag[-3:]
    dropped = set_unicycle(op, executor, drop_odometry=True)
    assert spin_until(executor, lambda: op.state() == 'NO_ODOMETRY', 5.0), op.diag[-3:]
    spin_for(executor, 1.0)
    late = op.commands_since(dropped + HOLD_WITHIN)
    assert late and not moving(late), 'commands went on without odometry'
    assert op.diag[-1][1] == 2 and 'no odometry' in op.diag[-1][3]['reason']
    restored = set_unicycle(op, executor, drop_odometry=False)
    assert spin_until(executor, lambda: moving(op.commands_since(restored)), 5.0)
    assert spin_until(executor, op.driving, 5.0), op.diag[-3:]


def test_clock_jumps_in_odometry_stamps_hold_the_robot(robot):
    op, executor, _, _ = robot
    op.action = [-0.3, -0.3]
    assert spin_until(executor, op.driving, 10.0), op.diag[-3:]
    observations = len(op.obs)
    jumped = set_unicycle(op, executor, stamp_offset=3600.0)    # robot clock an hour ahead
    assert spin_until(executor, lambda: op.state() == 'CLOCK', 5.0), op.diag[-3:]
    spin_for(executor, 1.0)
    set_unicycle(op, executor, stamp_offset=-10.0)              # and 10 s behind
    spin_for(executor, 1.0)
    assert op.state() == 'CLOCK' and op.diag[-1][1] == 2
    late = op.commands_since(jumped + HOLD_WITHIN)
    assert late and not moving(late), 'a command went out on odometry with a jumped clock'
    # no observation with a jumped stamp reached the monitor's side
    now = op.get_clock().now().nanoseconds
    stamps = [common.stamp_to_ns(m.header.stamp) for m in op.obs[observations:]]
    assert all(abs(now - s) < 5e9 for s in stamps)
    restored = set_unicycle(op, executor, stamp_offset=0.0)
    assert spin_until(executor, lambda: moving(op.commands_since(restored)), 5.0)
    assert spin_until(executor, op.driving, 5.0), op.diag[-3:]


def test_estop_while_driving_holds_until_released(robot):
    op, executor, _, _ = robot
    op.action = [0.3, -0.3]
    assert spin_until(executor, op.driving, 10.0), op.diag[-3:]
    engaged = time.monotonic()
    op.estop_pub.publish(Bool(data=True))
    assert spin_until(executor, lambda: op.state() == 'ESTOP', 5.0), op.diag[-3:]
    spin_for(executor, 2.0)                               # far past every timeout: still held
    late = op.commands_since(engaged + HOLD_WITHIN)
    assert late and not moving(late)
    assert op.diag[-1][1] == 2 and op.diag[-1][3]['reason'].startswith('e-stop')
    odom_v = [abs(m.twist.twist.linear.x) for m in op.odom[-5:]]
    assert max(odom_v) < 1e-6, odom_v                     # the base stopped
    released = time.monotonic()
    op.estop_pub.publish(Bool(data=False))
    assert spin_until(executor, lambda: moving(op.commands_since(released)), 5.0)


def test_a_silent_monitor_times_out_to_zero_commands_and_driving_resumes(robot):
    op, executor, _, _ = robot
    op.action = [0.3, 0.3]
    assert spin_until(executor, op.driving, 10.0), op.diag[-3:]
    silent = time.monotonic()
    op.action = None                                      # no final action from here
    assert spin_until(executor, lambda: op.state() == 'TIMEOUT', 5.0), op.diag[-3:]
    spin_for(executor, 1.0)
    late = op.commands_since(silent + HOLD_WITHIN)
    assert late and not moving(late), 'commands went on without final actions'
    level, _, values = op.diag[-1][1:]
    assert level == 1 and values['reason'].startswith('no final action')
    assert int(values['timeouts']) >= 1
    assert spin_until(executor, lambda: abs(op.odom[-1].twist.twist.linear.x) < 1e-6, 5.0)
    resumed = time.monotonic()
    op.action = [0.3, 0.3]
    assert spin_until(executor, lambda: moving(op.commands_since(resumed)), 5.0)
    assert spin_until(executor, op.driving, 5.0), op.diag[-3:]


def test_sigint_of_the_adapter_sends_a_last_zero_and_exits_0(robot):
    op, executor, procs, logs = robot
    op.action = [0.3, 0.0]
    assert spin_until(executor, lambda: moving(op.commands_since(time.monotonic() - 0.2)),
                      10.0)
    op.action = None                                      # no more final actions from here
    procs[ROBOT_ADAPTER].send_signal(signal.SIGINT)
    assert procs[ROBOT_ADAPTER].wait(20) == 0
    spin_for(executor, 0.5)
    last = op.cmd[-1][1]
    assert (last.linear.x, last.linear.y, last.angular.z) == (0.0, 0.0, 0.0)
    text = (logs / LOGS[ROBOT_ADAPTER]).read_text()
    assert 'SIGINT: stopping' in text and 'Traceback' not in text, text[-2000:]
    # the unicycle, now without commands, stops (and stays within its limits)
    assert spin_until(executor, lambda: abs(op.odom[-1].twist.twist.linear.x) < 1e-6, 5.0)
    assert not math.isnan(pose(op)[0])


def test_a_car_run_adapter_drives_the_unicycle_in_v_and_w(robot):
    """CarRun: a0, a1 -> v = -a0 max_linear, w = -a1 max_angular, as the simulator's car."""
    op, executor, procs, logs = robot
    assert procs[ROBOT_ADAPTER].poll() is not None           # the BallCircle adapter is gone
    procs['car_adapter'] = start_node(ROBOT_ADAPTER, {
        'task': 'CarRun', 'max_linear': MAX_LINEAR, 'max_angular': MAX_ANGULAR,
        'fence_x': 5.0, 'estop_at_start': False}, logs / 'car_adapter.log')
    op.action = [-0.5, -0.5]
    started = time.monotonic()
    assert spin_until(executor, lambda: moving(op.commands_since(started)), 60.0), \
        (logs / 'car_adapter.log').read_text()[-2000:]
    spin_for(executor, 1.0)
    sent = moving(op.commands_since(started))
    assert {(m.linear.x, m.linear.y, m.angular.z) for m in sent} == \
        {(0.5 * MAX_LINEAR, 0.0, 0.5 * MAX_ANGULAR)}
    twist = op.odom[-1].twist.twist
    assert (twist.linear.x, twist.angular.z) == pytest.approx((0.15, 0.5), abs=1e-6)
    op.action = None
    procs['car_adapter'].send_signal(signal.SIGTERM)
    assert procs['car_adapter'].wait(20) == 0
