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
    robot = RobotTask(RobotConfig(task='BallCircle', position_scale=2.0, max_linear=0.5))
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
    s, c = math.sin(0.35), math.cos(0.35)
    assert yaw_from_quaternion(0, 0, s, c) == pytest.approx(0.7)
