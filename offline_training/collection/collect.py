"""
Roll behaviour-agent checkpoints out, density-filter the trajectories, write a DSRL dataset.

Every frozen actor in ``behavior_agents/<Task>/checkpoints`` is rolled out for whole episodes,
deterministically (the mean action) and with Gaussian action noise of a few sizes, so the pool
of trajectories spans the untrained to the final agent and, through the annealed cost budget of
training, safe to unsafe behaviour. DSRL's grid filter over (cost return, reward return) then
evens out the density and removes trajectories above DSRL's cost cut-off, and the result is
written through the data layer as ``Safety<Task>-v0-<cmax>-<ntraj>.hdf5``.

Everything random comes from one ``numpy.random.SeedSequence(seed)``: episode ``j`` gets its own
environment seed and noise stream, so a dataset is reproducible from the committed checkpoints.
"""

from dataclasses import asdict, dataclass
import math
from pathlib import Path
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from offline_training.collection.behavior import DEFAULT_AGENT_ROOT, list_checkpoints, NumpyActor
from offline_training.collection.density import DensityFilterConfig, grid_filter
from offline_training.data.dataset import PROJECT_DATASET_DIR, write_dataset
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.sim import run_episode
from saferl_ros.tasks import get_task, TaskSpec

DEFAULT_DATASET_DIR = PROJECT_DATASET_DIR


@dataclass
class CollectConfig:
    """Rollout and filtering settings of one task's dataset."""

    task: str = 'BallCircle'
    seed: int = 0
    # Additive Gaussian noise on the mean action, one rollout set per value (0 = deterministic).
    action_noise: Tuple[float, ...] = (0.0, 0.2, 0.5)
    # Raw pool size as a multiple of DSRL's trajectory count (the filter then thins it).
    raw_factor: float = 1.5
    # Explicit episodes per (checkpoint, noise) pair; overrides raw_factor when set.
    episodes_per_setting: Optional[int] = None
    # Probe episodes per setting before the rest is allocated to settings under the cut-off.
    probe_episodes: int = 2
    alloc_bins: int = 20  # coarse grid of the probe-based allocation
    # DSRL grid filter (process_dataset.py defaults); cmax None = DSRL's MAX_EPISODE_COST.
    cbins: int = 60
    rbins: int = 50
    max_per_bin: Optional[int] = None  # None: the cap that lands near DSRL's count
    # DSRL's grid_filter drops cells with <= 1 trajectory by default; with a pool only ~2x the
    # target that would delete most of the rare extremes (first/last checkpoints), so 0 here.
    min_per_bin: int = 0
    cmax: Optional[float] = None
    target_count: Optional[int] = None  # None: DSRL's trajectory count
    max_steps: Optional[int] = None  # shorter episodes than the horizon (tests only)


def rollout(env, actor: NumpyActor, noise_std: float, env_seed: int,
            rng: np.random.Generator, max_steps: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Run one whole episode of the actor's mean plus Gaussian noise; return its DSRL arrays."""
    def noisy_mean(obs):
        action = actor.mean(obs)
        return action + rng.normal(0.0, noise_std, size=action.shape) if noise_std > 0 else action

    return run_episode(env, noisy_mean, int(env_seed), max_steps).arrays


def dataset_file_name(spec: TaskSpec, cmax: float, n_traj: int) -> str:
    """Return DSRL's file name ``Safety<Task>-v0-<cmax>-<ntraj>.hdf5``."""
    return f'{spec.env_id}-{cmax:g}-{n_traj}.hdf5'


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, stable)."""
    share = total * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind='stable')
    counts[order[:total - counts.sum()]] += 1
    return counts


def allocation_weights(costs: np.ndarray, rewards: np.ndarray, setting: np.ndarray,
                       n_settings: int, cmax: float, bins: int = 20) -> np.ndarray:
    """
    Return how much of the remaining rollout budget each setting should get.

    A probe trajectory is worth the inverse of how many probe trajectories share its cell of a
    coarse (cost, reward) grid, and nothing above the cost cut-off; a setting's weight is the
    mean worth of its probes. The density filter keeps at most a few trajectories per cell, so
    rollouts spent in sparse regions (the safe and the poor corners) end up in the dataset while
    more of the crowded middle would be thrown away. A small floor keeps every setting alive.
    """
    worth = np.zeros(costs.size)
    inside = costs <= cmax
    if inside.any():
        c, r = costs[inside], rewards[inside]
        ci = np.minimum(((c - c.min()) / ((c.max() - c.min()) / bins or 1.0)).astype(int),
                        bins - 1)
        ri = np.minimum(((r - r.min()) / ((r.max() - r.min()) / bins or 1.0)).astype(int),
                        bins - 1)
        cells = ci * bins + ri
        _, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
        worth[inside] = 1.0 / counts[inverse]
    weights = np.bincount(setting, weights=worth, minlength=n_settings)
    per_setting = np.maximum(np.bincount(setting, minlength=n_settings), 1)
    weights = weights / per_setting
    return weights + 0.05 * (weights.max() if weights.max() > 0 else 1.0)


def collect_pool(config: CollectConfig, checkpoints: Sequence[Path],
                 progress: bool = True) -> Tuple[List[Dict[str, np.ndarray]], List[dict]]:
    """
    Roll out the (checkpoint, noise) settings; return trajectories and their provenance.

    Two passes. A probe of ``probe_episodes`` per setting shows where each one lands in the
    (cost, reward) plane; the rest of the budget goes preferentially to settings that land in
    sparse regions under the cost cut-off (:func:`allocation_weights`). Checkpoints of the
    high-budget phase of training mostly exceed the cut-off, and the middle of the plane is
    crowded; without this most rollouts would be thrown away by the density filter. With
    ``episodes_per_setting`` set, every setting gets exactly that many.
    Episode ``e`` of setting ``s`` always uses the seed ``SeedSequence(seed, spawn_key=(s, e))``,
    so a dataset is reproducible.
    """
    from tqdm import tqdm

    spec = get_task(config.task)
    if not checkpoints:
        raise FileNotFoundError(
            f'no behaviour-agent checkpoints for {spec.name}; train them with '
            f'`saferl-data train-behavior --task {spec.name}`')
    cmax = spec.max_cost if config.cmax is None else config.cmax
    settings = [(ckpt, noise) for ckpt in checkpoints for noise in config.action_noise]
    if config.episodes_per_setting is not None:
        total = config.episodes_per_setting * len(settings)
        probe = config.episodes_per_setting
    else:
        total = max(len(settings), math.ceil(config.raw_factor * spec.dsrl_num_trajectories))
        probe = max(1, min(config.probe_episodes, total // len(settings)))
    env = spec.make_env()
    actors = {}
    trajectories, provenance = [], []
    bar = tqdm(total=total, desc=f'collect {spec.name}', unit='ep', disable=not progress,
               mininterval=2.0)

    def run(s: int, episodes: range) -> None:
        ckpt, noise = settings[s]
        if ckpt not in actors:
            actors[ckpt] = NumpyActor.load(ckpt)
        for e in episodes:
            seq = np.random.SeedSequence(config.seed, spawn_key=(s, e))
            env_seed, noise_seed = seq.generate_state(2)
            traj = rollout(env, actors[ckpt], noise, int(env_seed) & 0x7FFFFFFF,
                           np.random.default_rng(noise_seed), config.max_steps)
            trajectories.append(traj)
            provenance.append({'checkpoint': f'{ckpt.parent.parent.name}/{ckpt.name}',
                               'noise': noise, 'setting': s})
            bar.update(1)

    for s in range(len(settings)):
        run(s, range(probe))
    remaining = total - probe * len(settings)
    if remaining > 0:
        weights = allocation_weights(
            np.array([t['costs'].sum() for t in trajectories]),
            np.array([t['rewards'].sum() for t in trajectories]),
            np.array([p['setting'] for p in provenance]), len(settings), cmax,
            config.alloc_bins)
        for s, extra in enumerate(_allocate(remaining, weights)):
            run(s, range(probe, probe + int(extra)))
    bar.close()
    env.close()
    return trajectories, provenance


def filter_and_write(config: CollectConfig, trajectories: List[Dict[str, np.ndarray]],
                     provenance: List[dict], out_dir=None, out_path=None) -> Tuple[Path, dict]:
    """Density-filter a pool of trajectories and write the dataset; return (path, manifest)."""
    spec = get_task(config.task)
    cmax = spec.max_cost if config.cmax is None else config.cmax
    rewards = np.array([t['rewards'].sum() for t in trajectories])
    costs = np.array([t['costs'].sum() for t in trajectories])
    filter_cfg = DensityFilterConfig(
        cbins=config.cbins, rbins=config.rbins, max_per_bin=config.max_per_bin,
        min_per_bin=config.min_per_bin, cmax=cmax,
        target_count=config.target_count or spec.dsrl_num_trajectories)
    # The filter has its own stream, independent of how many episodes were rolled out.
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    keep = grid_filter(costs, rewards, filter_cfg, rng)
    if keep.size == 0:
        raise ValueError(f'the density filter kept no trajectory of {len(trajectories)} '
                         f'(all cost returns above the cut-off {cmax:g}?)')
    data = {k: np.concatenate([trajectories[i][k] for i in keep]) for k in DSRL_KEYS}
    if out_path is None:
        out_dir = Path(out_dir) if out_dir else DEFAULT_DATASET_DIR
        out_path = out_dir / dataset_file_name(spec, cmax, int(keep.size))
    attrs = {
        'source': 'saferl_ros behaviour agents (PPO-Lagrangian, annealed budget)',
        'collect_config': asdict(config),
        'raw_trajectories': len(trajectories),
        'raw_reward_return_range': [float(rewards.min()), float(rewards.max())],
        'raw_cost_return_range': [float(costs.min()), float(costs.max())],
        'checkpoints': sorted({p['checkpoint'] for p in provenance}),
    }
    manifest = write_dataset(out_path, data, spec, attrs=attrs)
    return Path(out_path), manifest


def collect_task(task, agent_dir=None, out_dir=None, out_path=None, seed: int = 0,
                 skip_existing: bool = False, progress: bool = True,
                 **overrides) -> Optional[Path]:
    """Collect one task's dataset from its committed checkpoints; return the file path."""
    spec = get_task(task)
    config = CollectConfig(task=spec.name, seed=seed, **overrides)
    agent_dir = Path(agent_dir) if agent_dir else DEFAULT_AGENT_ROOT / spec.name
    if skip_existing and out_path is None:
        folder = Path(out_dir) if out_dir else DEFAULT_DATASET_DIR
        existing = sorted(folder.glob(f'{spec.env_id}-*.hdf5'))
        if existing:
            return existing[-1]
    t0 = time.time()
    trajectories, provenance = collect_pool(config, list_checkpoints(agent_dir), progress)
    path, manifest = filter_and_write(config, trajectories, provenance, out_dir, out_path)
    if progress:
        print(f'{spec.name}: kept {manifest["trajectories"]} of {len(trajectories)} '
              f'trajectories ({manifest["transitions"]} transitions) -> {path} '
              f'in {time.time() - t0:.0f} s', flush=True)
    return path
