"""The runtime bundle loader: verification refuses every kind of broken bundle, API works."""

from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
from saferl_ros.bundle import BundleError, FORMAT, load_bundle
from saferl_ros.files import sha256_file
from saferl_ros.observation import channel_names
import yaml


@pytest.fixture(scope='module')
def fisor_bundle(tmp_path_factory) -> Path:
    import torch
    from offline_training.export import make_test_bundle
    torch.set_num_threads(1)
    return make_test_bundle(tmp_path_factory.mktemp('bundles') / 'fisor', seed=0)


@pytest.fixture
def copy(fisor_bundle, tmp_path) -> Path:
    """Return a private copy of the FISOR test bundle that a test may damage."""
    return Path(shutil.copytree(fisor_bundle, tmp_path / 'bundle'))


def edit_manifest(path: Path, edit) -> None:
    manifest = yaml.safe_load((path / 'manifest.yaml').read_text())
    edit(manifest)
    (path / 'manifest.yaml').write_text(yaml.safe_dump(manifest, sort_keys=False))


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'
    assert 're-export' in message or 'saferl-export' in message, message
    return message


def test_bundle_api(fisor_bundle):
    bundle = load_bundle(fisor_bundle)
    assert bundle.task_name == 'BallCircle' and bundle.algorithm == 'fisor'
    assert bundle.obs_dim == 8 and bundle.act_dim == 2
    assert bundle.obs_channels == channel_names('BallCircle')
    assert bundle.critic_kind == 'feasibility' and bundle.has_fallback
    assert bundle.critic_config == {'kind': 'feasibility', 'threshold_v': 0.0, 'threshold_q': 0.0}
    np.testing.assert_array_equal(bundle.action_low, [-1, -1])
    np.testing.assert_array_equal(bundle.action_high, [1, 1])
    assert bundle.sha256 == sha256_file(fisor_bundle / 'manifest.yaml')
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(5, 8)).astype(np.float32) * 0.3
    noise = bundle.sample_noise(5, np.random.default_rng(1))
    assert noise.shape == (5, 8, 6, 2) and noise.dtype == np.float32
    action = bundle.policy(obs, noise)
    assert action.shape == (5, 2) and np.all(np.abs(action) <= 1)
    # Same noise, same action; noise from equal generators, same action; one row = batch 1.
    np.testing.assert_array_equal(action, bundle.policy(obs, noise))
    np.testing.assert_array_equal(bundle.policy(obs, rng=np.random.default_rng(1)), action)
    np.testing.assert_allclose(bundle.policy(obs[0], noise[:1]), action[:1], atol=1e-5)
    values = bundle.critic(obs, action)
    assert set(values) == {'v_h', 'q_h'} and values['v_h'].shape == (5,)
    assert bundle.fallback(obs).shape == (5, 2)
    assert bundle.sample_noise(2, graph='fallback').shape == (2, 16, 6, 2)


def test_bad_inputs_are_refused_with_the_expected_shape(fisor_bundle):
    bundle = load_bundle(fisor_bundle)
    with pytest.raises(BundleError, match=r'expected \[batch, 8\]'):
        bundle.policy(np.zeros((1, 7)))
    with pytest.raises(BundleError, match='noise has shape'):
        bundle.policy(np.zeros((1, 8)), noise=np.zeros((1, 8, 5, 2)))
    with pytest.raises(BundleError, match='action has shape'):
        bundle.critic(np.zeros((2, 8)), np.zeros((1, 2)))


def test_tampered_file_is_refused(copy):
    data = bytearray((copy / 'critic.onnx').read_bytes())
    data[-10] ^= 0xFF
    (copy / 'critic.onnx').write_bytes(bytes(data))
    refused(copy, 'critic.onnx', 'sha256 mismatch')


def test_missing_file_is_refused(copy):
    (copy / 'fallback.onnx').unlink()
    refused(copy, 'fallback.onnx', 'missing')


def test_missing_manifest_is_refused(copy):
    (copy / 'manifest.yaml').unlink()
    refused(copy, 'manifest.yaml', 'missing')


def test_wrong_format_version_is_refused(copy):
    edit_manifest(copy, lambda m: m.update(format='saferl_bundle/2'))
    refused(copy, 'format', "'saferl_bundle/2'", repr(FORMAT))


def test_wrong_dimensions_are_refused(copy):
    def grow(manifest):
        manifest['observation']['dim'] = 9
        manifest['observation']['channels'].append('extra')
    edit_manifest(copy, grow)
    # a registry task knows its channels: the manifest no longer matches BallCircle's
    refused(copy, 'task BallCircle observes', 'the task does not match the model')
    # a task outside the registry (not checked against it): the graphs' shapes catch it
    edit_manifest(copy, lambda m: m['task'].update(name='SomeRobotTask'))
    refused(copy, 'graphs.policy.inputs.observation', '[batch, 9]')


def test_a_manifest_naming_a_task_of_the_same_shape_is_refused(copy):
    # BallCircle and CarCircle share their sizes; only the channel names tell them apart
    edit_manifest(copy, lambda m: m['task'].update(name='CarCircle'))
    refused(copy, "task CarCircle observes ['x', 'y', 'vx', 'vy', 'sin_yaw'",
            'the task does not match the model')


@pytest.mark.parametrize('key, value, fragment', [
    ('threshold_v', float('inf'), "field 'threshold_v' is inf"),
    ('threshold_q', float('nan'), "field 'threshold_q' is nan"),
    ('threshold_v', 'a', "field 'threshold_v' is 'a'"),
    ('threshold_q', [0.0], "field 'threshold_q' is [0.0]"),
    ('threshold_v', True, "field 'threshold_v' is True"),
], ids=['inf', 'nan', 'string', 'list', 'bool'])
def test_critic_thresholds_must_be_finite_numbers(copy, key, value, fragment):
    # an infinite threshold would switch the shield off without a word
    edit_manifest(copy, lambda m: m['critic'].update({key: value}))
    refused(copy, fragment, 'a finite number')


@pytest.mark.parametrize('edit, fragment', [
    (lambda act: act['low'].__setitem__(0, float('nan')), 'action.low: field 0 is nan'),
    (lambda act: act.update(low=act['high'], high=act['low']), 'must lie below'),
    (lambda act: act['high'].__setitem__(1, 'a'), 'action.high'),
    (lambda act: act['low'].__setitem__(1, float('-inf')), 'action.low'),
], ids=['nan', 'swapped', 'string', 'infinite'])
def test_action_bounds_must_be_finite_and_ordered(copy, edit, fragment):
    # the controller clips every action to them: NaN bounds would make every action NaN
    edit_manifest(copy, lambda m: edit(m['action']))
    refused(copy, fragment)


def test_task_name_must_be_a_string(copy):
    edit_manifest(copy, lambda m: m['task'].update(name=['BallCircle']))
    refused(copy, "field 'name' should be a str")


def test_channel_count_must_match_dim(copy):
    edit_manifest(copy, lambda m: m['observation']['channels'].pop())
    refused(copy, 'observation.channels has 7 names', 'observation.dim = 8')


def test_manifest_shapes_must_match_the_onnx_graph(copy):
    def lie(manifest):
        manifest['graphs']['policy']['inputs']['noise'][1] = 4  # the graph has 8 candidates
    edit_manifest(copy, lie)
    refused(copy, 'policy.onnx', 'noise', 'ONNX shape')


def test_wrong_golden_outputs_are_refused(copy):
    golden = dict(np.load(copy / 'golden.npz'))
    golden['critic.v_h'] = golden['critic.v_h'] + 0.01
    np.savez(copy / 'golden.npz', **golden)
    # Keep the checksum consistent so that the golden comparison itself is what fails.
    edit_manifest(copy, lambda m: m['files'].update({'golden.npz': sha256_file(
        copy / 'golden.npz')}))
    message = refused(copy, 'critic.onnx', 'critic.v_h', 'tolerance')
    assert '0.01' in message
    load_bundle(copy, verify_golden=False)  # the rest of the bundle is fine


def test_critic_kind_none_has_no_critic(tmp_path):
    from offline_training.export import make_test_bundle
    bundle = load_bundle(make_test_bundle(tmp_path / 'bc', algorithm='bc_all', train_steps=5))
    assert bundle.critic_kind == 'none' and not bundle.has_fallback
    assert bundle.sample_noise(3) is None
    assert bundle.policy(np.zeros(8)).shape == (1, 2)
    with pytest.raises(BundleError, match='no critic'):
        bundle.critic(np.zeros(8), np.zeros(2))
    with pytest.raises(BundleError, match='no fallback'):
        bundle.fallback(np.zeros(8))


def test_runtime_loader_does_not_import_torch():
    code = ('import sys, saferl_ros.bundle; '
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0


SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / 'models').iterdir()
                 if (p / 'manifest.yaml').is_file())


@pytest.mark.parametrize('folder', SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_bundle_verifies_and_answers_its_task(folder):
    bundle = load_bundle(folder)          # checksums, graph signatures, golden outputs
    assert folder.name.endswith('-' + bundle.task_name.lower())     # e.g. fisor-ballcircle
    obs = np.zeros((1, bundle.obs_dim), np.float32)
    noise = bundle.sample_noise(1, np.random.default_rng(0))
    action = np.asarray(bundle.policy(obs, noise=noise))
    assert action.reshape(-1).shape == (bundle.act_dim,) and np.isfinite(action).all()
