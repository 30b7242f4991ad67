"""The robot adapter's guard and the unicycle stand-in, without ROS (saferl_ros.robot_guard)."""

import math

import numpy as np
import pytest
from saferl_ros.robot_adapter import RobotConfig, RobotConfigError, RobotState, RobotTask
from saferl_ros.robot_guard import (CLOCK, DRIVING, ESTOP, GEOFENCE, GuardConfig, NO_ODOMETRY,
                                    RobotGuard, STARTUP, TIMEOUT)
from saferl_ros.unicycle import Unicycle, UnicycleLimits

S = 1_000_000_000   # ns per s


def guard(**kwargs):
    task = RobotTask(RobotConfig(task='CarCircle', max_linear=0.5, max_angular=1.0,
                                 fence_x=2.0))
    return RobotGuard(task, GuardConfig(**{'estop_at_start': False, **kwargs}))


def drive(g, t, x=0.0, stamp=None):
    """Feed odometry at time t (stamp = t unless given) and a full-forward action."""
    why = g.odometry(RobotState(x, 0.0, 0.0), int((t if stamp is None else stamp) * S),
                     int(t * S), t)
    g.final_action([-1.0, 0.0], t)
    return why, g.decide(t)


def test_driving_timeout_and_odometry_loss():
    g = guard(command_timeout=0.3, odometry_timeout=0.4)
    assert g.decide(0.0).state == NO_ODOMETRY
    why, d = drive(g, 1.0)
    assert why == '' and d.state == DRIVING and d.command == (0.5, 0.0, 0.0)
    assert g.decide(1.25).state == DRIVING
    d = g.decide(1.35)                                   # no final action for 0.35 s
    assert d.state == TIMEOUT and d.command == (0, 0, 0) and not d.action.any()
    assert g.counts['timeouts'] == 1
    g.final_action([-1.0, 0.0], 1.45)                     # actions, but odometry stopped at 1.0
    assert g.decide(1.45).state == NO_ODOMETRY and g.decide(1.45).command == (0, 0, 0)
    assert drive(g, 1.6)[1].state == DRIVING              # odometry back: driving again


def test_clock_jumps_hold_the_robot_until_stamps_agree():
    g = guard(max_stamp_skew=0.5)
    assert drive(g, 1.0)[1].state == DRIVING
    why, d = drive(g, 1.02, stamp=1.02 + 3600.0)          # robot clock jumped an hour ahead
    assert 'from the adapter clock' in why and d.state == CLOCK and d.command == (0, 0, 0)
    assert g.state.x == 0.0                               # the refused pose is not used
    why, d = drive(g, 1.04, stamp=1.04)                   # back again: stamp went backwards
    assert 'went back' in why and d.state == CLOCK
    why, d = drive(g, 1.06, stamp=1.06)                   # consistent again
    assert why == '' and d.state == DRIVING
    why, d = drive(g, 1.08, stamp=1.08 - 10.0)            # jump back 10 s
    assert d.state == CLOCK and g.counts['odometry_refused'] == 3
    # an unbounded skew (inf) still refuses stamps that go backwards
    g = guard(max_stamp_skew=math.inf)
    assert drive(g, 1.0, stamp=500.0)[1].state == DRIVING
    assert drive(g, 1.1, stamp=499.0)[1].state == CLOCK


def test_estop_holds_until_each_input_releases_it():
    g = guard()
    assert drive(g, 1.0)[1].state == DRIVING
    assert g.estop(True, 'topic')
    d = drive(g, 1.02)[1]
    assert d.state == ESTOP and d.command == (0, 0, 0) and d.reason.startswith('e-stop')
    assert not g.estop(True, 'service') and g.estop(True, 'topic') is False
    g.estop(False, 'service')                             # the service's own stop only
    assert drive(g, 1.04)[1].state == ESTOP and 'topic' in g.estop_reason()
    assert drive(g, 100.0)[1].state == ESTOP              # no timeout releases it
    assert g.estop(False, 'topic')
    assert drive(g, 100.02)[1].state == DRIVING
    assert g.counts['estop_engaged'] == 1 and g.counts['estop_released'] == 1


def test_estop_engaged_at_start_until_an_explicit_release():
    g = guard(estop_at_start=True)
    assert g.engaged and g.estops == {STARTUP}
    assert drive(g, 1.0)[1].state == ESTOP
    g.estop(False, 'topic')                               # any explicit release clears it
    assert drive(g, 1.02)[1].state == DRIVING
    g.reset()                                             # activation keeps the e-stop state
    g.estop(True, 'topic')
    g.reset()
    assert g.engaged
    # a guard that replaces this one (cleanup + configure) starts with its stops
    g2 = RobotGuard(g.task, GuardConfig(estop_at_start=False), estops=g.estops - {STARTUP})
    assert g2.estops == {'topic'} and drive(g2, 2.0)[1].state == ESTOP
    g2.estop(False, 'topic')
    assert drive(g2, 2.02)[1].state == DRIVING


def test_fence_and_bad_actions():
    g = guard()
    why, d = drive(g, 1.0, x=2.05)
    assert d.state == GEOFENCE and d.command == (0.0, 0.0, 0.0)
    assert g.counts['fence_cuts'] == 1
    # what is recorded is what the cut command applies: no forward motion, not the policy's -1
    np.testing.assert_array_equal(d.action, [0.0, 0.0])
    # the cut goes out at every watchdog tick (the robot may reach the fence between actions)
    assert d.resent
    inside = drive(g, 1.01, x=1.0)[1]
    np.testing.assert_array_equal(inside.action, [-1.0, 0.0])
    assert inside.state == DRIVING and not inside.resent
    g.odometry(RobotState(1.0, 0.0, 0.0), int(1.02 * S), int(1.02 * S), 1.02)
    assert not g.final_action([math.nan, 0.0], 1.02)
    assert g.decide(1.02).state == TIMEOUT                 # a malformed action is no action
    assert not g.final_action([0.1, 0.2, 0.3], 1.03)
    with pytest.raises(RobotConfigError, match='odometry_timeout'):
        guard(odometry_timeout=0.0)
    # a robot that never stops when odometry or commands stop is refused; no clock check is not
    for name in ('odometry_timeout', 'command_timeout'):
        with pytest.raises(RobotConfigError, match=f'{name}.*finite'):
            guard(**{name: math.inf})
    guard(max_stamp_skew=math.inf)


def test_unicycle_integrates_arcs_within_its_limits():
    u = Unicycle()
    for _ in range(100):
        u.step(0.5, 0.0, 0.01)
    assert (u.x, u.y) == pytest.approx((0.5, 0.0))
    u = Unicycle()
    for _ in range(1000):                                 # a full circle of radius 0.5
        u.step(0.5 * math.pi / 5, math.pi / 5, 0.01)
    assert (u.x, u.y, u.yaw) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
    u = Unicycle(limits=UnicycleLimits(max_linear=0.2, max_linear_accel=1.0))
    u.step(1.0, 0.0, 0.1)
    assert u.v == pytest.approx(0.1)                      # acceleration limit
    for _ in range(10):
        u.step(1.0, 0.0, 0.1)
    assert u.v == pytest.approx(0.2)                      # speed limit
    u.step(math.nan, math.inf, 0.1)                       # non-finite: a stop command
    assert u.v == pytest.approx(0.1) and u.w == 0.0
    with pytest.raises(ValueError, match='max_angular'):
        Unicycle(limits=UnicycleLimits(max_angular=-1.0))
    assert np.allclose(Unicycle(yaw=math.pi / 2).quaternion(),
                       (0, 0, math.sqrt(0.5), math.sqrt(0.5)))
