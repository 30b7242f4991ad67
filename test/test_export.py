"""Export: ONNX graphs reproduce the torch models; run folders export with saferl-export."""

from pathlib import Path

import numpy as np
from offline_training import export
from offline_training.export import build_test_model, ExportPlan, write_bundle
import pytest
from saferl_ros.bundle import BundleError, load_bundle
import torch
import yaml

torch.set_num_threads(1)
ATOL = 1e-4


def _t(array):
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


@pytest.fixture(scope='module')
def fisor(tmp_path_factory):
    model, plan = build_test_model('BallCircle', seed=3, algorithm='fisor', train_steps=10)
    path = write_bundle(plan, tmp_path_factory.mktemp('export') / 'fisor', 'BallCircle')
    return model, load_bundle(path)


@pytest.mark.parametrize('batch', [1, 5])
def test_fisor_sampler_parity_on_the_same_noise(fisor, batch):
    model, bundle = fisor
    rng = np.random.default_rng(batch)
    obs = rng.normal(scale=0.4, size=(batch, 8)).astype(np.float32)
    noise = bundle.sample_noise(batch, rng)
    with torch.no_grad():
        expected = model.act(_t(obs), _t(noise)).numpy()
        candidates = model.sample_candidates(_t(obs), _t(noise))
        rep = _t(obs).unsqueeze(1).expand(batch, noise.shape[1], 8).reshape(-1, 8)
        q_h = model.q_h_max(rep, candidates.reshape(-1, 2)).reshape(batch, -1)
    action = bundle.policy(obs, noise)
    np.testing.assert_allclose(action, expected, atol=ATOL)
    # The graph is the whole sampler: its action is the candidate with the smallest Q_h.
    best = candidates.numpy()[np.arange(batch), q_h.argmin(1).numpy()]
    np.testing.assert_allclose(action, best, atol=ATOL)
    fallback_noise = bundle.sample_noise(batch, rng, graph='fallback')
    with torch.no_grad():
        expected_fallback = model.fallback(_t(obs), _t(fallback_noise)).numpy()
        v_h, q_max = model.feasibility(_t(obs), _t(action))
    np.testing.assert_allclose(bundle.fallback(obs, fallback_noise), expected_fallback,
                               atol=ATOL)
    values = bundle.critic(obs, action)
    np.testing.assert_allclose(values['v_h'], v_h.numpy(), atol=ATOL)
    np.testing.assert_allclose(values['q_h'], q_max.numpy(), atol=ATOL)


def test_manifest_describes_the_fisor_graphs(fisor):
    _, bundle = fisor
    manifest = bundle.manifest
    assert manifest['graphs']['policy']['inputs'] == {'observation': ['batch', 8],
                                                      'noise': ['batch', 8, 6, 2]}
    assert manifest['graphs']['fallback']['inputs']['noise'] == ['batch', 16, 6, 2]
    assert manifest['graphs']['critic']['outputs'] == {'v_h': ['batch'], 'q_h': ['batch']}
    assert manifest['critic'] == {'kind': 'feasibility', 'threshold_v': 0.0, 'threshold_q': 0.0}
    assert manifest['task']['max_reward'] > manifest['task']['min_reward']
    assert set(manifest['files']) == {'policy.onnx', 'critic.onnx', 'fallback.onnx',
                                      'golden.npz'}


@pytest.mark.parametrize('algorithm', ['bc_safe', 'bcq_lag'])
def test_baselines_export_with_their_critic_kind(tmp_path, algorithm):
    model, plan = build_test_model('CarCircle', seed=1, algorithm=algorithm, train_steps=3)
    bundle = load_bundle(write_bundle(plan, tmp_path / algorithm, 'CarCircle'))
    obs = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model.act(_t(obs)).numpy()
    np.testing.assert_allclose(bundle.policy(obs), expected, atol=ATOL)
    assert bundle.sample_noise(4) is None and not bundle.has_fallback
    if algorithm == 'bcq_lag':
        assert bundle.critic_config == {'kind': 'cost', 'budget': pytest.approx(
            model.cost_threshold)}
        with torch.no_grad():
            q_c = model.cost_q(_t(obs), _t(expected)).numpy()
        np.testing.assert_allclose(bundle.critic(obs, expected)['q_c'], q_c, atol=ATOL)
    else:
        assert bundle.critic_kind == 'none' and bundle.algorithm == 'bc_safe'


def test_normalization_is_folded_into_the_graphs(tmp_path):
    model, plan = build_test_model('BallCircle', seed=0, algorithm='bc_all', train_steps=0)
    mean = np.linspace(-0.5, 0.5, 8)
    std = np.linspace(0.5, 2.0, 8)
    plan = ExportPlan(plan.algorithm, plan.graphs, plan.critic, obs_mean=mean, obs_std=std)
    bundle = load_bundle(write_bundle(plan, tmp_path / 'norm', 'BallCircle'))
    raw = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model.act(_t((raw - mean) / std)).numpy()
    np.testing.assert_allclose(bundle.policy(raw), expected, atol=ATOL)
    norm = bundle.manifest['observation']['normalization']
    np.testing.assert_allclose(norm['mean'], mean)
    np.testing.assert_allclose(norm['std'], std)


def test_failed_verification_leaves_no_bundle(tmp_path, monkeypatch):
    _, plan = build_test_model('BallCircle', algorithm='bc_all', train_steps=0)

    def broken(path, *args, **kwargs):
        raise BundleError(f'{path}: simulated verification failure')
    monkeypatch.setattr(export.rt, 'load_bundle', broken)
    with pytest.raises(BundleError, match='simulated'):
        write_bundle(plan, tmp_path / 'bad', 'BallCircle')
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_saferl_export_cli_exports_a_training_run(tmp_path, ballcircle_arrays, capfd):
    from offline_training.export import main
    from offline_training.train import train
    run = train('fisor', 'BallCircle', preset='test', data=ballcircle_arrays, steps=4,
                out=tmp_path / 'run', progress=False, checkpoint_every=2)
    out = tmp_path / 'models' / 'fisor-test'
    assert main([str(run), '-o', str(out), '--feasibility-plot']) == 0
    bundle = load_bundle(out)
    provenance = bundle.manifest['provenance']
    assert provenance['steps'] == 4 and provenance['seed'] == 0
    assert provenance['config']['preset'] == 'test'
    assert provenance['dataset'] == 'in-memory'
    assert (out / 'feasibility.png').stat().st_size > 10_000
    # An existing bundle is replaced only with --force.
    assert main([str(run), '-o', str(out)]) == 2
    assert 'exists' in capfd.readouterr().err
    assert main([str(run), '-o', str(out), '--force', '--candidates', '4']) == 0
    assert load_bundle(out).noise_shape('policy', 1) == (1, 4, 6, 2)
    assert load_bundle(out).manifest['provenance']['config']['num_candidates'] == 4
    assert main([str(run), '-o', str(out), '--force', '--selection', 'feasible-maxq']) == 0
    manifest = load_bundle(out).manifest
    assert manifest['algorithm_config']['selection'].endswith('(feasible-maxq)')
    assert manifest['provenance']['config']['selection'] == 'feasible-maxq'
    from offline_training.evaluate import bundle_variant
    assert bundle_variant(manifest) == {'selection': 'feasible-maxq'}
    assert bundle_variant({'algorithm_config': {'selection': 'argmin ... (minqc)'}}) == {}
    assert not list(out.parent.glob('.*replaced*'))    # the replaced bundle is gone
    # --force replaces a bundle only: not a folder of other things, not a link to a bundle
    others = tmp_path / 'notes'
    others.mkdir()
    (others / 'notes.txt').write_text('keep me')
    link = tmp_path / 'link'
    link.symlink_to(out)
    capfd.readouterr()
    for target, what in ((others, 'a folder without a manifest.yaml'),
                         (link, 'a symbolic link')):
        assert main([str(run), '-o', str(target), '--force']) == 2
        assert what in capfd.readouterr().err
    assert (others / 'notes.txt').read_text() == 'keep me' and load_bundle(link)
    assert main([str(tmp_path / 'nothing'), '-o', str(tmp_path / 'x')]) == 2
    assert 'not a finished' in capfd.readouterr().err
    # a diverged run: named as such, not as a golden-output difference "or onnxruntime"
    import torch
    state = torch.load(run / 'checkpoint.pt', weights_only=False)
    first = next(key for key, value in state['model'].items() if value.is_floating_point())
    state['model'][first].fill_(float('nan'))
    torch.save(state, run / 'checkpoint.pt')
    assert main([str(run), '-o', str(tmp_path / 'diverged')]) == 2
    assert 'the checkpoint holds NaN or Inf weights' in capfd.readouterr().err
    assert not (tmp_path / 'diverged').exists()
    assert yaml.safe_load((out / 'manifest.yaml').read_text())['format'] == 'saferl_bundle/1'
    assert Path(out / 'policy.onnx').is_file()


def test_a_bundle_names_no_folder_of_the_machine_that_wrote_it(
        tmp_path, ballcircle_arrays, monkeypatch):
    from offline_training.data.dataset import write_dataset
    from offline_training.export import main
    from offline_training.train import train
    checkout = tmp_path / 'checkout'
    (checkout / 'datasets').mkdir(parents=True)
    data = checkout / 'datasets' / 'SafetyBallCircle-v0-test-6.hdf5'
    write_dataset(data, ballcircle_arrays, 'BallCircle')
    run = train('fisor', 'BallCircle', preset='test', dataset=str(data), steps=2,
                out=tmp_path / 'elsewhere' / 'fisor-run', progress=False)
    monkeypatch.chdir(checkout)
    assert main([str(run), '-o', 'models/fisor-x']) == 0
    provenance = load_bundle(checkout / 'models' / 'fisor-x').manifest['provenance']
    # inside the current folder: relative; outside it: the name alone (the sha256 identifies it)
    assert provenance['dataset'] == 'datasets/SafetyBallCircle-v0-test-6.hdf5'
    assert provenance['run'] == 'fisor-run'
    assert str(tmp_path) not in (checkout / 'models' / 'fisor-x' / 'manifest.yaml').read_text()


@pytest.mark.parametrize('task', ['BallCircle', 'CarCircle', 'DroneCircle'])
def test_feasibility_sweep_places_the_agent_like_the_simulator(task):
    from saferl_ros.tasks import get_task
    from offline_training.feasibility_plot import reference_observation, xy_observations
    reference = reference_observation(task)
    swept = xy_observations(task, reference, np.array([3.0]), np.array([-4.5]))[0, 0]
    env = get_task(task).make_env()
    env.reset(seed=0)
    base = env.unwrapped
    position = np.array(base.agent.get_position(), dtype=float)
    position[:2] = (3.0, -4.5)
    base.agent.set_position(position)
    simulated = base.get_observation()
    env.close()
    # Position and circle-distance channels as the simulator computes them at (3, -4.5) ...
    for index in (0, 1, len(swept) - 1):
        assert swept[index] == pytest.approx(simulated[index], abs=1e-5)
    # ... and every other channel from the reference state.
    np.testing.assert_array_equal(swept[2:-1], reference[2:-1])


def test_feasibility_sweep_is_for_circle_tasks_only():
    from offline_training.feasibility_plot import xy_observations
    with pytest.raises(ValueError, match='Circle tasks'):
        xy_observations('BallRun', np.zeros(7), np.zeros(1), np.zeros(1))
