"""
Small datasets for tests, benchmarks and development before real datasets exist.

``synthetic_dataset`` makes a DSRL-format dict from random numbers (no simulator);
``rollout_dataset`` rolls out a simple heuristic in the real Bullet-Safety-Gym task, so the
episodes, rewards, costs, terminals and timeouts are the environment's own.
"""

from typing import Dict

import numpy as np

from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.tasks import get_task


def synthetic_dataset(obs_dim: int = 8, act_dim: int = 2, size: int = 2000, horizon: int = 100,
                      cost_rate: float = 0.1, seed: int = 0) -> Dict[str, np.ndarray]:
    """
    Return a random DSRL-format dataset dict (episodes of ``horizon`` steps, then timeout).

    The reward is a smooth function of the state and action, and cost = 1 where the first
    observation coordinate exceeds a threshold, so critics have something learnable.
    """
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(size, obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(size, act_dim)).astype(np.float32)
    next_obs = (0.9 * obs + 0.1 * rng.normal(size=obs.shape)).astype(np.float32)
    next_obs[:, :act_dim] += 0.2 * act
    rewards = (1.0 - np.square(act - np.tanh(obs[:, :act_dim])).sum(1)).astype(np.float32)
    threshold = np.quantile(obs[:, 0], 1.0 - cost_rate)
    costs = (obs[:, 0] > threshold).astype(np.float32)
    timeouts = np.zeros(size, dtype=np.float32)
    timeouts[horizon - 1::horizon] = 1.0
    timeouts[-1] = 1.0
    return {'observations': obs, 'next_observations': next_obs, 'actions': act,
            'rewards': rewards, 'costs': costs, 'terminals': np.zeros(size, dtype=np.float32),
            'timeouts': timeouts}


def rollout_dataset(task: str = 'BallCircle', episodes: int = 10, seed: int = 0,
                    max_steps=None) -> Dict[str, np.ndarray]:
    """
    Roll out a heuristic in the real environment and return a DSRL-format dataset dict.

    Each episode pushes in one random direction with random strength plus noise, so some
    episodes leave the safe area (cost > 0) and others do not: a spread of cost returns.
    """
    spec = get_task(task)
    env = spec.make_env()
    rng = np.random.default_rng(seed)
    out = {key: [] for key in DSRL_KEYS}
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed * 100_003 + episode)
            direction = rng.normal(size=spec.act_dim)
            direction *= rng.uniform(0.0, 1.0) / max(np.linalg.norm(direction), 1e-6)
            steps = 0
            while True:
                action = np.clip(direction + 0.5 * rng.normal(size=spec.act_dim), -1, 1)
                next_obs, reward, terminated, truncated, info = env.step(
                    action.astype(np.float32))
                steps += 1
                truncated = truncated or (max_steps is not None and steps >= max_steps)
                out['observations'].append(obs)
                out['next_observations'].append(next_obs)
                out['actions'].append(action)
                out['rewards'].append(reward)
                out['costs'].append(info.get('cost', 0.0))
                out['terminals'].append(float(terminated))
                out['timeouts'].append(float(truncated and not terminated))
                obs = next_obs
                if terminated or truncated:
                    break
    finally:
        env.close()
    return {key: np.asarray(value, dtype=np.float32) for key, value in out.items()}
