"""Robot observation builder against the real simulator (same vector, cost and reward)."""

import math

import numpy as np
import pytest
from saferl_ros.robot_adapter import (RobotConfig, RobotConfigError, RobotState, RobotTask,
                                      yaw_from_quaternion)
from saferl_ros.sim import SimEpisodes


def robot_state_of(agent, car: bool) -> RobotState:
    x, y, _ = agent.get_position()
    vx, vy, _ = agent.get_linear_velocity()
    yaw = agent.get_orientation()[2] - (math.pi if car else 0.0)
    return RobotState.from_world_velocity(x, y, yaw, vx, vy, agent.get_angular_velocity()[2])


@pytest.mark.parametrize('task', ['BallCircle', 'CarCircle', 'BallRun', 'CarRun'])
def test_observation_cost_and_reward_match_the_simulator(task):
    sim = SimEpisodes(task, seed=1)
    robot = RobotTask(RobotConfig(task=task))
    sim.reset()
    rng = np.random.default_rng(0)
    car = task.startswith('Car')
    previous = robot_state_of(sim.env.unwrapped.agent, car)
    for t in range(40):
        action = rng.uniform(-1, 1, 2)
        result = sim.step(action)
        state = robot_state_of(sim.env.unwrapped.agent, car)
        obs = robot.observation(state)
        # Odometry cannot see the Ball's spin: the adapter derives wx, wy from rolling without
        # slipping, which the simulated ball only approximates under random forces. Every other
        # channel must match exactly.
        exact = [i for i, n in enumerate(robot.names) if not (not car and n in ('wx', 'wy'))]
        np.testing.assert_allclose(obs[exact], result.observation[exact], atol=2e-4,
                                   err_msg=f'{task} step {t}: {robot.names}')
        assert robot.cost(state) == result.cost
        if task.endswith('Circle'):
            assert robot.reward(previous, state, action) == pytest.approx(result.reward,
                                                                          abs=2e-3)
        previous = state
    sim.close()


def test_geofence_and_commands():
    robot = RobotTask(RobotConfig(task='BallCircle', position_scale=2.0, max_linear=0.5,
                                  drive='holonomic'))
    assert robot.cost(RobotState(2.9, 0.0, 0.0)) == 0.0
    assert robot.cost(RobotState(3.1, 0.0, 0.0)) == 1.0       # 6.2 m in simulator units
    v_fwd, v_left, w = robot.command([1.0, 1.0], RobotState(0, 0, math.pi / 2))
    assert math.hypot(v_fwd, v_left) == pytest.approx(0.5)    # speed limit on the norm
    assert w == 0.0
    car = RobotTask(RobotConfig(task='CarRun', max_linear=0.4, max_angular=0.8))
    assert car.command([-1.0, 0.5], None) == (0.4, 0.0, -0.4)
    assert car.cost(RobotState(0, 2.5, 0)) == 1.0
    assert car.cost(RobotState(0, 0, 0, v_forward=1.6)) == 1.0


def test_bad_configs_and_quaternion():
    with pytest.raises(RobotConfigError, match='mobile agents'):
        RobotTask(RobotConfig(task='AntRun'))
    with pytest.raises(RobotConfigError, match='max_linear'):
        RobotTask(RobotConfig(max_linear=0.0))
    with pytest.raises(RobotConfigError, match="drive is 'tank'"):
        RobotTask(RobotConfig(drive='tank'))
    with pytest.raises(RobotConfigError, match='fence_x'):
        RobotTask(RobotConfig(fence_x=0.0))
    with pytest.raises(RobotConfigError, match='y_limit'):
        RobotTask(RobotConfig(y_limit=-1.0))
    s, c = math.sin(0.35), math.cos(0.35)
    assert yaw_from_quaternion(0, 0, s, c) == pytest.approx(0.7)


def test_differential_ball_drives_along_the_action_and_turns_towards_it():
    robot = RobotTask(RobotConfig(task='BallCircle', max_linear=0.4, max_angular=2.0,
                                  heading_gain=2.0))
    facing_x = RobotState(0, 0, 0.0)
    # straight ahead: full speed, no turn, never a sideways speed
    assert robot.command([1.0, 0.0], facing_x) == pytest.approx((0.4, 0.0, 0.0))
    # 45 degrees to the left: v = |d| cos(45 deg), turn left at gain x error
    v, v_left, w = robot.command([0.5, 0.5], facing_x)
    assert (v, v_left) == pytest.approx((0.2, 0.0)) and w == pytest.approx(2.0 * math.pi / 4)
    # 90 degrees: no forward speed, turn at the yaw-rate limit
    assert robot.command([0.0, 1.0], facing_x) == pytest.approx((0.0, 0.0, 2.0), abs=1e-12)
    # behind and a little to the right: back up, turning the tail towards it
    v, _, w = robot.command([-1.0, -0.1], facing_x)
    assert v < 0 and abs(v) <= 0.4 and w == pytest.approx(2.0 * math.atan2(0.1, 1.0))
    # every command within the limits, for any action and heading
    rng = np.random.default_rng(3)
    for _ in range(500):
        state = RobotState(0, 0, rng.uniform(-math.pi, math.pi))
        v, v_left, w = robot.command(rng.uniform(-3, 3, 2), state)
        assert abs(v) <= 0.4 + 1e-12 and v_left == 0.0 and abs(w) <= 2.0
    assert robot.command([0.0, 0.0], facing_x) == (0.0, 0.0, 0.0)


def test_fence_cuts_outward_motion_only():
    robot = RobotTask(RobotConfig(task='CarRun', fence_x=2.0, fence_y=1.0, max_linear=0.5))
    assert robot.fence == (2.0, 1.0)
    inside = RobotState(1.0, 0.0, 0.0)
    assert robot.fence_limit((0.5, 0.0, 0.3), inside) == ((0.5, 0.0, 0.3), False)
    at_x = RobotState(2.0, 0.0, 0.0)
    assert robot.fence_limit((0.5, 0.0, 0.3), at_x) == ((0.0, 0.0, 0.3), True)  # turn stays
    assert robot.fence_limit((-0.5, 0.0, 0.0), at_x) == ((-0.5, 0.0, 0.0), False)  # back in
    beyond_y = RobotState(0.0, -1.2, -math.pi / 2)            # facing -y, beyond -1
    assert robot.fence_limit((0.3, 0.0, 0.0), beyond_y)[1]
    assert not robot.fence_limit((-0.3, 0.0, 0.0), beyond_y)[1]
    # holonomic Ball: only the outward component goes
    ball = RobotTask(RobotConfig(task='BallCircle', drive='holonomic', fence_x=1.0))
    (vf, vl, _), cut = ball.fence_limit((0.3, 0.3, 0.0), RobotState(1.0, 0.0, 0.0))
    assert cut and (vf, vl) == pytest.approx((0.0, 0.3))
    # default fence: the task's geofence in robot metres (Circle |x| <= 6 sim m)
    assert RobotTask(RobotConfig(task='BallCircle', position_scale=4.0)).fence == (1.5, math.inf)
    assert RobotTask(RobotConfig(task='CarRun', position_scale=2.0)).fence == (math.inf, 1.0)
    # ... which leaves one axis open (the node warns); an explicit inf is a choice, not a default
    assert RobotTask(RobotConfig(task='BallCircle')).unfenced() == 'y'
    assert RobotTask(RobotConfig(task='CarRun')).unfenced() == 'x'
    assert RobotTask(RobotConfig(task='CarRun', fence_x=math.inf)).unfenced() == ''
    assert RobotTask(RobotConfig(task='BallCircle', fence_y=1.0)).unfenced() == ''


def test_every_numeric_adapter_parameter_has_a_description_and_a_range():
    """Issue 14: the geofence and the speed limits are parameters with a description and range."""
    pytest.importorskip('rclpy')
    from saferl_ros.nodes.robot_adapter_node import PARAMS
    for p in PARAMS:
        assert p.description, p.name
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
            assert p.min_value is not None or p.max_value is not None, p.name
    names = {p.name for p in PARAMS}
    assert {'max_linear', 'max_angular', 'fence_x', 'fence_y', 'x_limit', 'y_limit'} <= names
