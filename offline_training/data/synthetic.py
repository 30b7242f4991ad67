"""
Small synthetic DSRL datasets with correct episode structure, for tests and examples.

The arrays follow the layout rules exactly (``next_observations[t] == observations[t + 1]``
inside an episode, one terminal or timeout per episode, actions in [-1, 1]); the dynamics are a
noisy random walk, not physics, so use collected data for anything that needs real behaviour.
"""

from typing import Dict

import numpy as np

from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.tasks import get_task


def synthetic_dataset(task='BallCircle', episodes: int = 8, seed: int = 0,
                      max_length: int = None) -> Dict[str, np.ndarray]:
    """
    Return DSRL arrays of ``episodes`` random-walk episodes for ``task``.

    Episode lengths vary; about one episode in four ends with a terminal, the rest time out.
    Costs are 1 where the first observation coordinate exceeds 1 (a stand-in for a boundary).
    """
    spec = get_task(task)
    rng = np.random.default_rng(seed)
    max_length = max_length or spec.horizon
    chunks = {k: [] for k in DSRL_KEYS}
    for _ in range(episodes):
        length = int(rng.integers(max(2, max_length // 2), max_length + 1))
        actions = rng.uniform(-1, 1, size=(length, spec.act_dim)).astype(np.float32)
        states = np.zeros((length + 1, spec.obs_dim), dtype=np.float32)
        states[0] = rng.normal(0, 0.5, size=spec.obs_dim)
        drive = np.resize(actions, (length, spec.obs_dim))
        states[1:] = states[0] + np.cumsum(0.1 * drive + rng.normal(0, 0.05, drive.shape), axis=0)
        terminal = rng.random() < 0.25
        chunks['observations'].append(states[:-1])
        chunks['next_observations'].append(states[1:])
        chunks['actions'].append(actions)
        chunks['rewards'].append((1.0 - np.abs(states[1:, 0])).astype(np.float32))
        chunks['costs'].append((np.abs(states[1:, 0]) > 1.0).astype(np.float32))
        end = np.zeros(length, dtype=bool)
        end[-1] = True
        chunks['terminals'].append(end & terminal)
        chunks['timeouts'].append(end & (not terminal))
    return {k: np.concatenate(v) for k, v in chunks.items()}
