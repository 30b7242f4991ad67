"""
Read, validate and write datasets in DSRL's HDF5 layout.

A DSRL file holds flat arrays of transitions: ``observations, next_observations, actions,
rewards, costs, terminals, timeouts``. Files written here load unchanged with dsrl's
``OfflineEnv.get_dataset(h5path)``; recordings may add extra keys, which that loader ignores.

Every problem found names the file, the key and what is wrong, so that a user can fix the file
or the code that produced it. Nothing here downloads anything.
"""

from dataclasses import dataclass
from datetime import datetime, timezone
import hashlib
import json
import os
from pathlib import Path
import re
from typing import Dict, List, Optional

import h5py
import numpy as np

from offline_training.data.tasks import get_task, TaskSpec
from offline_training.data.trajectories import trajectory_returns

REQUIRED_KEYS = ('observations', 'next_observations', 'actions', 'rewards', 'costs',
                 'terminals', 'timeouts')
FLOAT_KEYS = ('observations', 'next_observations', 'actions', 'rewards', 'costs')
FLAG_KEYS = ('terminals', 'timeouts')
MANIFEST_SUFFIX = '.manifest.json'
# Actions in Bullet-Safety-Gym are bounded to [-1, 1]; a little slack absorbs float32 rounding.
ACTION_BOUND = 1.0 + 1e-5
# next_observations[t] must equal observations[t + 1] inside an episode, up to this tolerance.
CONTINUITY_ATOL = 1e-4


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, located by file and key."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        """Format as ``file: key: message``."""
        return f'{self.source}: {self.key}: {self.message}'


class DatasetError(Exception):
    """A dataset cannot be used; ``problems`` lists every reason found."""

    def __init__(self, problems: List[Problem]):
        """Store the problems; the message lists them one per line."""
        self.problems = list(problems)
        super().__init__('\n'.join(str(p) for p in self.problems))


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """No dataset file at the given path or in the dataset directories."""


# Where `saferl-data collect` writes by default: datasets/ at the root of the source checkout.
PROJECT_DATASET_DIR = Path(__file__).resolve().parents[2] / 'datasets'


def dataset_dirs() -> List[Path]:
    """
    Return where datasets are looked for, in order.

    $DSRL_DATASET_DIR (if set), the project's datasets/ folder (where collection writes), then
    dsrl's own cache ~/.dsrl/datasets.
    """
    dirs = []
    if os.environ.get('DSRL_DATASET_DIR'):
        dirs.append(Path(os.environ['DSRL_DATASET_DIR']).expanduser())
    dirs.append(PROJECT_DATASET_DIR)
    dirs.append(Path('~/.dsrl/datasets').expanduser())
    return dirs


def _how_to_get(spec: Optional[TaskSpec]) -> str:
    name = spec.name if spec else 'TASK'
    dsrl_file = spec.dsrl_file_name if spec else 'Safety<Task>-v0-<cmax>-<n>.hdf5'
    return (f"Produce one with `saferl-data collect --task {name}`, or copy DSRL's hosted file "
            f'{dsrl_file} into $DSRL_DATASET_DIR (or ~/.dsrl/datasets) or pass its path.')


def resolve_dataset_path(path=None, task=None) -> Path:
    """
    Return the dataset file for an explicit path, or the task's file in the dataset dirs.

    A task's file is ``Safety<Task>-v0-*.hdf5`` (DSRL's naming); the newest match wins.
    Raises DatasetNotFoundError naming every place searched and how to produce a dataset.
    """
    spec = get_task(task) if task is not None else None
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        raise DatasetNotFoundError([Problem(str(path), '-', 'no such file. ' + _how_to_get(spec))])
    if spec is None:
        raise DatasetNotFoundError([Problem('-', '-', 'give a dataset path or a task name')])
    searched = []
    for folder in dataset_dirs():
        searched.append(str(folder))
        matches = sorted(folder.glob(f'Safety{spec.name}-v0-*.hdf5'), key=os.path.getmtime)
        if matches:
            return matches[-1]
    raise DatasetNotFoundError([Problem(
        f'Safety{spec.name}-v0-*.hdf5', '-',
        f'no dataset for {spec.name} in {", ".join(searched)}. ' + _how_to_get(spec))])


def infer_task(path, attrs=None) -> Optional[TaskSpec]:
    """Guess a file's task from its ``task`` attribute, then from a DSRL-style file name."""
    if attrs is not None and 'task' in attrs:
        value = attrs['task']
        return get_task(value.decode() if isinstance(value, bytes) else str(value))
    match = re.match(r'(?:Safety|Offline)?([A-Z][a-z]+(?:Circle|Run))', Path(path).name)
    if match:
        try:
            return get_task(match.group(1))
        except KeyError:
            return None
    return None


def _read_arrays(path: Path, problems: List[Problem]):
    """Read every dataset of an HDF5 file; record why not if it cannot be read."""
    source = str(path)
    if not path.is_file():
        problems.append(Problem(source, '-', 'no such file'))
        return None, None
    if path.stat().st_size == 0:
        problems.append(Problem(source, '-', 'file is empty (0 bytes)'))
        return None, None
    if not h5py.is_hdf5(path):
        problems.append(Problem(source, '-', 'not an HDF5 file (bad signature)'))
        return None, None
    data, attrs = {}, {}
    try:
        with h5py.File(path, 'r') as h5:
            attrs = dict(h5.attrs)
            for key, item in h5.items():
                if not isinstance(item, h5py.Dataset):
                    continue
                try:
                    data[key] = item[()]
                except (OSError, ValueError) as err:
                    problems.append(Problem(source, key, f'cannot be read (truncated or '
                                                         f'corrupt file?): {err}'))
    except OSError as err:
        problems.append(Problem(source, '-', f'cannot be opened (truncated or corrupt file?): '
                                             f'{err}'))
        return None, None
    return data, attrs


def validate_arrays(data: Dict[str, np.ndarray], task=None, source='<arrays>') -> List[Problem]:
    """Check DSRL arrays against the layout and, if known, the task; return every problem."""
    problems = []

    def bad(key, message):
        problems.append(Problem(source, key, message))

    missing = [k for k in REQUIRED_KEYS if k not in data]
    for key in missing:
        bad(key, 'required key is missing (DSRL files need ' + ', '.join(REQUIRED_KEYS) + ')')
    if missing:
        return problems
    arrays = {k: np.asarray(data[k]) for k in REQUIRED_KEYS}
    n = arrays['observations'].shape[0] if arrays['observations'].ndim else 0
    if n == 0:
        bad('observations', 'contains no transitions')
        return problems

    spec = get_task(task) if task is not None else None
    expected_width = {'observations': spec.obs_dim if spec else None,
                      'next_observations': spec.obs_dim if spec else None,
                      'actions': spec.act_dim if spec else None}
    for key, array in arrays.items():
        if array.shape[:1] != (n,):
            bad(key, f'has {array.shape[0] if array.ndim else 0} rows but observations has {n}')
            continue
        if key in expected_width:
            if array.ndim != 2:
                bad(key, f'must be 2-D (transitions x features), got shape {array.shape}')
            elif expected_width[key] is not None and array.shape[1] != expected_width[key]:
                what = 'observation' if 'observation' in key else 'action'
                bad(key, f'has {array.shape[1]} columns but {spec.name} has a {what} size of '
                         f'{expected_width[key]} (wrong task?)')
        elif array.ndim != 1 and array.shape[1:] != (1,):
            bad(key, f'must be 1-D (one value per transition), got shape {array.shape}')
        if key in FLOAT_KEYS and array.dtype.kind != 'f':
            bad(key, f'must be floating point, got dtype {array.dtype}')
        elif key in FLAG_KEYS and array.dtype.kind not in 'biuf':
            bad(key, f'must be boolean or 0/1 numbers, got dtype {array.dtype}')
    if problems:
        return problems

    for key in FLOAT_KEYS:
        finite = np.isfinite(arrays[key])
        if not finite.all():
            rows = np.flatnonzero(~finite.reshape(n, -1).all(axis=1))
            bad(key, f'{rows.size} transitions hold NaN or Inf (first at index {rows[0]})')
    for key in FLAG_KEYS:
        values = arrays[key].reshape(-1)
        if not np.isin(values, (0, 1)).all():
            odd = np.unique(values[~np.isin(values, (0, 1))])[:5]
            bad(key, f'must hold only 0/1, found {odd}')
    if problems:
        return problems

    actions = arrays['actions']
    if np.abs(actions).max() > ACTION_BOUND:
        rows = np.flatnonzero(np.abs(actions).max(axis=1) > ACTION_BOUND)
        bad('actions', f'{rows.size} actions lie outside the action space [-1, 1] '
                       f'(first at index {rows[0]}: {actions[rows[0]]}); clip them when recording')
    if (arrays['costs'] < 0).any():
        bad('costs', f'{int((arrays["costs"] < 0).sum())} negative costs; costs are >= 0')

    ends = (arrays['terminals'].reshape(-1) != 0) | (arrays['timeouts'].reshape(-1) != 0)
    if not ends[-1]:
        bad('terminals', 'the last transition ends no episode (neither terminal nor timeout): '
                         'the file is cut off mid-episode')
    inside = np.flatnonzero(~ends[:-1])
    if inside.size:
        jump = np.abs(arrays['next_observations'][inside] - arrays['observations'][inside + 1])
        broken = inside[jump.max(axis=1) > CONTINUITY_ATOL]
        if broken.size:
            bad('timeouts', f'{broken.size} transitions inside an episode have '
                            'next_observations[t] != observations[t+1] (first at index '
                            f'{broken[0]}): an episode boundary is missing its terminal or '
                            'timeout flag')
    if spec is not None:
        _, _, starts, stops = trajectory_returns(arrays)
        too_long = np.flatnonzero(stops - starts > spec.horizon)
        if too_long.size:
            bad('timeouts', f'{too_long.size} episodes are longer than the {spec.name} horizon of '
                            f'{spec.horizon} steps (first starts at index {starts[too_long[0]]}): '
                            'a timeout flag is missing')
    return problems


def validate_file(path, task=None) -> List[Problem]:
    """
    Return every problem of a dataset file; an empty list means it is valid.

    The task comes from ``task``, else the file's ``task`` attribute, else its DSRL-style name.
    """
    path = Path(path)
    problems: List[Problem] = []
    data, attrs = _read_arrays(path, problems)
    if data is None:
        return problems
    try:
        spec = get_task(task) if task is not None else infer_task(path, attrs)
    except KeyError as err:
        return problems + [Problem(str(path), 'task', str(err.args[0]))]
    if spec is None:
        problems.append(Problem(str(path), 'task', 'cannot tell which task this file is for '
                                                   '(no task attribute, no DSRL file name); '
                                                   'pass --task'))
    return problems + validate_arrays(data, spec, source=str(path))


def load_dataset(path=None, task=None, validate=True) -> Dict[str, np.ndarray]:
    """
    Load a DSRL dataset as DSRL does: float32 arrays, 1-D rewards, costs and flags.

    ``path`` is a file; without it the task's file is looked up in the folders of
    `dataset_dirs`. Never downloads. Raises DatasetError listing every problem found.
    Extra keys (recording extras) are returned unchanged.
    """
    path = resolve_dataset_path(path, task)
    problems: List[Problem] = []
    data, attrs = _read_arrays(path, problems)
    if data is None or problems:
        raise DatasetError(problems)
    if validate:
        spec = get_task(task) if task is not None else infer_task(path, attrs)
        problems = validate_arrays(data, spec, source=str(path))
        if problems:
            raise DatasetError(problems)
    for key in FLOAT_KEYS + FLAG_KEYS:
        array = np.asarray(data[key])
        if key not in ('observations', 'next_observations', 'actions'):
            array = array.reshape(-1)
        data[key] = array.astype(np.float32)
    return data


def file_sha256(path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _stats(values: np.ndarray) -> Dict[str, float]:
    return {'min': float(values.min()), 'max': float(values.max()),
            'mean': float(values.mean()), 'std': float(values.std())}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dataset(path, data: Dict[str, np.ndarray], task, attrs: Optional[dict] = None) -> dict:
    """
    Validate and write a DSRL-format HDF5 file (gzip) atomically, plus its manifest.

    The file is written to a temporary name in the same folder and renamed into place, so a
    reader never sees a half-written file and an existing file survives a failed write. The
    manifest ``PATH.manifest.json`` records the sha256, counts and return statistics.
    Raises DatasetError (writing nothing) if the arrays are invalid for the task.
    """
    spec = get_task(task)
    path = Path(path)
    problems = validate_arrays(data, spec, source=str(path))
    if problems:
        raise DatasetError(problems)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc).isoformat(timespec='seconds')
    file_attrs = {'task': spec.name, 'env_id': spec.env_id, 'format': 'dsrl',
                  'created': created, **(attrs or {})}
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with h5py.File(tmp, 'w') as h5:
            for key, value in file_attrs.items():
                plain = isinstance(value, (int, float, str))
                h5.attrs[key] = value if plain else json.dumps(value)
            for key, value in data.items():
                array = np.asarray(value)
                if key in FLOAT_KEYS:
                    array = array.astype(np.float32)
                    if key not in ('observations', 'next_observations', 'actions'):
                        array = array.reshape(-1)
                elif key in FLAG_KEYS:
                    array = array.reshape(-1).astype(bool)
                compress = {'compression': 'gzip', 'compression_opts': 4, 'shuffle': True} \
                    if array.ndim and array.size > 1 else {}
                h5.create_dataset(key, data=array, **compress)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

    reward_returns, cost_returns, starts, stops = trajectory_returns(data)
    manifest = {
        'file': path.name,
        'sha256': file_sha256(path),
        'bytes': path.stat().st_size,
        'task': spec.name,
        'created': created,
        'transitions': int(np.asarray(data['observations']).shape[0]),
        'trajectories': int(starts.size),
        'episode_length': _stats((stops - starts).astype(np.float64)),
        'reward_return': _stats(reward_returns),
        'cost_return': _stats(cost_returns),
        'keys': sorted(data.keys()),
        'attrs': {k: v for k, v in file_attrs.items() if k not in ('task', 'created')},
    }
    _atomic_write_text(Path(str(path) + MANIFEST_SUFFIX), json.dumps(manifest, indent=2) + '\n')
    return manifest
