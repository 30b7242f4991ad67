"""
Hostile and odd HDF5 files: what they declare is checked before anything is read, links refused.

Each file is built with h5py in tmp_path. A few KB can declare terabytes (chunks never written
read back as fill values); such files must be refused from their metadata alone, quickly and
with bounded memory, by `validate_file`, `load_dataset` and `saferl-data validate|info` alike.
"""

import contextlib
import os
from pathlib import Path
import resource
import subprocess
import sys
import time
import tracemalloc
import zlib

import h5py
import numpy as np
from offline_training.data import cli
from offline_training.data import dataset as dataset_module
from offline_training.data.dataset import (check_file, DatasetError, load_dataset,
                                           MAX_EXPANSION, MAX_ROWS, validate_arrays,
                                           validate_file, write_dataset)
from offline_training.data.synthetic import synthetic_dataset
import pytest
from saferl_ros.dataset_keys import DSRL_KEYS

WIDTHS = {'observations': 8, 'next_observations': 8, 'actions': 2}   # BallCircle


def _declare(path, rows, obs_width=8, task='BallCircle', rows_of=None, dtypes=None):
    """Write a file whose DSRL keys are declared (chunked, gzip, resizable) but never written."""
    with h5py.File(path, 'w') as h5:
        if task:
            h5.attrs['task'] = task
        for key in DSRL_KEYS:
            n = (rows_of or {}).get(key, rows)
            width = {**WIDTHS, 'observations': obs_width, 'next_observations': obs_width}.get(key)
            shape = (n, width) if width else (n,)
            h5.create_dataset(key, shape=shape, dtype=(dtypes or {}).get(key, 'f4'), chunks=True,
                              compression='gzip', maxshape=(None,) + shape[1:])
    return path


def _write(path, data, attrs=None, **options):
    """Write arrays as they are (no checks), gzip-compressed like DSRL's files."""
    with h5py.File(path, 'w') as h5:
        for key, value in data.items():
            h5.create_dataset(key, data=value, compression='gzip', **options)
        for key, value in (attrs or {}).items():
            h5.attrs[key] = value
    return path


@contextlib.contextmanager
def _bounded(extra_bytes=1 << 30):
    """
    Measure the Python-visible peak allocation, and cap the address space meanwhile.

    The cap (the current size plus ``extra_bytes``) makes code that allocates what a file
    declares fail at once with MemoryError instead of filling the machine's memory.
    """
    with open('/proc/self/status') as status:
        vm_size = next(int(line.split()[1]) * 1024 for line in status
                       if line.startswith('VmSize:'))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + extra_bytes, hard))
    tracemalloc.start()
    result = {}
    began = time.perf_counter()
    try:
        yield result
    finally:
        result['seconds'] = time.perf_counter() - began
        result['peak'] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _keys_and_messages(problems):
    return [(p.key, p.message) for p in problems]


# ---------------------------------------------------------------- declared sizes (defect A)


def test_a_hundred_million_declared_rows_are_refused_before_reading(tmp_path):
    path = _declare(tmp_path / 'huge.hdf5', 10 ** 8)
    assert path.stat().st_size < 64 * 1024
    with _bounded() as used:
        problems = validate_file(path)
    assert used['seconds'] < 5 and used['peak'] < 10 << 20, used
    assert len(problems) == 1, _keys_and_messages(problems)
    problem = problems[0]
    assert problem.source == str(path) and problem.key == 'observations'
    assert f'declares {10 ** 8} rows, more than the {MAX_ROWS}' in problem.message
    assert 'regenerate it' in problem.message

    with _bounded() as used, pytest.raises(DatasetError, match='declares 100000000 rows'):
        load_dataset(path)
    assert used['seconds'] < 5 and used['peak'] < 10 << 20, used


@pytest.mark.parametrize('command', ['validate', 'info'])
def test_cli_refuses_a_huge_declaration_in_one_line_without_traceback(tmp_path, command):
    path = _declare(tmp_path / 'huge.hdf5', 10 ** 8)
    # Run the CLI in a fresh process capped at 2 GB of address space, and report its peak RSS.
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started
    # from a large pytest process would report the parent's size.
    script = ('import resource, sys\n'
              'resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))\n'
              'from offline_training.data.cli import main\n'
              'code = main(sys.argv[1:])\n'
              "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
              "print('maxrss_kb', hwm[0], file=sys.stderr)\n"
              'sys.exit(code)\n')
    began = time.perf_counter()
    result = subprocess.run([sys.executable, '-c', script, command, str(path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'DSRL_SUPPRESS_IMPORT_ERROR': '1',
                                 'OMP_NUM_THREADS': '1'})
    seconds = time.perf_counter() - began
    # validate's verdict on a bad file is 1; a file other commands cannot use is a user error, 2
    assert result.returncode == (1 if command == 'validate' else 2), result.stderr
    assert 'Traceback' not in result.stderr and 'MemoryError' not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith('maxrss_kb')]
    if command == 'validate':                  # a header naming the file, then the problem
        assert lines[0] == f'INVALID: 1 problem(s) in {path}' and len(lines) == 2, lines
    else:                                      # one line naming the file, the key and the fix
        assert len(lines) == 1 and lines[0].startswith(f'saferl-data: error: {path}: '), lines
    assert 'observations: declares 100000000 rows' in lines[-1] and 'regenerate it' in lines[-1]
    maxrss_mb = int(result.stderr.split('maxrss_kb')[1].split()[0]) / 1024
    assert maxrss_mb < 400 and seconds < 30, (maxrss_mb, seconds)


def test_a_billion_rows_of_eight_columns_are_refused(tmp_path, capsys):
    path = _declare(tmp_path / 'SafetyBallCircle-v0-80-1.hdf5', 10 ** 9, task=None)
    with _bounded() as used:
        problems = validate_file(path)
        with pytest.raises(DatasetError, match='declares 1000000000 rows'):
            load_dataset(path)
        assert cli.main(['info', str(path)]) == 2
        assert cli.main(['validate', str(path)]) == 1
    assert used['seconds'] < 5 and used['peak'] < 10 << 20, used
    assert [p.key for p in problems] == ['observations'], _keys_and_messages(problems)
    err = capsys.readouterr().err
    assert f'saferl-data: error: {path}: observations: declares 1000000000 rows' in err


def test_a_mismatched_row_count_is_refused_before_reading(tmp_path):
    data = synthetic_dataset('BallCircle', episodes=3, seed=0, max_length=30)
    path = _write(tmp_path / 'mismatch.hdf5', data, attrs={'task': 'BallCircle'})
    with h5py.File(path, 'a') as h5:          # rewards declares 10 million unwritten rows
        del h5['rewards']
        h5.create_dataset('rewards', shape=(10 ** 7,), dtype='f4', chunks=True,
                          compression='gzip', maxshape=(None,))
    n = len(data['observations'])
    with _bounded() as used:
        problems = validate_file(path)
    assert used['peak'] < 10 << 20, used
    assert _keys_and_messages(problems) == [('rewards', f'has {10 ** 7} rows but observations '
                                                        f'has {n}')]


def test_a_wrong_observation_width_for_the_task_is_refused_before_reading(tmp_path):
    # 10 million rows (under the row limit), declared only: the width is refused from the
    # metadata, before the storage check and before anything is read.
    path = _declare(tmp_path / 'SafetyBallRun-v0-80-3.hdf5', 10 ** 7, obs_width=8, task=None)
    with _bounded() as used:
        problems = validate_file(path)
    assert used['peak'] < 10 << 20, used
    assert _keys_and_messages(problems) == [
        ('observations', 'has 8 columns but BallRun has a observation size of 7 (wrong task?)'),
        ('next_observations', 'has 8 columns but BallRun has a observation size of 7 '
                              '(wrong task?)')]
    with _bounded() as used:
        problems = validate_file(path, task='DroneCircle')
    assert used['peak'] < 10 << 20, used
    assert any(p.key == 'actions' and 'has 2 columns but DroneCircle has a action size of 4'
               in p.message for p in problems), _keys_and_messages(problems)


def test_dtype_kinds_are_checked_from_the_declaration(tmp_path, ballcircle_arrays):
    path = _declare(tmp_path / 'ints.hdf5', 10 ** 7, dtypes={'observations': 'i8',
                                                             'terminals': 'S4'})
    with _bounded() as used:
        problems = validate_file(path)
    assert used['peak'] < 10 << 20, used
    assert _keys_and_messages(problems) == [
        ('observations', 'must be floating point, got dtype int64'),
        ('terminals', 'must be boolean or 0/1 numbers, got dtype |S4')]

    n = len(ballcircle_arrays['rewards'])
    text_flags = dict(ballcircle_arrays, timeouts=np.array([b'y'] * n, dtype='S1'))
    path = _write(tmp_path / 'a.hdf5', text_flags, attrs={'task': 'BallCircle'})
    assert ('timeouts', 'must be boolean or 0/1 numbers, got dtype |S1') \
        in _keys_and_messages(validate_file(path))
    int_obs = dict(ballcircle_arrays,
                   observations=ballcircle_arrays['observations'].astype(np.int64))
    path = _write(tmp_path / 'b.hdf5', int_obs, attrs={'task': 'BallCircle'})
    assert ('observations', 'must be floating point, got dtype int64') \
        in _keys_and_messages(validate_file(path))


def test_unwritten_or_partly_written_arrays_under_the_row_limit(tmp_path):
    rows = 10 ** 6
    never = _declare(tmp_path / 'never.hdf5', rows)
    with _bounded() as used:
        problems = validate_file(never)
    assert used['peak'] < 10 << 20, used
    assert len(problems) == 1, _keys_and_messages(problems)
    assert problems[0].key == ', '.join(sorted(DSRL_KEYS))
    assert 'none of it stored in the file (never written)' in problems[0].message

    partly = _declare(tmp_path / 'partly.hdf5', rows)
    with h5py.File(partly, 'a') as h5:
        for key in DSRL_KEYS:
            h5[key][:1000] = 0.0
    with _bounded() as used:
        problems = validate_file(partly)
        with pytest.raises(DatasetError, match='chunks stored'):
            load_dataset(partly)
    assert used['peak'] < 10 << 20, used
    assert len(problems) == 1 and 'chunks stored (the rest was never written' \
        in problems[0].message, _keys_and_messages(problems)


def test_chunks_smaller_than_gzip_can_produce_are_refused(tmp_path, ballcircle_arrays):
    path = _write(tmp_path / 'forged.hdf5', ballcircle_arrays, attrs={'task': 'BallCircle'})
    with h5py.File(path, 'a') as h5:          # one 3.2 MB chunk stored as 10 forged bytes
        dataset = h5.create_dataset('stamps_ns', shape=(400_000, 2), dtype='f4',
                                    chunks=(400_000, 2), compression='gzip')
        dataset.id.write_direct_chunk((0, 0), b'\x78\x9c' + b'\x00' * 8)
    problems = check_file(path, keys=None).problems       # read by whoever reads every key
    assert [p.key for p in problems] == ['stamps_ns'], _keys_and_messages(problems)
    assert f'more than gzip can expand ({MAX_EXPANSION}:1)' in problems[0].message
    report = check_file(path)                               # never read by validate or training
    assert report.problems == [] and [p.key for p in report.notes] == ['stamps_ns']
    assert f'refused: {problems[0].message.split(";")[0]}' in report.notes[0].message


def test_a_real_highly_compressible_file_is_accepted_and_checked_in_blocks(tmp_path):
    # One long BallCircle-like dataset: continuous random observations, zero costs, no terminals;
    # the zero arrays compress several hundred to one, which a 200:1 rule per key would refuse.
    rng = np.random.default_rng(0)
    n, horizon = 300_000, 200
    states = rng.normal(size=(n + 1, 8)).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[horizon - 1::horizon] = True
    data = {'observations': states[:-1], 'next_observations': states[1:],
            'actions': rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
            'rewards': rng.normal(size=n).astype(np.float32), 'costs': np.zeros(n, np.float32),
            'terminals': np.zeros(n, bool), 'timeouts': timeouts,
            # a recording extra, all zeros, in one 16 MB chunk at gzip's best ratio (~1030:1)
            'critic_v_h': np.zeros(4 * n, np.float32)}
    path = tmp_path / 'SafetyBallCircle-v0-80-1500.hdf5'
    write_dataset(path, data, 'BallCircle')
    with h5py.File(path, 'a') as h5:
        del h5['critic_v_h']
        h5.create_dataset('critic_v_h', data=data['critic_v_h'], chunks=(4 * n,),
                          compression='gzip', compression_opts=9, shuffle=True)
    with h5py.File(path, 'r') as h5:
        ratios = {k: h5[k].size * h5[k].dtype.itemsize / h5[k].id.get_storage_size()
                  for k in ('costs', 'critic_v_h')}
    assert ratios['costs'] > 200 and ratios['critic_v_h'] > 1000, ratios
    declared = sum(np.asarray(v).nbytes for k, v in data.items() if k in DSRL_KEYS)
    with _bounded() as used:
        report = check_file(path)
    assert report.problems == [] and report.notes == [], report
    # Streaming: a few blocks of rows, not the arrays (the old reader held them all, and more).
    assert used['peak'] < 7 * dataset_module.BLOCK_BYTES < declared / 3, (used, declared)
    loaded = load_dataset(path)
    np.testing.assert_array_equal(loaded['observations'], data['observations'])
    assert set(loaded) == set(data)


def test_value_checks_do_not_depend_on_the_block_size(monkeypatch, tmp_path,
                                                      ballcircle_arrays):
    arrays = ballcircle_arrays
    n = len(arrays['rewards'])
    ends = arrays['terminals'] | arrays['timeouts']
    nan_late = arrays['observations'].copy()
    nan_late[[n - 5, n - 2], 1] = np.nan
    joined = ends.copy()
    joined[np.flatnonzero(ends)[1:3]] = False
    outside = arrays['actions'].copy()
    outside[[9, 17, n - 1]] = 1.5
    cases = [arrays, dict(arrays, observations=nan_late),
             dict(arrays, timeouts=joined, terminals=np.zeros(n, bool)),
             dict(arrays, actions=outside, costs=-arrays['costs'] - 1),
             dict(arrays, timeouts=np.zeros(n, bool), terminals=np.zeros(n, bool))]
    expected = [_keys_and_messages(validate_arrays(case, 'BallCircle')) for case in cases]
    assert expected[0] == [] and all(expected[1:]), expected
    # BallRun's horizon (100) is exceeded by joined episodes spanning several blocks.
    long = synthetic_dataset('BallRun', episodes=4, seed=2, max_length=100)
    long_ends = np.flatnonzero(long['terminals'] | long['timeouts'])
    long['terminals'][:] = False
    long['timeouts'][:] = False
    long['timeouts'][long_ends[-1]] = True
    long['next_observations'][:-1] = long['observations'][1:]
    expected_long = _keys_and_messages(validate_arrays(long, 'BallRun'))
    assert any('longer than the BallRun horizon' in m for _, m in expected_long)
    for block_bytes in (1, 64, 100, 1000):     # one row per block, and odd block edges
        monkeypatch.setattr(dataset_module, 'BLOCK_BYTES', block_bytes)
        assert [_keys_and_messages(validate_arrays(c, 'BallCircle')) for c in cases] == expected
        assert _keys_and_messages(validate_arrays(long, 'BallRun')) == expected_long
    # Files with small chunks of unequal rows: blocks follow the observations' chunks.
    for block_bytes in (1, 100, 1 << 20):
        monkeypatch.setattr(dataset_module, 'BLOCK_BYTES', block_bytes)
        for number, (case, task) in enumerate([(c, 'BallCircle') for c in cases]
                                              + [(long, 'BallRun')]):
            path = tmp_path / f'case{number}.hdf5'
            with h5py.File(path, 'w') as h5:
                for key, value in case.items():
                    rows = 7 if np.ndim(value) == 2 else 5
                    h5.create_dataset(key, data=value, compression='gzip',
                                      chunks=(rows,) + np.shape(value)[1:])
            want = expected_long if task == 'BallRun' else expected[number]
            assert _keys_and_messages(validate_file(path, task)) == want, (block_bytes, number)


# ---------------------------------------------------------------- links (defect B)


LINK_FIX = 'DSRL files hold plain datasets; rewrite the file with real arrays'


def _good(path, arrays):
    write_dataset(path, arrays, 'BallCircle')
    return path


def test_a_soft_link_is_refused_not_followed(tmp_path, ballcircle_arrays, capsys):
    path = _good(tmp_path / 'soft.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        del h5['rewards']
        h5['rewards'] = h5py.SoftLink('/costs')
    problems = validate_file(path)
    assert _keys_and_messages(problems) == [('rewards', f'is a soft link to /costs; {LINK_FIX}')]
    with pytest.raises(DatasetError, match='rewards: is a soft link to /costs'):
        load_dataset(path)
    assert cli.main(['validate', str(path)]) == 1
    assert 'rewards: is a soft link to /costs' in capsys.readouterr().err
    assert cli.main(['info', str(path)]) == 2
    assert f'saferl-data: error: {path}: rewards: is a soft link' in capsys.readouterr().err


def test_an_external_link_to_another_hdf5_file_is_refused(tmp_path, ballcircle_arrays):
    other = _good(tmp_path / 'other.hdf5', ballcircle_arrays)
    path = _good(tmp_path / 'external.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        del h5['rewards']
        h5['rewards'] = h5py.ExternalLink(str(other), '/rewards')
    assert _keys_and_messages(validate_file(path)) == [
        ('rewards', f'is an external link to /rewards in {other}; {LINK_FIX}')]
    with pytest.raises(DatasetError, match='external link'):
        load_dataset(path)


def test_an_external_link_to_a_text_file_is_refused_without_opening_it(tmp_path,
                                                                       ballcircle_arrays):
    text = tmp_path / 'notes.txt'
    text.write_text('not hdf5\n')
    path = _good(tmp_path / 'external.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        del h5['costs']
        h5['costs'] = h5py.ExternalLink(str(text), '/costs')
        h5['episode_ids'] = h5py.SoftLink('/nowhere')          # dangling, on a recording extra
    problems = validate_file(path)
    assert _keys_and_messages(problems) == [
        ('costs', f'is an external link to /costs in {text}; {LINK_FIX}'),
        ('episode_ids', f'is a soft link to /nowhere; {LINK_FIX}')]
    assert not any('missing' in p.message for p in problems)


def test_a_second_name_for_an_array_is_refused(tmp_path, ballcircle_arrays):
    path = _good(tmp_path / 'alias.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        del h5['rewards']
        h5['rewards'] = h5['costs']            # a hard link: one array under two names
    problems = validate_file(path)
    assert len(problems) == 1 and problems[0].key in ('costs', 'rewards')
    assert 'second name (hard link)' in problems[0].message


def test_many_top_level_names_are_refused_quickly(tmp_path, ballcircle_arrays):
    # 20 000 one-value extras in a small file took minutes (each name compared with all others)
    from offline_training.data.dataset import MAX_TOP_LEVEL_NAMES
    path = _good(tmp_path / 'names.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        for i in range(MAX_TOP_LEVEL_NAMES):
            h5[f'extra_{i:05d}'] = np.zeros(1)
    problems = validate_file(path)      # refused before any name is looked at
    assert f'more than the {MAX_TOP_LEVEL_NAMES} a dataset may have' in problems[0].message


def test_virtual_and_externally_stored_datasets_are_refused(tmp_path, ballcircle_arrays):
    n = len(ballcircle_arrays['rewards'])
    source = _good(tmp_path / 'source.hdf5', ballcircle_arrays)
    raw = tmp_path / 'costs.raw'
    raw.write_bytes(np.zeros(n, np.float32).tobytes())
    path = _good(tmp_path / 'virtual.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        del h5['rewards'], h5['costs']
        layout = h5py.VirtualLayout(shape=(n,), dtype='f4')
        layout[:] = h5py.VirtualSource(str(source), 'rewards', shape=(n,))
        h5.create_virtual_dataset('rewards', layout)
        h5.create_dataset('costs', shape=(n,), dtype='f4', external=[(str(raw), 0, 4 * n)])
    problems = _keys_and_messages(validate_file(path))
    assert problems == [('costs', f'keeps its data in external raw file(s) {raw}; {LINK_FIX}'),
                        ('rewards', 'is a virtual dataset whose data lies in other files; '
                                    + LINK_FIX)], problems


def test_extra_groups_and_keys_are_notes_and_recording_extras_pass(tmp_path, ballcircle_arrays,
                                                                   capsys):
    n = len(ballcircle_arrays['rewards'])
    extras = {'episode_ids': np.zeros(n, np.int64), 'verdicts': np.zeros(n, np.int8),
              'proposed_actions': np.zeros((n, 2), np.float32), 'missed': np.zeros(n, bool)}
    path = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', {**ballcircle_arrays, **extras})
    assert check_file(path).notes == [] and validate_file(path) == []
    with h5py.File(path, 'a') as h5:
        h5.create_group('infos').create_dataset('qpos', data=np.zeros((n, 3)))
        h5.create_dataset('my_labels', data=np.ones(n))
    report = check_file(path)
    assert report.problems == []
    assert [(p.key, p.message.split(';')[0]) for p in report.notes] == [
        ('infos', 'group outside the DSRL layout'),
        ('my_labels', 'extra dataset, not a DSRL or recording key')]
    assert set(load_dataset(path)) == set(DSRL_KEYS) | set(extras) | {'my_labels'}

    assert cli.main(['validate', str(path)]) == 0
    out = capsys.readouterr().out
    assert 'OK' in out and 'note: infos: group' in out and 'note: my_labels: extra' in out
    assert cli.main(['info', str(path)]) == 0
    out = capsys.readouterr().out
    assert 'trajectories 6' in out and 'note: my_labels: extra dataset' in out
    assert 'observations           float32  (' in out


def test_every_recording_extra_is_accepted_without_a_note(tmp_path, ballcircle_arrays):
    from saferl_ros.recorder import EXTRA_KEYS
    n = len(ballcircle_arrays['rewards'])
    extras = {key: np.zeros(n, np.float32) for key in EXTRA_KEYS}
    path = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', {**ballcircle_arrays, **extras})
    report = check_file(path)
    assert report.problems == [] and report.notes == [], report


def test_a_symlinked_dataset_path_is_fine(tmp_path, ballcircle_arrays):
    path = _good(tmp_path / 'real.hdf5', ballcircle_arrays)
    link = tmp_path / 'SafetyBallCircle-v0-80-6.hdf5'
    os.symlink(path, link)
    assert Path(link).is_symlink() and validate_file(link) == []
    assert load_dataset(link)['rewards'].shape == (len(ballcircle_arrays['rewards']),)


# ------------------------------------------- chunks, row widths, extra keys, outputs (review 14)


def _no_reads(monkeypatch):
    """Make reading any array fail the test: a refusal must come from the metadata alone."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f'{self.name} was read')
    monkeypatch.setattr(h5py.Dataset, '__getitem__', refuse)


def _replace(path, key, rows, chunk_rows, stream):
    """Replace ``key`` by a resizable (rows, 8) float32 array of one chunk stored as ``stream``."""
    with h5py.File(path, 'a') as h5:
        del h5[key]
        dataset = h5.create_dataset(key, shape=(rows, 8), maxshape=(None, 8), dtype='f4',
                                    chunks=(chunk_rows, 8), compression='gzip')
        dataset.id.write_direct_chunk((0, 0), stream)


def test_a_huge_chunk_of_a_small_resizable_array_is_refused_before_reading(
        tmp_path, ballcircle_arrays, monkeypatch, capsys):
    # The review's file declared 2 rows in one gzip chunk of 50 million rows: 1.6 GB read for
    # 64 bytes. Here a chunk just over MAX_CHUNK_BYTES, holding the real rows.
    path = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', ballcircle_arrays)
    obs = ballcircle_arrays['observations']
    chunk_rows = dataset_module.MAX_CHUNK_BYTES // 32 + 1
    _replace(path, 'observations', len(obs), chunk_rows, zlib.compress(obs.tobytes()))
    _no_reads(monkeypatch)
    problems = validate_file(path)
    assert _keys_and_messages(problems) == [(
        'observations', f'declares chunks of 8.0 MiB (8388640 bytes) (chunk shape ({chunk_rows}, '
                        f'8) for shape ({len(obs)}, 8)), more than the 8.0 MiB accepted (h5py '
                        'writes chunks of at most 1 MiB); the file is damaged or not a DSRL '
                        'dataset: regenerate it (saferl-data collect) or copy the original file '
                        'again')]
    with pytest.raises(DatasetError, match='observations: declares chunks of'):
        load_dataset(path, validate=False)
    assert cli.main(['info', str(path)]) == 2
    assert 'declares chunks of' in capsys.readouterr().err


def test_a_chunk_whose_gzip_stream_inflates_past_its_size_is_refused(
        tmp_path, ballcircle_arrays, monkeypatch):
    # HDF5's deflate filter inflates until the stream ends: a 32 KB chunk may allocate GBs.
    path = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', ballcircle_arrays)
    obs = ballcircle_arrays['observations']
    _replace(path, 'observations', len(obs), 1024,
             zlib.compress(obs.tobytes() + bytes(16 << 20)))      # inflates to 16 MB
    with pytest.raises(DatasetError, match=r'observations: stores a chunk at \(0, 0\) that '
                                           r'inflates past its declared 32.0 KiB'):
        load_dataset(path)
    # and a stored chunk larger than its declared size needs (stream and all)
    _replace(path, 'observations', len(obs), 256, zlib.compress(bytes(8 << 20), 1))
    with monkeypatch.context() as patch:
        _no_reads(patch)
        problems = validate_file(path)
    assert [p.key for p in problems] == ['observations'], _keys_and_messages(problems)
    assert 'more than its declared 8.0 KiB needs' in problems[0].message
    # a real gzip'd file is unaffected (every chunk inflates to exactly its size)
    assert validate_file(_good(tmp_path / 'SafetyBallCircle-v0-80-7.hdf5',
                               ballcircle_arrays)) == []


def test_filters_whose_output_is_unbounded_are_refused(tmp_path, ballcircle_arrays):
    path = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        h5.create_dataset('critic_v_h', data=np.zeros(len(ballcircle_arrays['rewards'])),
                          compression='lzf')
    assert validate_file(path) == []      # an extra that validate and training never read
    with pytest.raises(DatasetError) as refusal:
        load_dataset(path)                # every key, so critic_v_h too
    problems = refusal.value.problems
    assert [p.key for p in problems] == ['critic_v_h'], _keys_and_messages(problems)
    assert 'HDF5 filters lzf, whose output cannot be bounded' in problems[0].message
    assert 'h5repack -f GZIP=4' in problems[0].message


def test_wide_rows_are_refused_without_a_task(tmp_path, monkeypatch, capsys):
    # The review's file: 2 rows of 419 million float32 columns and no task to fix the widths.
    width = dataset_module.MAX_ROW_BYTES // 4 + 1
    path = _declare(tmp_path / 'notask.hdf5', 2, obs_width=width, task=None)
    _no_reads(monkeypatch)
    with _bounded() as used:
        problems = validate_file(path)
        with pytest.raises(DatasetError,
                           match=r'observations: declares rows of 64.0 KiB \(65540 bytes\)'):
            load_dataset(path)
        assert cli.main(['validate', str(path)]) == 1
    assert used['peak'] < 10 << 20, used
    assert sorted(p.key for p in problems) == ['next_observations', 'observations', 'task']
    row = next(p.message for p in problems if p.key == 'observations')
    assert row.startswith(f'declares rows of 64.0 KiB (65540 bytes) (shape (2, {width}), 4-byte '
                          'values), more than the 64.0 KiB one row may hold')
    err = capsys.readouterr().err
    assert 'Traceback' not in err and 'declares rows of' in err


def test_extra_keys_never_read_are_notes_and_the_limits_apply_to_the_keys_read(
        tmp_path, ballcircle_arrays, capsys):
    from offline_training.train import _load_data
    from saferl_ros.tasks import get_task

    n = len(ballcircle_arrays['rewards'])
    path = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', ballcircle_arrays)
    with h5py.File(path, 'a') as h5:
        h5.create_dataset('foo', data=np.ones(n))
    loaded, _ = _load_data(path, None, get_task('BallCircle'))
    assert set(loaded) == set(DSRL_KEYS)
    assert set(load_dataset(path, keys=DSRL_KEYS)) == set(DSRL_KEYS)
    # (a) extras that break the limits (one declaring more rows than a dataset may hold, the
    # review's was 3 GB of gzip'd zeros; variable-length strings; lzf) are never read by
    # training or validate: notes saying what reading them would meet, not problems
    with h5py.File(path, 'a') as h5:
        del h5['foo']
        h5.create_dataset('foo', shape=(MAX_ROWS + 1,), dtype='f4', chunks=(1 << 16,),
                          compression='gzip')
        h5.create_dataset('infos_text', data=np.array(['a', 'b'], dtype=h5py.string_dtype()))
        h5.create_dataset('extra_lzf', data=np.ones(n), compression='lzf')
    refused = '; reading it would be refused: '
    report = check_file(path)
    assert report.problems == []
    assert {p.key: p.message for p in report.notes} == {
        'foo': 'extra dataset, not a DSRL or recording key; never read (training ignores it)'
               f'{refused}declares {MAX_ROWS + 1} rows, more than the {MAX_ROWS} accepted '
               '(DSRL datasets hold at most ~3 million)',
        'infos_text': 'extra dataset, not a DSRL or recording key; never read (training ignores '
                      f'it){refused}holds variable-length values, whose size cannot be bounded '
                      'before reading',
        'extra_lzf': 'extra dataset, not a DSRL or recording key; never read (training ignores '
                     f'it){refused}is stored through the HDF5 filters lzf, whose output cannot '
                     'be bounded before reading (DSRL files use gzip, optionally after shuffle: '
                     '`h5repack -f GZIP=4 IN OUT` rewrites a file so)'}
    assert cli.main(['validate', str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith('OK: ') and 'note: infos_text: extra dataset' in out
    with _bounded() as used:
        loaded, _ = _load_data(path, None, get_task('BallCircle'))
        assert set(loaded) == set(DSRL_KEYS)
        # (b) whoever reads every key (load_dataset's default) meets the same limits
        for keys in (None, DSRL_KEYS + ('foo',)):
            with pytest.raises(DatasetError, match=f'foo: declares {MAX_ROWS + 1} rows'):
                load_dataset(path, keys=keys)
        with pytest.raises(DatasetError) as refusal:
            load_dataset(path, validate=False)
        assert {p.key for p in refusal.value.problems} == {'foo', 'infos_text', 'extra_lzf'}
        assert cli.main(['merge', '--dataset', str(path), '--task', 'BallCircle', '-o',
                         str(tmp_path / 'merged.hdf5')]) == 0
    assert used['peak'] < 10 << 20, used
    capsys.readouterr()
    # (c) a DSRL key that breaks the same limits is refused by validate, training and merge
    with h5py.File(path, 'a') as h5:
        del h5['rewards']
        h5.create_dataset('rewards', data=ballcircle_arrays['rewards'].astype('f4'),
                          compression='lzf')
    match = 'rewards: is stored through the HDF5 filters lzf'
    assert [p.key for p in validate_file(path)] == ['rewards']
    with pytest.raises(DatasetError, match=match):
        _load_data(path, None, get_task('BallCircle'))
    assert cli.main(['merge', '--dataset', str(path), '--task', 'BallCircle', '-o',
                     str(tmp_path / 'merged2.hdf5')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'saferl-data: error: {path}: rewards: is '), err
    assert not (tmp_path / 'merged2.hdf5').exists()


def test_merge_and_split_demos_never_overwrite_an_output(tmp_path, ballcircle_arrays, capsys):
    source = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', ballcircle_arrays)
    precious = _good(tmp_path / 'precious.hdf5', ballcircle_arrays)
    before = precious.read_bytes()
    folder = tmp_path / 'folder'
    folder.mkdir()
    for out in (precious, folder):
        assert cli.main(['merge', '--dataset', str(source), '--task', 'BallCircle',
                         '-o', str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f'saferl-data: error: {out}: already exists; remove it or choose '
                       'another -o'], err
    assert precious.read_bytes() == before
    (tmp_path / 'split-heldout.hdf5').write_bytes(b'an earlier split')
    assert cli.main(['split-demos', str(source), '--kappa', '100', '--num-demos', '1',
                     '-o', str(tmp_path / 'split')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'split-heldout.hdf5: already exists' in err[0], err
    assert (tmp_path / 'split-heldout.hdf5').read_bytes() == b'an earlier split'
    assert not list(tmp_path.glob('split-[du]*'))


def test_output_path_errors_are_one_line(tmp_path, ballcircle_arrays, capsys):
    source = _good(tmp_path / 'SafetyBallCircle-v0-80-6.hdf5', ballcircle_arrays)
    cases = [(['merge', '--dataset', str(source), '--task', 'BallCircle', '-o',
               str(source) + '/x.hdf5'], f'{source} is not a folder; choose another -o'),
             (['plot', str(source), '-o', str(tmp_path / 'x.txt')],
              'x.txt: the plot is a PNG image; give -o a name ending in .png')]
    (tmp_path / 'taken.png').mkdir()
    cases.append((['plot', str(source), '-o', str(tmp_path / 'taken.png')],
                  'taken.png: exists and is not a regular file; give a new .png file name'))
    if Path('/proc').is_dir():
        cases.append((['merge', '--dataset', str(source), '--task', 'BallCircle', '-o',
                       '/proc/nope.hdf5'], '/proc/nope.hdf5: cannot be written'))
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith('saferl-data: error: '), (argv, err)
        assert needle in err[0], (argv, err)
