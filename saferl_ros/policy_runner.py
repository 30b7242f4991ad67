"""
Run a bundle's policy on observations: checked inputs, seeded noise, measured latency.

Runtime core (numpy + the bundle reader). The controller node calls :meth:`PolicyRunner.act` once
per observation; everything it needs to refuse (a wrong observation layout, NaN input, a policy
that returns NaN) is decided here and unit-tested without ROS.
"""

from dataclasses import dataclass, field
import time
from typing import List, Optional, Sequence

import numpy as np
from saferl_ros.observation import check_channels
from saferl_ros.seeding import noise_rng


class PolicyInputError(ValueError):
    """An observation the policy must not act on (wrong size, NaN/Inf)."""


@dataclass
class LatencyStats:
    """Running record of per-call latencies [s]; percentiles over the last ``window`` calls."""

    window: int = 10000
    samples: List[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        """Record one latency."""
        self.samples.append(seconds)
        if len(self.samples) > 2 * self.window:
            del self.samples[:-self.window]

    def percentiles(self, qs: Sequence[float] = (50, 99)) -> List[float]:
        """Return the requested percentiles in milliseconds (NaN when empty)."""
        if not self.samples:
            return [float('nan')] * len(qs)
        data = np.asarray(self.samples[-self.window:]) * 1e3
        return [float(np.percentile(data, q)) for q in qs]

    def summary(self) -> dict:
        """Return count, p50, p99 and max in milliseconds."""
        p50, p99 = self.percentiles((50, 99))
        return {'count': len(self.samples), 'p50_ms': p50, 'p99_ms': p99,
                'max_ms': max(self.samples) * 1e3 if self.samples else float('nan')}


class PolicyRunner:
    """Wrap ``bundle.policy`` for one observation at a time."""

    def __init__(self, bundle, channels: Optional[Sequence[str]] = None, seed: int = 0):
        self.bundle = bundle
        if channels is not None:
            check_channels(bundle.obs_channels, channels, source='controller')
        self.rng = noise_rng(seed, 'controller')
        self.latency = LatencyStats()
        # Warm-up: the first onnxruntime call allocates; keep that out of the control loop.
        self.bundle.policy(np.zeros((1, bundle.obs_dim), np.float32), rng=self.rng)
        self.rng = noise_rng(seed, 'controller')

    def act(self, observation) -> np.ndarray:
        """Return the policy's action for one observation (clipped to the action box)."""
        obs = np.asarray(observation, dtype=np.float32).reshape(-1)
        if obs.size != self.bundle.obs_dim:
            raise PolicyInputError(f'observation has {obs.size} entries, the bundle expects '
                                   f'{self.bundle.obs_dim} ({self.bundle.obs_channels})')
        if not np.isfinite(obs).all():
            raise PolicyInputError(f'observation holds NaN/Inf at '
                                   f'{np.flatnonzero(~np.isfinite(obs)).tolist()}')
        start = time.perf_counter()
        action = self.bundle.policy(obs[None], rng=self.rng)[0]
        self.latency.add(time.perf_counter() - start)
        if not np.isfinite(action).all():
            raise PolicyInputError('policy returned NaN/Inf; the bundle is broken for this input')
        return np.clip(action, self.bundle.action_low, self.bundle.action_high).astype(np.float32)
