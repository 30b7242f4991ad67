"""
Development datasets in the DSRL layout, for tests, benchmarks, test bundles and examples.

``synthetic_dataset`` needs no simulator: noisy random-walk episodes that follow the layout
rules exactly (``next_observations[t] == observations[t + 1]`` inside an episode, one terminal
or timeout per episode, actions in [-1, 1]), with a cost where the first observation coordinate
leaves a band (a stand-in for a boundary), so critics have something learnable. The dynamics
are not physics: use collected data for anything that needs real behaviour.

``rollout_dataset`` rolls out a simple heuristic in the real Bullet-Safety-Gym task through the
project's one environment loop (:func:`saferl_ros.sim.run_episode`, episode k of seed s started
from :func:`saferl_ros.sim.episode_seed`), so its episodes, rewards, costs, terminals and
timeouts are the simulator's own.
"""

from typing import Dict, Optional, Tuple

import numpy as np
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.tasks import get_task


def synthetic_dataset(task='BallCircle', episodes: int = 8, seed: int = 0,
                      max_length: Optional[int] = None, *,
                      dims: Optional[Tuple[int, int]] = None, fixed_length: bool = False,
                      terminal_fraction: float = 0.25,
                      cost_bound: float = 1.0) -> Dict[str, np.ndarray]:
    """
    Return DSRL arrays of ``episodes`` random-walk episodes for ``task``.

    Episode lengths vary in [max_length / 2, max_length] (``max_length`` defaults to the task's
    horizon), or are all ``max_length`` with ``fixed_length``; each episode ends with a terminal
    with probability ``terminal_fraction``, else with a timeout. Costs are 1 where the first
    observation coordinate of the next state exceeds ``cost_bound`` in magnitude, rewards
    ``1 - |that coordinate|``. ``dims`` = (obs_dim, act_dim) replaces the task's dimensions (an
    arbitrary dataset dict, not tied to a task).
    """
    spec = get_task(task)
    obs_dim, act_dim = dims if dims is not None else (spec.obs_dim, spec.act_dim)
    rng = np.random.default_rng(seed)
    max_length = max_length or spec.horizon
    chunks = {k: [] for k in DSRL_KEYS}
    for _ in range(episodes):
        length = (max_length if fixed_length
                  else int(rng.integers(max(2, max_length // 2), max_length + 1)))
        actions = rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32)
        states = np.zeros((length + 1, obs_dim), dtype=np.float32)
        states[0] = rng.normal(0, 0.5, size=obs_dim)
        drive = np.resize(actions, (length, obs_dim))
        states[1:] = states[0] + np.cumsum(0.1 * drive + rng.normal(0, 0.05, drive.shape), axis=0)
        terminal = rng.random() < terminal_fraction
        chunks['observations'].append(states[:-1])
        chunks['next_observations'].append(states[1:])
        chunks['actions'].append(actions)
        chunks['rewards'].append((1.0 - np.abs(states[1:, 0])).astype(np.float32))
        chunks['costs'].append((np.abs(states[1:, 0]) > cost_bound).astype(np.float32))
        end = np.zeros(length, dtype=bool)
        end[-1] = True
        chunks['terminals'].append(end & terminal)
        chunks['timeouts'].append(end & (not terminal))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def rollout_dataset(task: str = 'BallCircle', episodes: int = 10, seed: int = 0,
                    max_steps: Optional[int] = None) -> Dict[str, np.ndarray]:
    """
    Roll out a heuristic in the real environment and return a DSRL-format dataset dict.

    Each episode pushes in one random direction with random strength plus noise, so some
    episodes leave the safe area (cost > 0) and others do not: a spread of cost returns.
    Episode k starts from ``episode_seed(seed, k)``; ``max_steps`` ends episodes early.
    """
    from saferl_ros.sim import episode_seed, run_episode

    spec = get_task(task)
    env = spec.make_env()
    rng = np.random.default_rng(seed)
    arrays = []
    try:
        for episode in range(episodes):
            direction = rng.normal(size=spec.act_dim)
            direction *= rng.uniform(0.0, 1.0) / max(np.linalg.norm(direction), 1e-6)

            def push(obs, direction=direction):
                return direction + 0.5 * rng.normal(size=spec.act_dim)

            arrays.append(run_episode(env, push, episode_seed(seed, episode),
                                      max_steps=max_steps).arrays)
    finally:
        env.close()
    return {key: np.concatenate([a[key] for a in arrays]) for key in DSRL_KEYS}
