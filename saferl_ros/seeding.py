"""
Seeding for the runtime: one place that says where every random number comes from.

Each component that draws noise (the controller's diffusion policy, the monitor's fallback
search) gets its own stream derived from the user's seed with ``numpy.random.SeedSequence``
and a fixed per-role spawn key. Two components given the same seed therefore never draw the same
numbers: with one shared stream, a fallback graph equal to the policy graph would reproduce the
proposal bit for bit and the monitor would "replace" an action by itself.
"""

from typing import Dict

import numpy as np

# Spawn keys of the independent streams; never renumber (recordings are reproduced from them).
NOISE_ROLES: Dict[str, int] = {'controller': 0, 'monitor': 1}


def noise_rng(seed: int, role: str) -> np.random.Generator:
    """Return the noise generator of ``role`` ('controller' or 'monitor') for ``seed``."""
    if role not in NOISE_ROLES:
        raise ValueError(f'unknown noise role {role!r}; known: {sorted(NOISE_ROLES)}')
    return np.random.default_rng(np.random.SeedSequence(int(seed),
                                                        spawn_key=(NOISE_ROLES[role],)))
