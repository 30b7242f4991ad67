"""
Read, validate and write datasets in DSRL's HDF5 layout.

A DSRL file holds flat arrays of transitions: ``observations, next_observations, actions,
rewards, costs, terminals, timeouts``. Files written here load unchanged with dsrl's
``OfflineEnv.get_dataset(h5path)``; recordings may add extra keys, which that loader ignores.

Every problem found names the file, the key and what is wrong, so that a user can fix the file
or the code that produced it. Nothing here downloads anything.
"""

from dataclasses import dataclass, field
from datetime import datetime, timezone
import json
import os
from pathlib import Path
import re
from typing import Dict, Iterable, List, Optional, Tuple

import h5py
import numpy as np

from offline_training.data.trajectories import trajectory_returns
# The extras that saferl_ros recordings add (numpy + h5py module, no ROS): accepted without a note.
from saferl_ros.dataset_keys import DSRL_KEYS, FLAG_KEYS, FLOAT_KEYS, VECTOR_KEYS
from saferl_ros.files import atomic_write_json, file_kind, sha256_file
from saferl_ros.hdf5_limits import (chunk_stream_problem, declaration_problem, describe_shortfall,
                                    elsewhere_problem, link_problem, rows_problem,
                                    storage_shortfall)
# The limits, re-exported: what a file may declare (documented in docs/data.md).
from saferl_ros.hdf5_limits import (MAX_CHUNK_BYTES, MAX_EXPANSION, MAX_ROW_BYTES,  # noqa: F401
                                    MAX_ROWS, SMALL_ARRAY_BYTES)
from saferl_ros.recorder import EXTRA_KEYS as RECORDING_KEYS, write_hdf5_atomic
from saferl_ros.tasks import get_task, TaskSpec

MANIFEST_SUFFIX = '.manifest.json'
# Actions in Bullet-Safety-Gym are bounded to [-1, 1]; a little slack absorbs float32 rounding.
ACTION_BOUND = 1.0 + 1e-5
# next_observations[t] must equal observations[t + 1] inside an episode, up to this tolerance.
CONTINUITY_ATOL = 1e-4

# What a file may declare (rows, bytes per row, chunk sizes, filters, stored bytes) is checked
# before anything is read, with the limits the recorder's reader shares (saferl_ros.hdf5_limits).
# Values are checked in blocks of rows of about BLOCK_BYTES per key, more (up to MAX_BLOCK_BYTES)
# to cover whole chunks: the memory used stays bounded whatever the file's size. Whole chunks are
# read at once, so a small HDF5 chunk cache per array suffices (HDF5 2.0's default is 8 MiB).
BLOCK_BYTES = 1 << 20
MAX_BLOCK_BYTES = 16 << 20
CHUNK_CACHE_BYTES = 1 << 20
# Files whose transitions were generated (OASIS's reshaping), not collected, carry the attribute
# generated = True and their provenance (generated_info); tools say so wherever they read one.
GENERATED_ATTR = 'generated'
GENERATED_KEYS = ('generator', 'source', 'source_sha256', 'mode', 'kappa', 'conditions', 'model',
                  'raw_transitions', 'generated_transitions')
# A dataset whose cost labels were removed on purpose (``saferl-data split-demos``) carries the
# file attribute COST_LABELS_ATTR = UNLABELLED and NaN in every row of ``costs``: the DSRL layout
# stays (dsrl's loader reads it), and code that wrongly reads the costs gets NaN, not a plausible
# zero. Only such a file may hold NaN costs, and it may hold nothing else there.
COST_LABELS_ATTR = 'cost_labels'
UNLABELLED = 'removed'
_PLAIN_FIX = 'DSRL files hold plain datasets; rewrite the file with real arrays'
_REWRITE_FIX = ('the file is damaged or not a DSRL dataset: regenerate it (saferl-data collect) '
                'or copy the original file again')


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


def resolve_dataset_path(path=None, task=None, dirs: Optional[List[Path]] = None) -> Path:
    """
    Return the dataset file for an explicit path, or the task's file in the dataset dirs.

    A task's file is ``Safety<Task>-v0-*.hdf5`` (DSRL's naming); the newest match wins.
    ``dirs``: the folders to search, in order (default ``dataset_dirs()``).
    Raises DatasetNotFoundError naming every place searched and how to produce a dataset.
    """
    spec = get_task(task) if task is not None else None
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        if path.exists():        # a folder, a FIFO, a device: there, but not a dataset file
            kind = file_kind(path.stat().st_mode)
            raise DatasetNotFoundError([Problem(
                str(path), '-', f'is {kind}, not a regular file; give an HDF5 dataset file')])
        raise DatasetNotFoundError([Problem(str(path), '-', 'no such file. ' + _how_to_get(spec))])
    if spec is None:
        raise DatasetNotFoundError([Problem('-', '-', 'give a dataset path or a task name')])
    searched = []
    for folder in (dataset_dirs() if dirs is None else dirs):
        searched.append(str(folder))
        # regular files only: a dangling link or a folder of that name is passed over, not
        # allowed to end the search (or to shadow a good file) with an unrelated error
        matches = sorted((p for p in folder.glob(f'Safety{spec.name}-v0-*.hdf5')
                          if p.is_file()), key=os.path.getmtime)
        if matches:
            return matches[-1]
    raise DatasetNotFoundError([Problem(
        f'Safety{spec.name}-v0-*.hdf5', '-',
        f'no dataset for {spec.name} in {", ".join(searched)}. ' + _how_to_get(spec))])


def infer_task(path, attrs=None) -> Optional[TaskSpec]:
    """Guess a file's task from its ``task`` attribute, then from a DSRL-style file name."""
    if attrs is not None and 'task' in attrs:
        value = attrs['task']
        return get_task(value.decode('utf-8', 'replace') if isinstance(value, bytes)
                        else str(value))
    match = re.match(r'(?:Safety|Offline)?([A-Z][a-z]+(?:Circle|Run))', Path(path).name)
    if match:
        try:
            return get_task(match.group(1))
        except KeyError:
            return None
    return None


def generated_info(attrs) -> Optional[dict]:
    """
    Return the generation record of a file's attributes, or None for collected data.

    ``attrs`` is an h5py attribute set (or a dict). JSON-text attributes are decoded.
    """
    try:
        if not bool(attrs.get(GENERATED_ATTR, False)):
            return None
    except (OSError, TypeError, ValueError):
        return None
    info = {}
    for key in GENERATED_KEYS:
        try:
            value = attrs[key] if key in attrs else None
        except (OSError, TypeError, ValueError):
            continue
        if value is None:
            continue
        if isinstance(value, bytes):
            value = value.decode('utf-8', 'replace')   # a note to show, not data to trust
        if isinstance(value, str) and value[:1] in '[{':
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):     # '[' * 100 000 is not a record
                pass
        info[key] = value.item() if isinstance(value, np.generic) else value
    return info


def file_generated_info(path) -> Optional[dict]:
    """Return the generation record of a dataset file (attributes only), or None."""
    try:
        with h5py.File(path, 'r') as h5:
            return generated_info(h5.attrs)
    except (OSError, ValueError):
        return None


def describe_generated(info: dict) -> str:
    """Return one line saying that a file is generated, by what, from which source."""
    sha = str(info.get('source_sha256', '?'))[:12]
    mode = info.get('mode', 'replace')
    extra = ' plus the raw transitions' if mode == 'mix' else ''
    return (f'GENERATED by {info.get("generator", "?")} from source sha256 {sha}...{extra}: '
            'synthetic transitions, not collected data')


def _unread_problem(item: h5py.Dataset) -> Optional[str]:
    """
    Return why reading a dataset that is not read would be refused, from its metadata alone.

    What it declares (`declaration_problem`), then whether it is backed by stored data; the
    chunk streams of a key that is never read are not inflated.
    """
    try:
        why = declaration_problem(item)
        if why is None:
            shortfall = storage_shortfall(item)
            why = describe_shortfall(*shortfall) if shortfall is not None else None
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        why = f'cannot be examined ({err})'
    return why


def _storage_problems(datasets: Dict[str, h5py.Dataset], source: str) -> List[Problem]:
    """
    Return the problems of what the datasets to be read declare and store, reading no array.

    First each array's declaration (`declaration_problem`: rows, bytes per row, chunk size,
    filters), then one problem per kind of storage shortfall naming every key that has it, then,
    only if all of that passes, whether a stored chunk inflates past its declared size.
    """
    problems = []
    for key, item in datasets.items():
        why = declaration_problem(item)
        if why is not None:
            problems.append(Problem(source, key, f'{why}; {_REWRITE_FIX}'))
    if problems:
        return problems
    found: Dict[str, list] = {}
    for key, item in datasets.items():
        shortfall = storage_shortfall(item)
        if shortfall is not None:
            found.setdefault(shortfall[0], []).append((key,) + shortfall[1:])
    for kind, entries in found.items():
        keys = ', '.join(entry[0] for entry in entries)
        what = describe_shortfall(kind, *(sum(entry[i] for entry in entries) for i in (1, 2, 3)))
        problems.append(Problem(source, keys, f'{what}; {_REWRITE_FIX}'))
    if problems:
        return problems
    for key, item in datasets.items():
        why = chunk_stream_problem(item)
        if why is not None:
            problems.append(Problem(source, key, f'{why}; {_REWRITE_FIX}'))
    return problems


def _task_attr(h5: h5py.File) -> dict:
    """Return ``{'task': value}`` if the file has a task attribute (nothing else is read)."""
    try:
        return {'task': h5.attrs['task']} if 'task' in h5.attrs else {}
    except (OSError, TypeError, ValueError):
        return {}


# Top-level names a dataset file may hold: DSRL's keys, a recording's and a few extras are ~30.
MAX_TOP_LEVEL_NAMES = 1024


def _inspect_objects(h5: h5py.File, source: str, problems: List[Problem],
                     notes: List[Problem], read=None) -> Dict[str, h5py.Dataset]:
    """
    Return the plain datasets at the top of a file, reading no data.

    Soft and external links are refused without being followed (dsrl's loader does not see
    them, and an external link points anywhere, HDF5 or not), and so are virtual or externally
    stored datasets, whose data lies in other files. A second name for an array already listed
    (a hard link) is refused too, since dsrl's loader sees each array once. Groups and datasets
    outside the DSRL and recording keys are notes, not problems. ``read``: the keys that will be
    read (None: every dataset); a dataset outside them that would be refused if read
    (`_unread_problem`) gets a note saying why, not a problem, since it is never read.
    """
    datasets: Dict[str, h5py.Dataset] = {}
    names_of: Dict[object, str] = {}     # object id -> its first name (ids hash by address)
    count = len(h5)
    if count > MAX_TOP_LEVEL_NAMES:
        # each name costs a lookup: tens of thousands of names in a small file would take minutes
        problems.append(Problem(source, '-', f'holds {count} top-level names, more than the '
                                             f'{MAX_TOP_LEVEL_NAMES} a dataset may have; '
                                             f'{_PLAIN_FIX}'))
        return datasets
    for key in h5.keys():
        why = link_problem(h5, key)
        if why is not None:
            problems.append(Problem(source, key, f'{why}; {_PLAIN_FIX}'))
            continue
        item = h5[key]
        if not isinstance(item, h5py.Dataset):
            kind = 'group' if isinstance(item, h5py.Group) else type(item).__name__
            notes.append(Problem(source, key, f'{kind} outside the DSRL layout; ignored here '
                                              "(dsrl's loader reads any datasets inside it)"))
            continue
        why = elsewhere_problem(item)
        if why is not None:
            problems.append(Problem(source, key, f'{why}; {_PLAIN_FIX}'))
            continue
        alias = names_of.get(item.id)
        if alias is not None:
            problems.append(Problem(source, key, 'is a second name (hard link) for the array '
                                                 f"stored as '{alias}'; dsrl's loader sees only "
                                                 f'one of them; {_PLAIN_FIX}'))
            continue
        datasets[key] = item
        names_of[item.id] = key
        unread = None if read is None or key in read else _unread_problem(item)
        refused = '' if unread is None else f'; reading it would be refused: {unread}'
        if key not in DSRL_KEYS and key not in RECORDING_KEYS:
            notes.append(Problem(source, key, 'extra dataset, not a DSRL or recording key; '
                                              + ('never read (training ignores it)' + refused
                                                 if refused else 'training ignores it')))
        elif refused:
            notes.append(Problem(source, key, 'recording key, never read here' + refused))
    return datasets


def _check_layout(arrays, spec: Optional[TaskSpec], bad) -> None:
    """
    Check the declared layout of the DSRL keys: shapes, row counts and dtypes; read no data.

    ``arrays`` maps every required key to anything with ``shape`` and ``dtype`` (a numpy array
    or an unread h5py dataset), so a file's declarations are checked before anything is read.
    """
    shapes = {k: tuple(arrays[k].shape or ()) for k in DSRL_KEYS}
    n = shapes['observations'][0] if shapes['observations'] else 0
    if n == 0:
        bad('observations', 'contains no transitions')
        return
    too_many = rows_problem(n)
    if too_many:
        bad('observations', f'{too_many}; {_REWRITE_FIX}')
        return
    expected_width = {'observations': spec.obs_dim if spec else None,
                      'next_observations': spec.obs_dim if spec else None,
                      'actions': spec.act_dim if spec else None}
    for key in DSRL_KEYS:
        shape, dtype = shapes[key], arrays[key].dtype
        if shape[:1] != (n,):
            bad(key, f'has {shape[0] if shape else 0} rows but observations has {n}')
            continue
        if key in expected_width:
            if len(shape) != 2:
                bad(key, f'must be 2-D (transitions x features), got shape {shape}')
            elif expected_width[key] is not None and shape[1] != expected_width[key]:
                what = 'observation' if 'observation' in key else 'action'
                bad(key, f'has {shape[1]} columns but {spec.name} has a {what} size of '
                         f'{expected_width[key]} (wrong task?)')
            elif shape[1] == 0:
                bad(key, f'has no columns, got shape {shape}')
        elif len(shape) != 1 and shape[1:] != (1,):
            bad(key, f'must be 1-D (one value per transition), got shape {shape}')
        if key in FLOAT_KEYS and dtype.kind != 'f':
            bad(key, f'must be floating point, got dtype {dtype}')
        elif key in FLAG_KEYS and dtype.kind not in 'biuf':
            bad(key, f'must be boolean or 0/1 numbers, got dtype {dtype}')


def _block_rows(arrays) -> int:
    """
    Return how many rows `_check_values` reads at a time.

    About BLOCK_BYTES of the widest key, and for a chunked file a whole number of the
    observations' chunks, so that each chunk is decompressed once: a block reaches up to one
    chunk's rows (h5py's chunks hold <= 1 MiB) but no more than MAX_BLOCK_BYTES of the widest key.
    """
    widest = max(max(1, int(np.prod(arrays[k].shape[1:], dtype=np.int64)))
                 * arrays[k].dtype.itemsize for k in DSRL_KEYS)
    step = max(1, BLOCK_BYTES // widest)
    chunks = getattr(arrays['observations'], 'chunks', None)
    if chunks:
        if chunks[0] > step:
            step = max(step, min(chunks[0], MAX_BLOCK_BYTES // widest))
        else:
            step -= step % chunks[0]
    return step


class _ReadError(Exception):
    """A block of ``key`` could not be read from the file."""

    def __init__(self, key: str, err: Exception):
        super().__init__(key, err)
        self.key, self.err = key, err


def _check_values(arrays, spec: Optional[TaskSpec], bad, unlabelled: bool = False) -> None:
    """
    Check the values of DSRL arrays whose layout is valid, streaming over blocks of rows.

    ``arrays`` maps the required keys to numpy arrays or h5py datasets; only one block of rows
    of each key is held at a time (see `_block_rows`), so a file is checked without loading it.
    ``unlabelled``: the cost labels were removed, so every cost must be NaN.
    """
    n = arrays['observations'].shape[0]
    step = _block_rows(arrays)

    def read(key, start, stop):
        try:
            return np.asarray(arrays[key][start:stop])
        except (OSError, ValueError) as err:
            raise _ReadError(key, err) from err

    nonfinite = {k: [0, None] for k in FLOAT_KEYS}      # rows, first index
    labelled_rows = [0, None]                           # finite costs in an unlabelled dataset
    odd_flags: Dict[str, list] = {k: [] for k in FLAG_KEYS}
    outside = [0, None, None]                           # rows, first index, first action
    negative = 0
    broken = [0, None]
    too_long = [0, None]
    episode_start, last_ends = 0, True
    carried = None     # (t, next_observations[t]) for the last row t of a block inside an episode
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = stop - start
        block = {k: read(k, start, stop) for k in DSRL_KEYS}
        if unlabelled:
            finite = np.flatnonzero(~np.isnan(block['costs'].reshape(-1)))
            if finite.size:
                if labelled_rows[1] is None:
                    labelled_rows[1] = start + int(finite[0])
                labelled_rows[0] += finite.size
        for key in FLOAT_KEYS:
            if unlabelled and key == 'costs':
                continue
            # checked as loaded (float32): a float64 1e300 is finite as stored, Inf in training
            with np.errstate(over='ignore', invalid='ignore'):
                loaded = block[key].reshape(rows, -1).astype(np.float32, copy=False)
            bad_rows = ~np.isfinite(loaded).all(axis=1)
            if bad_rows.any():
                if nonfinite[key][1] is None:
                    nonfinite[key][1] = start + int(np.argmax(bad_rows))
                nonfinite[key][0] += int(bad_rows.sum())
        for key in FLAG_KEYS:
            values = block[key].reshape(-1)
            odd = ~np.isin(values, (0, 1))
            if odd.any():
                odd_flags[key].append(np.unique(values[odd])[:5])

        magnitude = np.abs(block['actions']).max(axis=1)
        out = np.flatnonzero(magnitude > ACTION_BOUND)
        if out.size:
            if outside[1] is None:
                outside[1:] = [start + int(out[0]), block['actions'][out[0]].copy()]
            outside[0] += out.size
        negative += int((block['costs'] < 0).sum())

        ends = (block['terminals'].reshape(-1) != 0) | (block['timeouts'].reshape(-1) != 0)
        last_ends = bool(ends[-1])
        # next_observations[t] == observations[t + 1] inside episodes: the pair across the
        # previous block's edge first (it has the lower index), then the pairs in this block.
        if carried is not None:
            if np.abs(carried[1] - block['observations'][0]).max() > CONTINUITY_ATOL:
                broken[1] = carried[0] if broken[1] is None else broken[1]
                broken[0] += 1
        if rows > 1:
            jump = block['next_observations'][:rows - 1] - block['observations'][1:]
            np.abs(jump, out=jump)
            jumped = np.flatnonzero((jump.max(axis=1) > CONTINUITY_ATOL) & ~ends[:rows - 1])
            if jumped.size:
                broken[1] = start + int(jumped[0]) if broken[1] is None else broken[1]
                broken[0] += jumped.size
        carried = None if last_ends else (stop - 1, block['next_observations'][-1].copy())
        if spec is not None:
            if stop == n:
                ends[-1] = True        # the tail counts as an episode, as trajectory_returns does
            stops = start + np.flatnonzero(ends) + 1
            if stops.size:
                starts = np.concatenate([[episode_start], stops[:-1]])
                long_ones = np.flatnonzero(stops - starts > spec.horizon)
                if long_ones.size:
                    if too_long[1] is None:
                        too_long[1] = int(starts[long_ones[0]])
                    too_long[0] += long_ones.size
                episode_start = int(stops[-1])

    for key in FLOAT_KEYS:
        count, first = nonfinite[key]
        if count:
            hint = ''
            if key == 'costs':
                hint = (f'; a dataset without cost labels must say so: file attribute '
                        f'{COST_LABELS_ATTR}={UNLABELLED!r} (saferl-data split-demos writes it)')
            bad(key, f'{count} transitions hold NaN or Inf (first at index {first}){hint}')
    if labelled_rows[0]:
        bad('costs', f'{labelled_rows[0]} transitions hold a cost (first at index '
                     f'{labelled_rows[1]}) but the file is marked {COST_LABELS_ATTR}='
                     f'{UNLABELLED!r}: every cost must be NaN; remove the mark or the costs')
    for key in FLAG_KEYS:
        if odd_flags[key]:
            bad(key, f'must hold only 0/1, found {np.unique(np.concatenate(odd_flags[key]))[:5]}')
    if any(v[0] for v in nonfinite.values()) or any(odd_flags.values()):
        return

    if outside[0]:
        bad('actions', f'{outside[0]} actions lie outside the action space [-1, 1] '
                       f'(first at index {outside[1]}: {outside[2]}); clip them when recording')
    if negative:
        bad('costs', f'{negative} negative costs; costs are >= 0')
    if not last_ends:
        bad('terminals', 'the last transition ends no episode (neither terminal nor timeout): '
                         'the file is cut off mid-episode')
    if broken[0]:
        bad('timeouts', f'{broken[0]} transitions inside an episode have '
                        'next_observations[t] != observations[t+1] (first at index '
                        f'{broken[1]}): an episode boundary is missing its terminal or '
                        'timeout flag')
    if too_long[0]:
        bad('timeouts', f'{too_long[0]} episodes are longer than the {spec.name} horizon of '
                        f'{spec.horizon} steps (first starts at index {too_long[1]}): '
                        'a timeout flag is missing')


def validate_arrays(data: Dict[str, np.ndarray], task=None, source='<arrays>',
                    unlabelled: bool = False) -> List[Problem]:
    """
    Check DSRL arrays against the layout and, if known, the task; return every problem.

    ``unlabelled``: the arrays are a cost-free dataset, whose costs must all be NaN.
    """
    problems: List[Problem] = []

    def bad(key, message):
        problems.append(Problem(source, key, message))

    missing = [k for k in DSRL_KEYS if k not in data]
    for key in missing:
        bad(key, 'required key is missing (DSRL files need ' + ', '.join(DSRL_KEYS) + ')')
    if missing:
        return problems
    arrays = {k: np.asarray(data[k]) for k in DSRL_KEYS}
    spec = get_task(task) if task is not None else None
    _check_layout(arrays, spec, bad)
    if not problems:
        _check_values(arrays, spec, bad, unlabelled)
    return problems


@dataclass
class DatasetReport:
    """
    What `check_file` found in a dataset file.

    ``problems`` make the file unusable; ``notes`` are warnings (extra groups or keys) that do
    not. ``layout`` maps each plain dataset to its declared (shape, dtype); ``task`` is the task
    used for the checks (None if unknown); ``unlabelled``: the file is marked cost-free (its
    costs are all NaN, see COST_LABELS_ATTR).
    """

    path: Path
    problems: List[Problem] = field(default_factory=list)
    notes: List[Problem] = field(default_factory=list)
    layout: Dict[str, Tuple[tuple, np.dtype]] = field(default_factory=dict)
    task: Optional[TaskSpec] = None
    generated: Optional[dict] = None
    unlabelled: bool = False


def is_unlabelled(attrs) -> bool:
    """Return whether a file's attributes mark it as a dataset whose cost labels were removed."""
    try:
        value = attrs[COST_LABELS_ATTR] if COST_LABELS_ATTR in attrs else None
    except (OSError, TypeError, ValueError):
        return False
    if isinstance(value, bytes):
        value = value.decode(errors='replace')
    return value == UNLABELLED


def _open(path: Path, problems: List[Problem]) -> Optional[h5py.File]:
    """Open an HDF5 file for reading; record why not and return None if it cannot be opened."""
    source = str(path)
    if not path.is_file():
        problems.append(Problem(source, '-', 'no such file'))
        return None
    if path.stat().st_size == 0:
        problems.append(Problem(source, '-', 'file is empty (0 bytes)'))
        return None
    if not h5py.is_hdf5(path):
        problems.append(Problem(source, '-', 'not an HDF5 file (bad signature)'))
        return None
    try:
        return h5py.File(path, 'r', rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as err:
        problems.append(Problem(source, '-', f'cannot be opened (truncated or corrupt file?): '
                                             f'{err}'))
        return None


def _read_keys(keys: Optional[Iterable[str]]) -> Optional[frozenset]:
    """Return the keys a reader reads: the DSRL keys plus ``keys`` (None: every key)."""
    return None if keys is None else frozenset(DSRL_KEYS) | frozenset(keys)


def _inspect(h5: h5py.File, report: DatasetReport, task, require_task: bool,
             keys: Optional[Iterable[str]] = DSRL_KEYS):
    """
    Run every check that reads no data; return the required datasets, or None on problems.

    In order: links and odd objects (every name), the task, missing keys, the declared layout of
    the DSRL keys (shapes, row counts, the row limit, dtypes), then, for every array that will be
    read (the DSRL keys and ``keys``; None: every array), what it declares (rows, bytes per row,
    chunk size, filters), whether it is backed by stored data and whether a stored chunk inflates
    past its declared size (`_storage_problems`). An array that is never read is not limited: if
    reading it would be refused, a note says why.
    """
    source = str(report.path)
    problems = report.problems
    read = _read_keys(keys)
    datasets = _inspect_objects(h5, source, problems, report.notes, read)
    report.unlabelled = is_unlabelled(h5.attrs)
    report.layout = {k: (tuple(d.shape) if d.shape is not None else None, d.dtype)
                     for k, d in datasets.items()}
    try:
        report.task = get_task(task) if task is not None \
            else infer_task(report.path, _task_attr(h5))
    except KeyError as err:
        problems.append(Problem(source, 'task', str(err.args[0])))
        return None
    if task is not None:
        # Two tasks share their shapes (BallCircle and CarCircle, BallRun and CarRun): a --task
        # other than the file's own would train (or merge, relabelled) one robot's data as
        # another's without any other check noticing.
        attrs = _task_attr(h5)
        try:
            own = infer_task(report.path, attrs) if attrs else None
        except KeyError:          # an unknown attribute: --task says what the file is
            own = None
        if own is not None and own.name != report.task.name:
            problems.append(Problem(source, 'task', f'the file says task {own.name} but '
                                                    f'{report.task.name} was given; pass '
                                                    f'--task {own.name} (the data are '
                                                    f'{own.name} data) or fix the attribute'))
            return None
    if report.task is None and require_task:
        problems.append(Problem(source, 'task', 'cannot tell which task this file is for '
                                                '(no task attribute, no DSRL file name); '
                                                'pass --task'))
    missing = [k for k in DSRL_KEYS if k not in datasets]
    for key in missing:
        if not any(p.key == key for p in problems):     # a refused link says more than this
            problems.append(Problem(source, key, 'required key is missing (DSRL files need '
                                                 + ', '.join(DSRL_KEYS) + ')'))
    if missing:
        return None
    layout_problems: List[Problem] = []
    _check_layout(datasets, report.task,
                  lambda key, message: layout_problems.append(Problem(source, key, message)))
    problems.extend(layout_problems)
    if layout_problems:
        return None
    problems.extend(_storage_problems(
        {k: d for k, d in datasets.items() if read is None or k in read}, source))
    if any(p.key != 'task' for p in problems):
        return None
    return datasets


def check_file(path, task=None, values=True, require_task=True,
               keys: Optional[Iterable[str]] = DSRL_KEYS) -> DatasetReport:
    """
    Check a dataset file; return a DatasetReport (no problems means it is valid).

    Everything the file declares (links, keys, shapes, row counts, dtypes, stored bytes) is
    checked before any array is read; then, if ``values``, the values are checked in blocks of
    rows, so memory stays bounded whatever the file's size. The task comes from ``task``, else
    the file's ``task`` attribute, else its DSRL-style name; ``require_task`` makes an unknown
    task a problem. ``keys``: the keys the caller will read besides the DSRL keys (None: every
    dataset in the file); the limits of `saferl_ros.hdf5_limits` apply to those, and an array
    that is never read and would break them is a note, not a problem.
    """
    report = DatasetReport(Path(path))
    h5 = _open(report.path, report.problems)
    if h5 is None:
        return report
    with h5:
        report.generated = generated_info(h5.attrs)
        if report.generated is not None:
            report.notes.append(Problem(str(report.path), GENERATED_ATTR,
                                        describe_generated(report.generated)))
        try:
            datasets = _inspect(h5, report, task, require_task, keys)
            # Datasets come back only when every declaration is sound (an unknown task, if
            # required, may have been reported: the task-independent value checks still run).
            if datasets is not None and values:
                _check_values(datasets, report.task, lambda key, message: report.problems.append(
                    Problem(str(report.path), key, message)), report.unlabelled)
        except _ReadError as err:
            report.problems.append(Problem(str(report.path), err.key,
                                           f'cannot be read (truncated or corrupt file?): '
                                           f'{err.err}'))
        except (OSError, ValueError) as err:
            report.problems.append(Problem(str(report.path), '-',
                                           f'cannot be read (truncated or corrupt file?): {err}'))
    return report


def validate_file(path, task=None) -> List[Problem]:
    """
    Return every problem of a dataset file; an empty list means it is valid.

    The task comes from ``task``, else the file's ``task`` attribute, else its DSRL-style name.
    See `check_file`, which also returns warning-level notes.
    """
    return check_file(path, task).problems


def load_dataset(path=None, task=None, validate=True, keys=None) -> Dict[str, np.ndarray]:
    """
    Load a DSRL dataset as DSRL does: float32 arrays, 1-D rewards, costs and flags.

    ``path`` is a file; without it the task's file is looked up in the folders of
    `dataset_dirs`. Never downloads. Raises DatasetError listing every problem found.
    What the file declares is always checked before anything is read (`check_file`);
    ``validate=False`` skips only the checks of the values. ``keys`` loads only those keys
    (default: every plain dataset; extra keys such as recording extras are returned unchanged).
    The limits of `saferl_ros.hdf5_limits` apply to every key read, and to the DSRL keys, which
    the checks read: with ``keys=None`` an extra key that breaks them refuses the file, while
    code that uses only the DSRL keys passes ``keys=DSRL_KEYS`` and such an extra is a note.
    """
    path = resolve_dataset_path(path, task)
    keys = None if keys is None else list(keys)
    report = check_file(path, task, values=validate, require_task=False, keys=keys)
    if report.problems:
        raise DatasetError(report.problems)
    wanted = list(report.layout) if keys is None else keys
    data: Dict[str, np.ndarray] = {}
    with h5py.File(path, 'r') as h5:
        for key in wanted:
            try:
                data[key] = h5[key][()]
            except (OSError, ValueError, KeyError) as err:
                raise DatasetError([Problem(str(path), key, f'cannot be read (truncated or '
                                                            f'corrupt file?): {err}')]) from err
    for key in FLOAT_KEYS + FLAG_KEYS:
        if key in data:
            array = np.asarray(data[key])
            if key not in VECTOR_KEYS:
                array = array.reshape(-1)
            data[key] = array.astype(np.float32, copy=False)
    return data


def _stats(values: np.ndarray) -> Dict[str, float]:
    return {'min': float(values.min()), 'max': float(values.max()),
            'mean': float(values.mean()), 'std': float(values.std())}


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
    unlabelled = is_unlabelled(attrs or {})
    problems = validate_arrays(data, spec, source=str(path), unlabelled=unlabelled)
    if problems:
        raise DatasetError(problems)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No creation time in the file: the same arrays and attributes give the same bytes (and
    # sha256) on every run; the time goes to the manifest.
    created = datetime.now(timezone.utc).isoformat(timespec='seconds')
    file_attrs = {'task': spec.name, 'env_id': spec.env_id, 'format': 'dsrl', **(attrs or {})}
    arrays = {}
    for key, value in data.items():
        array = np.asarray(value)
        if key in FLOAT_KEYS:
            array = array.astype(np.float32)
            if key not in VECTOR_KEYS:
                array = array.reshape(-1)
        elif key in FLAG_KEYS:
            array = array.reshape(-1).astype(bool)
        arrays[key] = array
    write_hdf5_atomic(path, arrays, file_attrs, compression_level=4)

    reward_returns, cost_returns, starts, stops = trajectory_returns(data)
    manifest = {
        'file': path.name,
        'sha256': sha256_file(path),
        'bytes': path.stat().st_size,
        'task': spec.name,
        'created': created,
        'transitions': int(np.asarray(data['observations']).shape[0]),
        'trajectories': int(starts.size),
        'episode_length': _stats((stops - starts).astype(np.float64)),
        'reward_return': _stats(reward_returns),
        # NaN is not JSON: a cost-free dataset has no cost statistics.
        'cost_return': None if unlabelled else _stats(cost_returns),
        'keys': sorted(data.keys()),
        'attrs': {k: v for k, v in file_attrs.items() if k != 'task'},
    }
    atomic_write_json(Path(str(path) + MANIFEST_SUFFIX), manifest)
    return manifest
