"""
Simulator side of the loop without ROS: a Bullet-Safety-Gym task stepped by commands.

Imports gymnasium / bullet_safety_gym lazily so that the rest of the runtime core never needs
them (a physical robot has no simulator installed).
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
import math
import os
import random
import sys
from typing import Callable, Dict, Optional
import warnings

import numpy as np
from saferl_ros.dataset_keys import DSRL_KEYS, FLAG_KEYS
from saferl_ros.observation import channel_names
from saferl_ros.tasks import get_task


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
    np.random.seed(int(seed) % 2**32)        # numpy takes 0 <= seed < 2**32
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def episode_seed(seed: int, episode: int) -> int:
    """
    Return the seed of episode ``episode`` of a run seeded ``seed``: the one convention.

    Distinct across seeds and episodes (up to 100,003 episodes per seed); episode k of seed 0 is
    seeded k. Evaluation, the sim node and the development datasets all use it.
    """
    return int(seed) * 100_003 + int(episode)


@dataclass
class Episode:
    """One finished episode: its DSRL arrays and its undiscounted returns."""

    arrays: Dict[str, np.ndarray] = field(repr=False)   # DSRL keys, one row per step
    reward: float                                       # summed in float64, step by step
    cost: float

    @property
    def length(self) -> int:
        """Return the number of steps."""
        return int(self.arrays['rewards'].shape[0])


def run_episode(env, choose_action: Callable[[np.ndarray], np.ndarray], seed: int,
                max_steps: Optional[int] = None) -> Episode:
    """
    Run one whole episode of ``env`` from the start state that ``seed`` gives.

    The one environment loop of the project (evaluation, dataset collection, development
    datasets; the sim node steps :class:`SimEpisodes` the same way, one command at a time).
    ``choose_action(observation)`` returns the action; it is clipped to the action box, and the
    arrays hold the clipped action, the one the simulator executed. The global rngs are seeded
    with ``seed`` for the episode and restored afterwards (:func:`seeded_global_rngs`), which is
    what makes a Bullet-Safety-Gym episode reproducible. ``max_steps`` ends the episode early as a
    timeout (tests).
    """
    low, high = env.action_space.low, env.action_space.high
    rows = {key: [] for key in DSRL_KEYS}
    reward = cost = 0.0
    with seeded_global_rngs(int(seed)):
        obs, _ = env.reset(seed=int(seed))
        while True:
            action = np.clip(np.asarray(choose_action(obs), dtype=np.float32), low, high)
            next_obs, r, terminated, truncated, info = env.step(action)
            c = float(info.get('cost', 0.0))
            reward, cost = reward + float(r), cost + c
            truncated = truncated or (max_steps is not None and len(rows['rewards']) + 1
                                      >= max_steps)
            rows['observations'].append(np.asarray(obs, dtype=np.float32))
            rows['next_observations'].append(np.asarray(next_obs, dtype=np.float32))
            rows['actions'].append(action)
            rows['rewards'].append(float(r))
            rows['costs'].append(c)
            rows['terminals'].append(bool(terminated))
            rows['timeouts'].append(bool(truncated and not terminated))
            obs = next_obs
            if terminated or truncated:
                break
    arrays = {key: np.asarray(values, dtype=bool if key in FLAG_KEYS else np.float32)
              for key, values in rows.items()}
    return Episode(arrays, reward, cost)


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
    """
    Import bullet_safety_gym (registers the Safety*-v0 ids), safe under redirected streams.

    Its ``RedirectStream`` flushes the C stream whose symbol is named after ``sys.stdout.name``
    (``<stdout>`` -> ``stdout``). Under pytest's capture, Jupyter or a logging wrapper that name is
    no C symbol and importing the package or creating any environment fails with "undefined
    symbol". The import runs with the original streams; afterwards the flush is replaced by one
    that flushes every C stream (``fflush(NULL)``) for any stream without a real name, so that a
    direct ``gym.make`` works too.
    """
    import ctypes

    with original_std_streams():
        import bullet_safety_gym
        # The registry loads the builder lazily at the first gym.make; import it now.
        from bullet_safety_gym.envs import builder
    original = builder.RedirectStream._flush_c_stream
    if not getattr(original, 'capture_safe', False):
        def flush(stream):
            if getattr(stream, 'name', None) in ('<stdout>', '<stderr>'):
                return original(stream)
            ctypes.CDLL(None).fflush(None)

        flush.capture_safe = True
        builder.RedirectStream._flush_c_stream = staticmethod(flush)
    return bullet_safety_gym


def make_gym_env(env_id: str, **kwargs):
    """Create a Bullet-Safety-Gym (or dsrl) environment by id, safe under redirected streams."""
    import gymnasium as gym
    import_bullet_safety_gym()
    if env_id.startswith('Offline'):
        # dsrl's __init__ also imports its Safety-Gymnasium and MetaDrive parts, not installed
        # here; without this it prints a misleading "failed to import" warning.
        os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')
        import dsrl  # noqa: F401  (registers the Offline*-v0 ids)
    # Creation also redirects by file descriptor (``fileno()``), which a capturing stream (pytest's
    # capsys, Jupyter) lacks: the flush patch alone is not enough here.
    with original_std_streams(), quiet_observation_bounds_warning():
        return gym.make(env_id, **kwargs)


def control_period(env, task) -> float:
    """
    Return the simulated seconds one ``env.step`` advances.

    Bullet-Safety-Gym reports it as ``env.unwrapped.dt`` (time step x frame skip); otherwise the
    task registry's ``control_period``.
    """
    dt = getattr(getattr(env, 'unwrapped', env), 'dt', None)
    if isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0:
        return float(dt)
    return get_task(task).control_period


def make_env(task, horizon: Optional[int] = None):
    """Create the Bullet-Safety-Gym environment, time-limited to ``horizon`` (DSRL's default)."""
    spec = get_task(task)
    return make_gym_env(spec.env_id, max_episode_steps=horizon or spec.horizon)


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
    Episode k starts from the state that ``episode_seed(seed, k)`` gives, whatever ran before it
    (the simulator's global-rng draws are seeded, see seeded_global_rngs), as in
    ``run_episode``. ``dt`` is the simulated time of one step [s].
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
        self.task = get_task(self.task).name
        self.horizon = self.horizon or get_task(self.task).horizon
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
        seed = episode_seed(self.seed, self.episode)
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
