"""
Simulator side of the loop without ROS: a Bullet-Safety-Gym task stepped by commands.

Imports gymnasium / bullet_safety_gym lazily so that the rest of the runtime core never needs
them (a physical robot has no simulator installed).
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
import math
import random
import sys
from typing import Optional
import warnings

import numpy as np
from saferl_ros.observation import channel_names, parse_task

# DSRL horizons (dsrl.infos.DEFAULT_MAX_EPISODE_STEPS), repeated here because the runtime core may
# not import dsrl; test/test_ros_sim.py checks them against offline_training.data.tasks.
HORIZONS = {'BallCircle': 200, 'CarCircle': 300, 'DroneCircle': 300, 'AntCircle': 500,
            'BallRun': 100, 'CarRun': 200, 'DroneRun': 200, 'AntRun': 200}

# Simulated seconds per environment step: PyBullet time step x frame skip of
# bullet_safety_gym.envs.builder.get_physics_parameters (Circle 1/60 s x 6, Run 1/120 s x 4,
# DroneRun 1/120 s x 2). Used only if the environment does not report ``unwrapped.dt``;
# test/test_reproducible.py checks them against it.
CONTROL_PERIODS = {'BallCircle': 0.1, 'CarCircle': 0.1, 'DroneCircle': 0.1, 'AntCircle': 0.1,
                   'BallRun': 1 / 30, 'CarRun': 1 / 30, 'DroneRun': 1 / 60, 'AntRun': 1 / 30}


@contextmanager
def seeded_global_rngs(seed: int):
    """
    Seed numpy's and Python's global rngs for a block, then restore their previous states.

    Bullet-Safety-Gym ignores ``reset(seed=...)``: its initial positions and orientations come
    from the *global* ``np.random`` (and ``random`` for obstacles), so this is the only way to
    make an episode reproducible. Restoring the states keeps the side effect local. Shared by
    SimEpisodes and offline_training.collection (which imports it from here).
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextmanager
def original_std_streams():
    """
    Use the interpreter's original stdout/stderr objects inside the block.

    bullet_safety_gym silences PyBullet's banner by flushing the C stream named after
    ``sys.stdout.name`` / ``sys.stderr.name`` (builder.RedirectStream, at import and at every
    environment creation). Under pytest or any redirected stream that name is not a C symbol and
    it raises ValueError; the original stream objects carry the real names.
    """
    saved = sys.stdout, sys.stderr
    if sys.__stdout__ is not None and sys.__stderr__ is not None:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextmanager
def quiet_observation_bounds_warning():
    """
    Hide one harmless warning of creating a Bullet-Safety-Gym environment inside the block.

    The builder declares its observation space as ``Box(-1000, 1000, dtype=float64)`` with
    float32 bounds; gymnasium's ``Box._cast_low`` compares them with float64's minimum, which
    numpy first casts to float32: "RuntimeWarning: overflow encountered in cast" at every
    environment creation. The bounds are right. Only that message from that gymnasium module
    is ignored, and only inside the block (offline_training's environments use it too).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='overflow encountered in cast',
                                category=RuntimeWarning, module=r'gymnasium\.spaces\.box')
        yield


def import_bullet_safety_gym():
    """Import bullet_safety_gym (registers the Safety*-v0 ids) even under redirected streams."""
    with original_std_streams():
        import bullet_safety_gym
        # The registry loads the builder lazily at the first gym.make; import it now.
        import bullet_safety_gym.envs.builder  # noqa: F401
    return bullet_safety_gym


def make_gym_env(env_id: str, **kwargs):
    """Create a Bullet-Safety-Gym (or dsrl) environment by id, safe under redirected streams."""
    import gymnasium as gym
    import_bullet_safety_gym()
    with original_std_streams(), quiet_observation_bounds_warning():
        return gym.make(env_id, **kwargs)


def task_name(task) -> str:
    """Return the canonical DSRL task name (``BallCircle``) for any accepted form."""
    agent, kind = parse_task(task)
    return agent + kind


def control_period(env, task) -> float:
    """
    Return the simulated seconds one ``env.step`` advances.

    Bullet-Safety-Gym reports it as ``env.unwrapped.dt`` (time step x frame skip); otherwise the
    task's entry of CONTROL_PERIODS, else 1/50 s.
    """
    dt = getattr(getattr(env, 'unwrapped', env), 'dt', None)
    if isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0:
        return float(dt)
    return CONTROL_PERIODS.get(task_name(task), 1 / 50)


def make_env(task, horizon: Optional[int] = None):
    """Create the Bullet-Safety-Gym environment, time-limited to the DSRL horizon."""
    name = task_name(task)
    return make_gym_env(f'Safety{name}-v0', max_episode_steps=horizon or HORIZONS[name])


@dataclass
class StepResult:
    """What one simulator step produced (the observation is the next one)."""

    observation: np.ndarray
    reward: float
    cost: float
    terminated: bool
    truncated: bool


@dataclass
class SimEpisodes:
    """
    Run a task episode after episode; ``step`` applies one command.

    Keeps the episode bookkeeping (index, step count, returns) that the sim node publishes.
    Episode k starts from the state that seed + k gives, whatever ran before it (the simulator's
    global-rng draws are seeded, see seeded_global_rngs). ``dt`` is the simulated time of one
    step [s].
    """

    task: str
    seed: int = 0
    horizon: Optional[int] = None
    episode: int = -1
    steps: int = 0
    episode_reward: float = 0.0
    episode_cost: float = 0.0
    observation: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self):
        self.task = task_name(self.task)
        self.horizon = self.horizon or HORIZONS[self.task]
        with seeded_global_rngs(self.seed):   # construction draws from them too
            self.env = make_env(self.task, self.horizon)
        self.channels = channel_names(self.task)
        self.act_dim = int(self.env.action_space.shape[0])
        self.action_low = self.env.action_space.low.astype(np.float32)
        self.action_high = self.env.action_space.high.astype(np.float32)
        self.dt = control_period(self.env, self.task)

    def reset(self) -> np.ndarray:
        """Start the next episode (seeded: seed + episode index) and return its observation."""
        self.episode += 1
        self.steps = 0
        self.episode_reward = 0.0
        self.episode_cost = 0.0
        seed = self.seed + self.episode
        with seeded_global_rngs(seed):
            obs, _ = self.env.reset(seed=seed)
        self.observation = np.asarray(obs, dtype=np.float32)
        return self.observation

    def step(self, action) -> StepResult:
        """Apply ``action`` (clipped to the action box) and advance one step."""
        action = np.clip(np.asarray(action, dtype=np.float32), self.action_low, self.action_high)
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        cost = float(info.get('cost', 0.0))
        self.episode_reward += float(reward)
        self.episode_cost += cost
        self.observation = np.asarray(obs, dtype=np.float32)
        return StepResult(self.observation, float(reward), cost, bool(terminated), bool(truncated))

    def robot_state(self):
        """
        Return the agent's planar odometry (Ball/Car) as a RobotState.

        The Car's simulator body is turned by pi relative to its driving direction
        (saferl_ros.robot_adapter), so its heading is the simulator yaw - pi.
        """
        from saferl_ros.robot_adapter import RobotState
        agent = self.env.unwrapped.agent
        x, y, _ = agent.get_position()
        vx, vy, _ = agent.get_linear_velocity()
        yaw = float(agent.get_orientation()[2]) - (math.pi if self.task.startswith('Car') else 0)
        yaw = math.atan2(math.sin(yaw), math.cos(yaw))
        return RobotState.from_world_velocity(float(x), float(y), yaw, float(vx), float(vy),
                                              float(agent.get_angular_velocity()[2]))

    def close(self):
        """Release the physics client."""
        self.env.close()


def normalized_score(task, reward: float, cost: float, kappa: float):
    """
    Return DSRL's (normalised reward, normalised cost) with dsrl's own constants.

    ``R_norm = (R - R_min) / (R_max - R_min)``, ``C_norm = (C + eps) / (kappa + eps)`` with
    ``eps = 1`` only when ``kappa = 0`` (dsrl OfflineEnv.get_normalized_score). The simulator side
    may import dsrl; a robot without it reports raw returns.
    """
    import os
    os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')
    from dsrl import infos
    name = task_name(task)
    r_max, r_min = infos.MAX_EPISODE_REWARD[name], infos.MIN_EPISODE_REWARD[name]
    eps = 1.0 if kappa == 0 else 0.0
    return (reward - r_min) / (r_max - r_min), (cost + eps) / (kappa + eps)
