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
import tempfile
import time
from typing import Dict, List, Optional

import h5py
import numpy as np
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import ConfigError, MissingFileError, short_repr, UserError
from saferl_ros.files import (atomic_path, atomic_write_json, plain_file_problem,
                              read_regular_file)
from saferl_ros.hdf5_limits import array_problem, link_problem, MAX_ROWS
from saferl_ros.monitor import state_names

FORMAT = 'saferl_recording/1'
INDEX = 'index.json'
EPISODES = 'episodes'
RECORDING = 'recording.hdf5'
EXTRA_KEYS = ('episode_ids', 'stamps_ns', 'proposed_actions', 'verdicts', 'critic_v_h',
              'critic_q_h', 'critic_q_c', 'critic_risk_final', 'replaced', 'missed')
# Bullet-Safety-Gym's action box; recordings store the applied (clipped) action.
ACTION_LIMIT = 1.0
# The DSRL fields of a step, which must be finite: one NaN or Inf makes the whole recording
# fail validation (and ``saferl-data merge``). The extras may hold NaN ("not computed").
FINITE_FIELDS = ('observation', 'next_observation', 'action', 'reward', 'cost')


# Largest index.json read (checked before reading): an entry takes ~250 bytes, so this holds
# some 250 000 episodes.
MAX_INDEX_BYTES = 64 << 20
# What to do about a recording whose index or one of whose episode files is damaged.
_INDEX_FIX = ('the recorder writes it: restore the run folder from a copy, or record the run '
              'again')
_EPISODE_FIX = ('remove its entry from index.json to use the other episodes, or record the run '
                'again')


class RecordingError(UserError, RuntimeError):
    """A recording folder that cannot be read or extended: the message names the file and fix."""


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


def non_finite_fields(step) -> List[str]:
    """
    Return the DSRL fields of ``step`` that hold NaN or Inf, or that are not numeric.

    ``step``: a :class:`Step` or anything with the same field names (the recorder node's
    Transition). Empty: the step may be written.
    """
    bad = []
    for name in FINITE_FIELDS:
        try:
            finite = np.isfinite(np.asarray(getattr(step, name), np.float64)).all()
        except (TypeError, ValueError):
            finite = False
        if not finite:
            bad.append(name)
    return bad


def check_new_run_dir(run_dir) -> None:
    """
    Raise RecordingError unless ``run_dir`` is free for a new recording (absent or empty).

    The recorder never writes into a folder that holds anything (an earlier run's index,
    episodes or MCAP files would be mixed with, or overwritten by, the new run's).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecordingError(f'run folder {run_dir} exists and is not a folder; set run_name to '
                             'a new name (or leave it empty for run_<UTC time>)')
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if held:
        shown = ', '.join(held[:3]) + (', ...' if len(held) > 3 else '')
        raise RecordingError(f'run folder {run_dir} already exists and holds {shown}; the '
                             'recorder never writes into an existing run: set run_name to a new '
                             'name, leave it empty for run_<UTC time>, or move the folder away')


def check_output_dir(root) -> None:
    """
    Create the recordings folder ``root`` if needed and prove it writable; raise RecordingError.

    Checked before a run starts: a folder that cannot be written would otherwise cost the whole
    run, refused step by step in a log line while the robot moves. A file is written and removed
    (permission bits do not tell root about a read-only mount or /proc).
    """
    root = Path(root)
    fix = 'set output_dir to a folder you can write to'
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except FileExistsError:
        raise RecordingError(f'output_dir {root}: exists and is not a folder; {fix}') from None
    except OSError as error:
        raise RecordingError(f'output_dir {root}: cannot be written ({error.strerror}); '
                             f'{fix}') from None


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
        """
        Append one transition to the episode in progress.

        A step with NaN or Inf in a DSRL field (:func:`non_finite_fields`) is refused
        (RecordingError): the recorder node drops it and cuts the episode there.
        """
        bad = non_finite_fields(step)
        if bad:
            raise RecordingError(f'step holds NaN or Inf in {", ".join(bad)}; a recording holds '
                                 'only finite observations, actions, rewards and costs')
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
    """
    Return a recording's index, or raise RecordingError saying what is wrong and what to do.

    The index must be a regular file of at most MAX_INDEX_BYTES (``read_regular_file``) holding
    a JSON object with this format, the task, the file attributes and a list of episode
    entries, each an object with an integer ``episode``, a string ``file`` (each file listed
    once) and a positive integer ``steps``.
    """
    file = Path(run_dir) / INDEX
    try:
        text = read_regular_file(file, MAX_INDEX_BYTES, _INDEX_FIX)
    except MissingFileError:
        raise RecordingError(f'{file}: missing; {run_dir} is not a saferl_ros recording '
                             'folder') from None
    except ConfigError as exc:
        raise RecordingError(str(exc)) from None
    try:
        index = json.loads(text.decode('utf-8'))
    except (ValueError, RecursionError) as exc:
        # not UTF-8, not JSON, an integer of over 4300 digits, or nested past Python's stack
        raise RecordingError(f'{file}: not valid JSON ({short_repr(str(exc))}); '
                             f'{_INDEX_FIX}') from None
    if not isinstance(index, dict):
        raise RecordingError(f'{file}: expected a JSON object, found a '
                             f'{type(index).__name__}; {_INDEX_FIX}')
    if index.get('format') != FORMAT:
        raise RecordingError(f'{file}: format is {short_repr(index.get("format"))}, expected '
                             f'{FORMAT!r}; '
                             f'{run_dir} is not a saferl_ros recording folder')
    for key, kind in (('task', str), ('attrs', dict), ('episodes', list)):
        if not isinstance(index.get(key), kind):
            found = 'missing' if key not in index else f'a {type(index[key]).__name__}'
            raise RecordingError(f'{file}: field {key!r} should be a {kind.__name__}, found '
                                 f'{found}; {_INDEX_FIX}')
    for number, entry in enumerate(index['episodes']):
        where = f'{file}: episodes[{number}]'
        if not isinstance(entry, dict):
            raise RecordingError(f'{where} should be an object, found a '
                                 f'{type(entry).__name__}; {_INDEX_FIX}')
        for key, kind in (('episode', int), ('file', str), ('steps', int)):
            value = entry.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) \
                    or (key == 'steps' and value < 1):
                found = 'missing' if key not in entry else short_repr(value)
                what = 'a positive int' if key == 'steps' else f'a {kind.__name__}'
                raise RecordingError(f'{where}: field {key!r} should be {what}, found {found}; '
                                     f'{_INDEX_FIX}')
    seen = set()
    for entry in index['episodes']:
        if entry['file'] in seen:
            raise RecordingError(f'{file}: lists the episode file {short_repr(entry["file"])} '
                                 f'more than once; {_INDEX_FIX}')
        seen.add(entry['file'])
    return index


def _read_episode(run_dir: Path, entry: dict, keys) -> Dict[str, np.ndarray]:
    """
    Return ``keys`` of one episode file listed in the index, checked before anything is read.

    The file must be a regular file inside the run folder (`plain_file_problem`); each key must
    be a plain dataset within the data layer's limits (`saferl_ros.hdf5_limits.array_problem`)
    with the episode's ``steps`` rows. DSRL keys are required; the others are read if present.
    """
    file = run_dir / entry['file']
    why = plain_file_problem(run_dir, entry['file'])
    if why is not None:
        raise RecordingError(f'{file}: {why}; {_EPISODE_FIX}')
    try:
        h5 = h5py.File(file, 'r', rdcc_nbytes=1 << 20)
    except OSError as exc:
        raise RecordingError(f'{file}: cannot be opened as HDF5 (truncated or corrupt?): {exc}; '
                             f'{_EPISODE_FIX}') from None
    items: Dict[str, h5py.Dataset] = {}
    data = {}
    with h5:
        names = set(h5.keys())            # link names: nothing is followed or opened
        for key in keys:                  # every key is checked before any is read
            if key not in names:
                if key in DSRL_KEYS:
                    raise RecordingError(f'{file}: {key}: missing (an episode file holds '
                                         f'{", ".join(DSRL_KEYS)}); {_EPISODE_FIX}')
                continue
            try:
                why = link_problem(h5, key)
                item = None if why else h5[key]
                if why is None and not isinstance(item, h5py.Dataset):
                    why = f'is a {type(item).__name__}, not a dataset'
                why = why or array_problem(item)
                if why is None and (not item.shape or item.shape[0] != entry['steps']):
                    why = (f'has shape {item.shape}, but {INDEX} says the episode has '
                           f'{entry["steps"]} steps')
            except (OSError, ValueError, RuntimeError) as exc:
                why = f'cannot be examined (truncated or corrupt file?): {exc}'
            if why is not None:
                raise RecordingError(f'{file}: {key}: {why}; {_EPISODE_FIX}')
            items[key] = item
        for key, item in items.items():
            try:
                data[key] = item[()]
            except (OSError, ValueError, RuntimeError) as exc:
                raise RecordingError(f'{file}: {key}: cannot be read (truncated or corrupt '
                                     f'file?): {exc}; {_EPISODE_FIX}') from None
    return data


def load_episodes(run_dir, keys=DSRL_KEYS + EXTRA_KEYS,
                  index: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """
    Concatenate ``keys`` of the completed episodes listed in the index (DSRL keys + extras).

    ``index`` is the run's index as :func:`read_index` returned it, for a caller that has read
    it already (it is then not read again, so both work on the same listing); default: read it.

    Only the files the index lists are read, each a regular file inside the run folder, and of
    each only ``keys`` (other datasets are never read), with the data layer's limits checked
    before anything is read. The DSRL keys must be in every episode, an extra in all or none,
    each with the same columns throughout, at most MAX_ROWS rows in all. Raises RecordingError
    naming the file and the fix.
    """
    run_dir = Path(run_dir)
    index = read_index(run_dir) if index is None else index
    if not index['episodes']:
        raise RecordingError(f'{run_dir}: the recording holds no completed episode')
    total = sum(entry['steps'] for entry in index['episodes'])
    if total > MAX_ROWS:
        raise RecordingError(f'{run_dir / INDEX}: lists {total} steps, more than the {MAX_ROWS} '
                             f'a dataset may hold; {_INDEX_FIX}')
    parts: Dict[str, List[np.ndarray]] = {}
    first = run_dir / index['episodes'][0]['file']
    for number, entry in enumerate(index['episodes']):
        file = run_dir / entry['file']
        episode = _read_episode(run_dir, entry, keys)
        for key in keys:
            if number and (key in episode) != (key in parts):
                lacking, holder = (file, first) if key in parts else (first, file)
                raise RecordingError(f'{lacking}: {key}: missing, but {holder} has it (every '
                                     f'episode of a recording holds the same keys); '
                                     f'{_EPISODE_FIX}')
            if key not in episode:
                continue
            value = episode[key]
            seen = parts[key][0] if number else value
            if (value.shape[1:], value.dtype) != (seen.shape[1:], seen.dtype):
                raise RecordingError(f'{file}: {key}: has shape {value.shape} of {value.dtype}, '
                                     f'but {first} has shape {seen.shape} of {seen.dtype}; '
                                     f'{_EPISODE_FIX}')
            parts.setdefault(key, []).append(value)
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
    data = load_episodes(run_dir, index=index)
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
