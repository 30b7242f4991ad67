"""
Damaged and hostile recording folders: the index's schema, the episode files it names, limits.

Each recording is written by RecordingWriter in tmp_path (synthetic steps, no simulator), then
damaged. `load_episodes` (and so `saferl-data merge|reshape|tempting` and `consolidate`) must
refuse it with one RecordingError naming the file and the fix, read only regular files inside
the folder, and read only the keys it needs, each checked against the data layer's limits before
anything is read.
"""

import json
import os
from pathlib import Path
import zlib

import h5py
import numpy as np
from offline_training.data import cli
import pytest
from saferl_ros import recorder
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import UserError
from saferl_ros.hdf5_limits import MAX_CHUNK_BYTES
from saferl_ros.recorder import (EXTRA_KEYS, load_episodes, read_index, RecordingError,
                                 RecordingWriter, Step)

TASK = 'BallCircle'
STEPS = 20


def _record(run_dir, episodes=3) -> Path:
    """Write a small valid recording of ``episodes`` episodes of STEPS steps."""
    writer = RecordingWriter(run_dir, TASK, 8, 2)
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        obs = rng.normal(size=8)
        for _ in range(STEPS):
            nxt = rng.normal(size=8)
            writer.add(Step(obs, rng.uniform(-1, 1, 2), 1.0, 0.0, nxt))
            obs = nxt
        writer.end_episode(terminal=False, timeout=True)
    writer.close(consolidate_run=False)
    return Path(run_dir)


def _edit_index(run_dir, change) -> None:
    path = Path(run_dir) / 'index.json'
    index = json.loads(path.read_text())
    path.write_text(json.dumps(change(index)))


def _episode(run_dir, number=1) -> Path:
    return Path(run_dir) / 'episodes' / f'episode_{number:06d}.hdf5'


@pytest.fixture
def run(tmp_path):
    return _record(tmp_path / 'run')


def test_a_valid_recording_loads_its_keys_and_only_those(run):
    data = load_episodes(run)
    assert set(data) == set(DSRL_KEYS) | set(EXTRA_KEYS)
    assert data['observations'].shape == (3 * STEPS, 8)
    assert set(load_episodes(run, keys=DSRL_KEYS)) == set(DSRL_KEYS)
    assert issubclass(RecordingError, UserError)        # one line from every CLI


def _set(key, value):
    def change(index):
        index[key] = value
        return index
    return change


def _entry(key, value, number=0):
    def change(index):
        if value is None:
            del index['episodes'][number][key]
        else:
            index['episodes'][number][key] = value
        return index
    return change


@pytest.mark.parametrize('change, needle', [
    (lambda index: [1, 2], 'index.json: expected a JSON object, found a list'),
    (_set('episodes', {'a': 1}), "index.json: field 'episodes' should be a list, found a dict"),
    (lambda index: {k: v for k, v in index.items() if k != 'episodes'},
     "index.json: field 'episodes' should be a list, found missing"),
    (_set('attrs', None), "field 'attrs' should be a dict, found a NoneType"),
    (_set('episodes', [3]), 'index.json: episodes[0] should be an object, found a int'),
    (_entry('file', None), "index.json: episodes[0]: field 'file' should be a str, found "
                           'missing'),
    (_entry('file', 7), "episodes[0]: field 'file' should be a str, found 7"),
    (_entry('steps', 0), "episodes[0]: field 'steps' should be a positive int, found 0"),
    (_entry('episode', True), "episodes[0]: field 'episode' should be a int, found True"),
    (_entry('file', 'episodes/episode_000001.hdf5'),
     "lists the episode file 'episodes/episode_000001.hdf5' more than once"),
])
def test_the_index_schema_is_checked_naming_the_file_and_the_fix(run, change, needle):
    _edit_index(run, change)
    with pytest.raises(RecordingError) as caught:
        load_episodes(run)
    message = str(caught.value)
    assert needle in message and str(run / 'index.json') in message, message
    assert 'restore the run folder from a copy, or record the run again' in message
    assert '\n' not in message


def test_unreadable_or_oversized_index_files(run, monkeypatch):
    (run / 'index.json').write_text('{"format": ')
    with pytest.raises(RecordingError, match=r'index.json: not valid JSON .*; the recorder'):
        read_index(run)
    _record(run.parent / 'big')
    monkeypatch.setattr(recorder, 'MAX_INDEX_BYTES', 100)
    with pytest.raises(RecordingError, match=r'big/index.json: \d+ bytes, more than the 100'):
        read_index(run.parent / 'big')


def test_an_index_with_a_huge_integer_or_many_entries_is_one_line_and_quick(run):
    """Review 14b: a 4301-digit integer raised a traceback; the duplicate check was quadratic."""
    text = (run / 'index.json').read_text()
    (run / 'index.json').write_text(text.replace('"steps": ', '"steps": ' + '9' * 5000, 1))
    with pytest.raises(RecordingError, match=r'index.json: not valid JSON \(.*digits'):
        read_index(run)
    # 200 000 entries, the last two sharing a file: refused by name in one pass (a quadratic
    # check took hours at the size the index's byte limit allows)
    entries = [{'episode': k, 'file': f'episodes/episode_{k:06d}.hdf5', 'steps': 1}
               for k in range(200_000)]
    entries[-1]['file'] = entries[-2]['file']
    index = json.loads(text)
    index['episodes'] = entries
    (run / 'index.json').write_text(json.dumps(index))
    with pytest.raises(RecordingError, match='episode_199998.hdf5.* more than once'):
        read_index(run)


def _foreign_dataset(tmp_path) -> Path:
    """Return a valid DSRL file outside the recording (what a traversal would merge)."""
    other = _record(tmp_path / 'other', episodes=1)
    return _episode(other, 0)


@pytest.mark.parametrize('case', ['dotdot', 'absolute', 'symlink', 'devzero', 'folder',
                                  'missing', 'linked_folder', 'fifo'])
def test_episode_files_must_be_regular_files_inside_the_folder(tmp_path, run, case):
    foreign = _foreign_dataset(tmp_path)
    target = _episode(run, 1)
    relative = 'episodes/episode_000001.hdf5'
    if case == 'dotdot':
        relative = os.path.relpath(foreign, run)
        assert relative.startswith('..')
    elif case == 'absolute':
        relative = str(foreign)
    elif case == 'symlink':
        target.unlink()
        target.symlink_to(foreign)
    elif case == 'devzero':
        target.unlink()
        target.symlink_to('/dev/zero')
    elif case == 'folder':
        target.unlink()
        target.mkdir()
    elif case == 'missing':
        target.unlink()
    elif case == 'linked_folder':
        os.rename(run / 'episodes', run / 'real_episodes')
        (run / 'episodes').symlink_to(run / 'real_episodes')
    elif case == 'fifo':
        target.unlink()
        os.mkfifo(target)
    _edit_index(run, _entry('file', relative, number=1))
    with pytest.raises(RecordingError) as caught:
        load_episodes(run)
    message = str(caught.value)
    expected = {'dotdot': "only relative paths of plain names, without '..'",
                'absolute': "only relative paths of plain names, without '..'",
                'symlink': f'is a symbolic link (to {foreign})',
                'devzero': 'is a symbolic link (to /dev/zero)',
                'folder': 'is a folder, not a regular file',
                'missing': 'is missing',
                'linked_folder': f'lies behind the symbolic link {run / "episodes"}',
                'fifo': 'is a FIFO (named pipe), not a regular file'}[case]
    assert expected in message, message
    assert 'remove its entry from index.json to use the other episodes' in message
    assert '\n' not in message


def test_a_truncated_episode_file_is_named(run):
    data = _episode(run).read_bytes()
    _episode(run).write_bytes(data[:len(data) // 2])
    with pytest.raises(RecordingError, match=r'episode_000001.hdf5: cannot be opened as HDF5 '
                                             r'\(truncated or corrupt\?\)'):
        load_episodes(run)


def test_episodes_must_agree_on_keys_columns_and_steps(run, tmp_path):
    with h5py.File(_episode(run), 'a') as h5:       # another width for an extra
        del h5['proposed_actions']
        h5['proposed_actions'] = np.zeros((STEPS, 5), np.float32)
    with pytest.raises(RecordingError, match=r'episode_000001.hdf5: proposed_actions: has shape '
                                             r'\(20, 5\) of float32, but .*episode_000000.hdf5 '
                                             r'has shape \(20, 2\)'):
        load_episodes(run)
    assert load_episodes(run, keys=DSRL_KEYS)['actions'].shape == (3 * STEPS, 2)

    other = _record(tmp_path / 'other')
    with h5py.File(_episode(other, 2), 'a') as h5:  # an extra missing from one episode
        del h5['stamps_ns']
    with pytest.raises(RecordingError, match=r'episode_000002.hdf5: stamps_ns: missing, but '
                                             r'.*episode_000000.hdf5 has it'):
        load_episodes(other)
    _edit_index(other, _entry('steps', STEPS + 1, number=0))
    with pytest.raises(RecordingError, match=r'episode_000000.hdf5: observations: has shape '
                                             r'\(20, 8\), but index.json says the episode has '
                                             r'21 steps'):
        load_episodes(other)


def test_a_missing_dsrl_key_or_a_link_is_refused(run):
    with h5py.File(_episode(run), 'a') as h5:
        h5['rewards_copy'] = h5['rewards'][()]
        del h5['rewards']
        h5['rewards'] = h5py.SoftLink('/rewards_copy')
    with pytest.raises(RecordingError, match='rewards: is a soft link to /rewards_copy'):
        load_episodes(run)
    with h5py.File(_episode(run), 'a') as h5:
        del h5['rewards']
    with pytest.raises(RecordingError, match='episode_000001.hdf5: rewards: missing'):
        load_episodes(run)


def _no_reads(monkeypatch, path):
    """Make reading any array of file ``path`` fail the test (the others read as usual)."""
    read = h5py.Dataset.__getitem__

    def refuse(self, *args, **kwargs):
        if Path(self.file.filename) == Path(path):
            raise AssertionError(f'{self.name} of {path} was read')
        return read(self, *args, **kwargs)
    monkeypatch.setattr(h5py.Dataset, '__getitem__', refuse)


def test_unused_keys_are_never_read_whatever_they_declare(run, monkeypatch):
    # a 3 GB extra (750 million float32 rows, never written) in one episode: not a key the
    # recording uses, so it is not even examined
    with h5py.File(_episode(run), 'a') as h5:
        h5.create_dataset('critic_v_h2', shape=(750_000_000,), dtype='f4', chunks=(1 << 20,),
                          compression='gzip')
    data = load_episodes(run)
    assert 'critic_v_h2' not in data and data['observations'].shape == (3 * STEPS, 8)
    # a known extra declaring as much is refused before anything of the file is read
    with h5py.File(_episode(run), 'a') as h5:
        del h5['stamps_ns']
        h5.create_dataset('stamps_ns', shape=(750_000_000,), dtype='i8', chunks=(1 << 16,),
                          compression='gzip')
    _no_reads(monkeypatch, _episode(run))
    with pytest.raises(RecordingError, match=r'episode_000001.hdf5: stamps_ns: declares '
                                             r'750000000 rows, more than the 20000000'):
        load_episodes(run)


def test_a_huge_chunk_or_a_forged_stream_in_an_episode_is_refused_before_reading(
        run, monkeypatch):
    rows = MAX_CHUNK_BYTES // 32 + 1                  # one (rows, 8) float32 chunk > the limit
    with h5py.File(_episode(run), 'a') as h5:
        obs = h5['observations'][()]
        del h5['observations']
        ds = h5.create_dataset('observations', shape=obs.shape, maxshape=(None, 8),
                               chunks=(rows, 8), dtype='f4', compression='gzip')
        ds.id.write_direct_chunk((0, 0), zlib.compress(obs.tobytes()))
    with monkeypatch.context() as patch:
        _no_reads(patch, _episode(run))
        with pytest.raises(RecordingError, match=r'observations: declares chunks of 8.0 MiB '
                                                 rf'\(\d+ bytes\) \(chunk shape \({rows}, 8\)'):
            load_episodes(run, keys=DSRL_KEYS)
    # a chunk declared as 32 KB whose gzip stream inflates to 16 MB
    with h5py.File(_episode(run), 'a') as h5:
        del h5['observations']
        ds = h5.create_dataset('observations', shape=obs.shape, maxshape=(None, 8),
                               chunks=(1024, 8), dtype='f4', compression='gzip')
        ds.id.write_direct_chunk((0, 0), zlib.compress(obs.tobytes() + bytes(16 << 20)))
    _no_reads(monkeypatch, _episode(run))
    with pytest.raises(RecordingError, match=r'observations: stores a chunk at \(0, 0\) that '
                                             r'inflates past its declared 32.0 KiB'):
        load_episodes(run, keys=DSRL_KEYS)


@pytest.mark.parametrize('command', ['merge', 'tempting'])
def test_commands_report_a_bad_recording_in_one_line(tmp_path, run, capsys, command):
    foreign = _foreign_dataset(tmp_path)
    _edit_index(run, _entry('file', os.path.relpath(foreign, run), number=1))
    out = tmp_path / 'out.hdf5'
    argv = ([command, str(run)] if command == 'merge' else [command, str(run)]) + [
        '--task', TASK, '-o', str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'saferl-data: error: {run}/'), err
    assert "without '..'" in err[0] and 'Traceback' not in err[0]
    assert not out.exists()
