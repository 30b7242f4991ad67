"""
Turn rollouts into DSRL-format offline data, without losing completed episodes to a crash.

A recording is a folder per run::

    <run>/index.json                   the run: task, bundle hashes, one entry per episode
    <run>/episodes/episode_000000.hdf5 one complete DSRL file per finished episode
    <run>/recording.hdf5               all episodes in one DSRL file (written by ``close`` or by
                                       ``consolidate`` after a crash)

Every file is written to a temporary name, flushed, fsync'ed and renamed into place, and the index
is rewritten the same way after each episode. A kill (even SIGKILL in the middle of a write)
therefore loses at most the episode in progress: completed episode files are never opened for
writing again, and a half-written temporary file is ignored (and removed by ``consolidate``).

Each file holds DSRL's keys (observations, next_observations, actions, rewards, costs, terminals,
timeouts; float32, flags as bool) and loads with ``dsrl``'s ``OfflineEnv.get_dataset`` and
``saferl-data validate``, plus extras DSRL ignores: ``episode_ids``, ``stamps_ns`` (stamp of
observation t), ``proposed_actions`` (the controller's), ``verdicts`` (monitor state codes,
:class:`saferl_ros.monitor.MonitorState`), ``critic_v_h``, ``critic_q_h``, ``critic_q_c`` (NaN
where not computed) and ``missed`` (lock-step deadline misses). Attributes carry the task and the
sha256 of the controller and monitor bundles.

Runtime core: numpy + h5py only.
"""

from dataclasses import dataclass
import json
import math
from pathlib import Path
import re
import time
from typing import Dict, List, Optional

import h5py
import numpy as np
from saferl_ros.files import atomic_path, atomic_write_json
from saferl_ros.monitor import state_names

FORMAT = 'saferl_recording/1'
INDEX = 'index.json'
EPISODES = 'episodes'
RECORDING = 'recording.hdf5'
EXTRA_KEYS = ('episode_ids', 'stamps_ns', 'proposed_actions', 'verdicts', 'critic_v_h',
              'critic_q_h', 'critic_q_c', 'critic_risk_final', 'replaced', 'missed')
# Bullet-Safety-Gym's action box; recordings store the applied (clipped) action.
ACTION_LIMIT = 1.0


class RecordingError(RuntimeError):
    """A recording folder that cannot be read or extended."""


@dataclass
class Step:
    """One transition as the loop saw it."""

    observation: np.ndarray
    action: np.ndarray              # the applied (final) action
    reward: float
    cost: float
    next_observation: np.ndarray
    stamp_ns: int = 0               # stamp of observation t
    proposed: Optional[np.ndarray] = None
    verdict: int = -1               # MonitorState code; -1: no monitor in the loop
    v_h: float = math.nan
    q_h: float = math.nan
    q_c: float = math.nan
    risk_final: float = math.nan    # the critic's risk (Q_h or Q_c) of the applied action
    replaced: bool = False          # the monitor applied its fallback instead of the proposal
    missed: bool = False


def write_hdf5_atomic(path, arrays: Dict[str, np.ndarray], attrs: Optional[dict] = None,
                      compression_level: int = 1) -> Path:
    """
    Write ``arrays`` (and ``attrs``) to ``path`` so that it is either complete or absent.

    Attributes that are not numbers, strings or booleans are stored as JSON text. Arrays of more
    than 64 values are gzip-compressed (``compression_level`` 1-9) with the shuffle filter.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, 'w') as h5:
            for key, value in (attrs or {}).items():
                h5.attrs[key] = value if isinstance(value, (int, float, str, bool)) \
                    else json.dumps(value)
            for key, value in arrays.items():
                array = np.asarray(value)
                opts = {'compression': 'gzip', 'compression_opts': compression_level,
                        'shuffle': True} if array.size > 64 else {}
                h5.create_dataset(key, data=array, **opts)
    return path


def steps_to_arrays(steps: List[Step], episode: int, terminal: bool, timeout: bool,
                    act_dim: int) -> Dict[str, np.ndarray]:
    """Stack one episode's steps into DSRL arrays plus the recording extras."""
    n = len(steps)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    terminals[-1] = terminal
    timeouts[-1] = timeout and not terminal
    nan_actions = np.full(act_dim, np.nan, np.float32)
    return {
        'observations': np.stack([s.observation for s in steps]).astype(np.float32),
        'next_observations': np.stack([s.next_observation for s in steps]).astype(np.float32),
        'actions': np.clip(np.stack([s.action for s in steps]).astype(np.float32),
                           -ACTION_LIMIT, ACTION_LIMIT),
        'rewards': np.array([s.reward for s in steps], np.float32),
        'costs': np.array([s.cost for s in steps], np.float32),
        'terminals': terminals,
        'timeouts': timeouts,
        'episode_ids': np.full(n, episode, np.int64),
        'stamps_ns': np.array([s.stamp_ns for s in steps], np.int64),
        'proposed_actions': np.stack([nan_actions if s.proposed is None else s.proposed
                                      for s in steps]).astype(np.float32),
        'verdicts': np.array([s.verdict for s in steps], np.int8),
        'critic_v_h': np.array([s.v_h for s in steps], np.float32),
        'critic_q_h': np.array([s.q_h for s in steps], np.float32),
        'critic_q_c': np.array([s.q_c for s in steps], np.float32),
        'critic_risk_final': np.array([s.risk_final for s in steps], np.float32),
        'replaced': np.array([s.replaced for s in steps], bool),
        'missed': np.array([s.missed for s in steps], bool),
    }


class RecordingWriter:
    """Collect steps episode by episode and commit each finished episode to disk atomically."""

    def __init__(self, run_dir, task: str, obs_dim: int, act_dim: int,
                 attrs: Optional[dict] = None, save_partial_on_close: bool = True):
        self.run_dir = Path(run_dir)
        self.task = task
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.save_partial_on_close = save_partial_on_close
        self.episodes_dir = self.run_dir / EPISODES
        self.episodes_dir.mkdir(parents=True, exist_ok=True)
        index_file = self.run_dir / INDEX
        if index_file.exists():
            raise RecordingError(f'{index_file}: a recording already exists in {self.run_dir}; '
                                 'choose a new run folder (the recorder never overwrites one)')
        self.attrs = {'task': task, 'format': 'dsrl', 'recording_format': FORMAT,
                      'env_id': f'Safety{task}-v0', 'verdict_names': state_names(),
                      'source': 'saferl_ros recorder', **(attrs or {})}
        self.index = {'format': FORMAT, 'task': task, 'obs_dim': self.obs_dim,
                      'act_dim': self.act_dim, 'attrs': self.attrs,
                      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                      'episodes': [], 'closed': False}
        atomic_write_json(index_file, self.index)
        self.steps: List[Step] = []
        self.episode = 0
        self.closed = False

    def add(self, step: Step) -> None:
        """Append one transition to the episode in progress."""
        obs = np.asarray(step.observation, np.float32).reshape(-1)
        nxt = np.asarray(step.next_observation, np.float32).reshape(-1)
        act = np.asarray(step.action, np.float32).reshape(-1)
        if obs.size != self.obs_dim or nxt.size != self.obs_dim or act.size != self.act_dim:
            raise RecordingError(f'step has observation {obs.size}/next {nxt.size}/action '
                                 f'{act.size} entries, the recording is {self.obs_dim}/'
                                 f'{self.obs_dim}/{self.act_dim}')
        step.observation, step.next_observation, step.action = obs, nxt, act
        self.steps.append(step)

    def end_episode(self, terminal: bool, timeout: bool, info: Optional[dict] = None):
        """
        Write the episode in progress (one atomic file) and update the index; return its path.

        ``terminal``: the environment ended it (DSRL ``terminals``); ``timeout``: the horizon or
        the run cut it off (``timeouts``, truncation). An episode with no steps writes nothing.
        """
        if not self.steps:
            return None
        arrays = steps_to_arrays(self.steps, self.episode, terminal, timeout, self.act_dim)
        if not terminal and not timeout:
            arrays['timeouts'][-1] = True   # ended by the run: record it as a truncation
        path = self.episodes_dir / f'episode_{self.episode:06d}.hdf5'
        write_hdf5_atomic(path, arrays, {**self.attrs, 'episode': self.episode})
        entry = {'episode': self.episode, 'file': f'{EPISODES}/{path.name}',
                 'steps': len(self.steps), 'reward': float(arrays['rewards'].sum()),
                 'cost': float(arrays['costs'].sum()), 'terminal': bool(terminal),
                 # steps where the monitor applied its fallback / judged the proposal unsafe
                 # but kept it because no fallback was safer (verdict 1 or 2 = INTERVENING or
                 # RECOVERY, saferl_ros.monitor.MonitorState)
                 'fallback_steps': int(arrays['replaced'].sum()),
                 'kept_steps': int((np.isin(arrays['verdicts'], (1, 2))
                                    & ~arrays['replaced']).sum()),
                 **(info or {})}
        self.index['episodes'].append(entry)
        atomic_write_json(self.run_dir / INDEX, self.index)
        self.steps = []
        self.episode += 1
        return path

    def discard_episode(self) -> None:
        """Drop the episode in progress (e.g. the loop was reset mid-episode)."""
        self.steps = []

    def close(self, consolidate_run: bool = True) -> Optional[Path]:
        """Finish the run: keep (or drop) the partial episode, close the index, consolidate."""
        if self.closed:
            return None
        if self.save_partial_on_close and self.steps:
            self.end_episode(terminal=False, timeout=True, info={'partial': True})
        self.steps = []
        self.index['closed'] = True
        atomic_write_json(self.run_dir / INDEX, self.index)
        self.closed = True
        if consolidate_run and self.index['episodes']:
            return consolidate(self.run_dir)
        return None


def read_index(run_dir) -> dict:
    """Return a recording's index, or raise RecordingError saying what is wrong."""
    file = Path(run_dir) / INDEX
    if not file.is_file():
        raise RecordingError(f'{file}: missing; {run_dir} is not a saferl_ros recording folder')
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise RecordingError(f'{file}: not valid JSON ({exc})') from exc
    if index.get('format') != FORMAT:
        raise RecordingError(f'{file}: format is {index.get("format")!r}, expected {FORMAT!r}')
    return index


def load_episodes(run_dir) -> Dict[str, np.ndarray]:
    """Concatenate the completed episodes listed in the index (DSRL keys + extras)."""
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    parts: Dict[str, List[np.ndarray]] = {}
    for entry in index['episodes']:
        with h5py.File(run_dir / entry['file'], 'r') as h5:
            for key, item in h5.items():
                parts.setdefault(key, []).append(item[()])
    if not parts:
        raise RecordingError(f'{run_dir}: the recording holds no completed episode')
    return {key: np.concatenate(values) for key, values in parts.items()}


def consolidate(run_dir, out=None) -> Path:
    """
    Write every completed episode of ``run_dir`` into one DSRL file (default recording.hdf5).

    Works on a recording whose writer was killed: only episodes in the index are read, and
    leftover temporary files are removed.
    """
    run_dir = Path(run_dir)
    for leftover in run_dir.rglob('.*.tmp'):
        leftover.unlink()
    index = read_index(run_dir)
    data = load_episodes(run_dir)
    attrs = {**index['attrs'], 'episodes': len(index['episodes'])}
    return write_hdf5_atomic(Path(out) if out else run_dir / RECORDING, data, attrs)


def new_run_dir(root, prefix: str = 'run') -> Path:
    """Return a fresh run folder name under ``root``: <prefix>_<UTC time>[_<n>]."""
    root = Path(root)
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    name = re.sub(r'[^A-Za-z0-9_.-]', '_', f'{prefix}_{stamp}')
    path, n = root / name, 1
    while path.exists():
        path, n = root / f'{name}_{n}', n + 1
    return path
