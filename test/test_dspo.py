"""DSPO (offline_training.algos.dspo) and its data: split-demos, losses, networks, runs."""

import json
import math

import h5py
import numpy as np
from offline_training.data import cli
from offline_training.data.dataset import (COST_LABELS_ATTR, load_dataset, UNLABELLED,
                                           validate_arrays, write_dataset)
from offline_training.data.synthetic import synthetic_dataset
from offline_training.data.trajectories import episode_spans, split_safe_demos
import pytest
import torch

torch.set_num_threads(1)

TASK = 'BallCircle'


def labelled(episodes=16, seed=0, length=24):
    """
    Return a synthetic dataset whose trajectory i has cost return i and reward return -i/2.

    Trajectory 3 gets the largest reward, so the rule must order by reward, not by index.
    """
    data = synthetic_dataset(TASK, episodes=episodes, seed=seed, max_length=length)
    starts, stops = episode_spans(data)
    data['costs'] = np.zeros_like(data['costs'])
    data['rewards'] = np.zeros_like(data['rewards'])
    for i, (start, stop) in enumerate(zip(starts, stops)):
        data['costs'][stop - 1] = float(i)
        data['rewards'][start] = 100.0 if i == 3 else -0.5 * i
    return data


# --------------------------------------------------------------------------- split-demos

def test_split_rule_takes_the_highest_rewards_among_safe_trajectories():
    split = split_safe_demos(labelled(), kappa=6.0, num_demos=4)
    # safe: 0..6; rewards 0, -0.5, -1, 100, -2, -2.5, -3 -> top four: 3, 0, 1, 2
    assert split.demos.tolist() == [0, 1, 2, 3]
    assert split.unlabelled.tolist() == list(range(4, 16))
    assert split.num_safe == 7


def test_split_demos_writes_two_validated_cost_free_files(tmp_path):
    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    data = labelled()
    write_dataset(path, data, TASK)
    assert cli.main(['split-demos', str(path), '--kappa', '6', '--num-demos', '4',
                     '-o', str(tmp_path / 'split' / 'bc')]) == 0
    unlabelled_path, demos_path = cli.split_paths(tmp_path / 'split' / 'bc')
    starts, stops = episode_spans(data)
    for path_, indices in ((demos_path, [0, 1, 2, 3]), (unlabelled_path, range(4, 16))):
        part = load_dataset(path_)                  # validated, NaN costs accepted (marked)
        assert np.isnan(part['costs']).all()
        rows = np.concatenate([np.arange(starts[i], stops[i]) for i in indices])
        np.testing.assert_array_equal(part['observations'], data['observations'][rows])
        np.testing.assert_array_equal(part['rewards'], data['rewards'][rows])
        with h5py.File(path_, 'r') as h5:
            assert h5.attrs[COST_LABELS_ATTR] == UNLABELLED


def test_split_demos_bad_inputs_fail_in_one_line(tmp_path, capsys):
    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    write_dataset(path, labelled(), TASK)
    prefix = str(tmp_path / 'out')
    cases = [(['--kappa', '-1'], 'kappa must be a finite cost budget'),
             (['--kappa', 'nan'], 'kappa must be a finite cost budget'),
             (['--kappa', '2', '--num-demos', '4'], 'only 3 of 16 trajectories'),
             (['--kappa', '100', '--num-demos', '16'], 'no unlabelled data'),
             (['--kappa', '5', '--num-demos', '0'], 'must be >= 1')]
    for extra, message in cases:
        assert cli.main(['split-demos', str(path), *extra, '-o', prefix]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not list(tmp_path.glob('out*'))
    # an already cost-free file cannot be split again
    assert cli.main(['split-demos', str(path), '--kappa', '6', '--num-demos', '4',
                     '-o', prefix]) == 0
    capsys.readouterr()
    assert cli.main(['split-demos', prefix + '-demos.hdf5', '--task', TASK, '--kappa', '6',
                     '-o', str(tmp_path / 'again')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'has no cost labels' in err[0]


def test_nan_costs_are_accepted_only_in_a_file_marked_unlabelled(tmp_path):
    data = labelled()
    data['costs'] = np.full_like(data['costs'], np.nan)
    problems = validate_arrays(data, TASK)
    assert problems and COST_LABELS_ATTR in str(problems[0])
    assert validate_arrays(data, TASK, unlabelled=True) == []
    data['costs'][5] = 0.0                       # one label left in a cost-free file
    problems = validate_arrays(data, TASK, unlabelled=True)
    assert len(problems) == 1 and 'every cost must be NaN' in str(problems[0])
    with pytest.raises(Exception, match='NaN or Inf'):
        write_dataset(tmp_path / 'x.hdf5', {**data, 'costs': np.full_like(data['costs'],
                                                                          np.nan)}, TASK)


# --------------------------------------------------------------------------- losses by hand

def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_eq1_on_hand_made_logits():
    from offline_training.algos.dspo import discriminator_loss

    # D = sigmoid(logit): demos D = 1/2 and 3/4, unlabelled D = 1/2 and 1/4.
    demo, unlabelled = t([0.0, math.log(3.0)]), t([0.0, -math.log(3.0)])
    expected = -(math.log(0.5) + math.log(0.75)) / 2 - (math.log(0.5) + math.log(0.75)) / 2
    assert discriminator_loss(demo, unlabelled).item() == pytest.approx(expected, rel=1e-6)
    # swapping the sets raises the loss: demos are the positives
    assert discriminator_loss(unlabelled, demo).item() > expected
    # saturated logits stay finite (softplus form of -log D, -log(1 - D))
    assert math.isfinite(discriminator_loss(t([-200.0]), t([200.0])).item())


def test_vclub_on_hand_made_classifier_outputs():
    from offline_training.algos.dspo import return_bin, vclub

    probs = t([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    bins = torch.tensor([0, 2])
    perm = torch.tensor([1, 0])
    # matched: log q(0 | z1), log q(2 | z2); shuffled: log q(2 | z1), log q(0 | z2)
    expected = (math.log(0.5) + math.log(0.8)) / 2 - (math.log(0.25) + math.log(0.1)) / 2
    assert vclub(probs.log(), bins, perm).item() == pytest.approx(expected, rel=1e-6)
    # a classifier that ignores z bounds the information by exactly 0
    same = t([[0.2, 0.3, 0.5]] * 3).log()
    assert vclub(same, torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])).item() == \
        pytest.approx(0.0, abs=1e-7)
    # ten equal bins over [0, 100]; the ends clamp
    assert return_bin(t([-5.0, 0.0, 9.99, 10.0, 55.0, 100.0, 120.0]), 0.0, 100.0,
                      10).tolist() == [0, 0, 0, 1, 5, 9, 9]


# --------------------------------------------------------------------------- networks

def small_config(**overrides):
    from offline_training.algos import dspo
    from saferl_ros.tasks import get_task

    return dspo.resolve_config(dspo.make_config('test', dropout=0.0, **overrides),
                               get_task(TASK))


@pytest.mark.parametrize('backbone', ['transformer', 'mlp'])
def test_a_later_step_cannot_change_an_earlier_output(backbone):
    from offline_training.algos.dspo import SafetyTransformer

    torch.manual_seed(0)
    net = SafetyTransformer(3, 2, small_config(backbone=backbone, num_layers=2)).eval()
    obs, act = torch.randn(1, 7, 3), torch.randn(1, 7, 2)
    steps = torch.arange(7).unsqueeze(0)
    before = net.features(obs, act, steps)
    obs2, act2 = obs.clone(), act.clone()
    obs2[0, 4] += 1.0
    act2[0, 5:] -= 2.0
    after = net.features(obs2, act2, steps)
    assert torch.equal(after[:, :4], before[:, :4])     # steps before the change: bit-identical
    assert not torch.allclose(after[:, 4], before[:, 4])  # a_4's token sees s_4
    if backbone == 'transformer':
        # context: step 6's output depends on earlier steps; the MLP's does not
        obs3 = obs.clone()
        obs3[0, 0] += 1.0
        assert not torch.allclose(net.features(obs3, act, steps)[:, 6], before[:, 6])


def test_attention_pooling_by_hand_and_padding():
    from offline_training.algos.dspo import AttentionPooling

    pool = AttentionPooling(1)
    with torch.no_grad():
        for layer in (pool.key, pool.query, pool.value):
            layer.weight.fill_(1.0)
            layer.bias.zero_()
    x = t([[[1.0], [2.0], [50.0]]])
    valid = torch.tensor([[True, True, False]])          # the third step is padding
    logit, z = pool(x, valid)
    # q_t = k_t = v_t = x_t; alpha_t. = softmax_s(x_t x_s) over the two valid steps
    z1 = (math.exp(1) * 1 + math.exp(2) * 2) / (math.exp(1) + math.exp(2))
    z2 = (math.exp(2) * 1 + math.exp(4) * 2) / (math.exp(2) + math.exp(4))
    assert z[0, :2].tolist() == pytest.approx([z1, z2], rel=1e-5)
    assert logit.item() == pytest.approx((z1 + z2) / 2, rel=1e-5)
    # padding changes nothing
    x2 = x.clone()
    x2[0, 2] = -7.0
    assert torch.equal(pool(x2, valid)[0], logit)
    # the paper's pooling is not scaled; pool_scale divides q.k by sqrt(d)
    assert AttentionPooling(4, scale=True).scale == pytest.approx(0.5)


# --------------------------------------------------------------------------- training

def make_trainer(data, **overrides):
    from offline_training.algos import dspo
    from offline_training.algos.batching import ReplayBuffer
    from saferl_ros.tasks import get_task

    spec = get_task(TASK)
    config = small_config(**overrides)
    torch.manual_seed(0)
    buffer = ReplayBuffer(dspo.prepare_arrays(data, config), 'cpu', seed=0)
    model = dspo.build_model(spec.obs_dim, spec.act_dim, config)
    return dspo.make_trainer(model, config), buffer


def test_generation_conditions_follow_app_d1(monkeypatch):
    data = labelled(episodes=10, length=24)
    trainer, buffer = make_trainer(data, demos='first:3', disc_steps=1, diffusion_steps=1,
                                   num_generated=400, generation_batch=100, guidance=1.7)
    trainer.update(buffer)
    demo = trainer.data.demo_index
    assert demo.tolist() == [7, 8, 9]       # D^U first, then D^S
    trainer.labels = torch.linspace(0.05, 0.95, 10)
    returns, z = trainer.generation_conditions(2000)
    low, high = trainer.data.returns[demo].min(), trainer.data.returns[demo].max()
    assert low < high and ((returns >= low) & (returns <= high)).all()
    assert returns.min() < low + 0.05 * (high - low) and returns.max() > high - 0.05 * (
        high - low)                         # the whole range, not one value
    assert torch.equal(z, torch.full((2000,), float(trainer.labels[7])))   # smallest demo z
    seen = []

    def sample(cond, guidance, **kwargs):
        seen.append((cond.clone(), guidance))
        return torch.zeros(len(cond), trainer.config.horizon, 10)

    monkeypatch.setattr(trainer.model.diffusion, 'sample', sample)
    generated = trainer.generate()
    cond = torch.cat([c for c, _ in seen])
    assert cond.shape == (400, 2) and all(g == 1.7 for _, g in seen)
    normal = trainer.model.normalise_return
    assert ((cond[:, 0] >= normal(low) - 1e-6) & (cond[:, 0] <= normal(high) + 1e-6)).all()
    assert torch.equal(cond[:, 1], torch.full((400,), float(trainer.labels[7])))
    # behaviour cloning data: the demonstrations' transitions, then the generated windows
    assert len(generated['obs']) == int(generated['demos']) + 400 * trainer.config.horizon
    assert int(generated['demos']) == int(trainer.data.valid[demo].sum())


def test_no_training_path_reads_cost_labels(tmp_path):
    from offline_training.algos import dspo
    from offline_training.train import train

    data = labelled(episodes=12, length=30)
    # prepare_arrays never touches 'costs': it works on a dataset without the key
    no_costs = {k: v for k, v in data.items() if k != 'costs'}
    config = small_config()
    with_costs = dspo.prepare_arrays(data, config)
    for key, value in dspo.prepare_arrays(no_costs, config).items():
        np.testing.assert_array_equal(value, with_costs[key])
    # the same run with costs replaced by NaN (data and demonstrations) ends bit-identical
    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    write_dataset(path, data, TASK)
    assert cli.main(['split-demos', str(path), '--kappa', '6', '--num-demos', '3',
                     '-o', str(tmp_path / 'bc')]) == 0
    unlabelled, demos = (load_dataset(p) for p in cli.split_paths(tmp_path / 'bc'))
    labelled_unlabelled = {**unlabelled, 'costs': np.ones_like(unlabelled['costs'])}
    write_dataset(tmp_path / 'demos-labelled.hdf5', {**demos, 'costs': np.zeros_like(
        demos['costs'])}, TASK)
    states = []
    for train_data, demos_path in ((labelled_unlabelled, tmp_path / 'demos-labelled.hdf5'),
                                   (unlabelled, cli.split_paths(tmp_path / 'bc')[1])):
        run = train('dspo', TASK, preset='test', seed=3, data=train_data, progress=False,
                    out=tmp_path / f'run{len(states)}', overrides={'demos': str(demos_path)})
        states.append(torch.load(run / 'checkpoint.pt', weights_only=False)['model'])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_discriminator_loss_falls_on_a_short_real_run():
    data = labelled(episodes=24, length=24, seed=1)
    starts, stops = episode_spans(data)
    # demonstrations differ from the rest in their actions (pushes to +1): learnable
    for start, stop in zip(starts[:4], stops[:4]):
        data['actions'][start:stop] = np.clip(data['actions'][start:stop] + 0.8, -1, 1)
    trainer, buffer = make_trainer(data, demos='first:4', disc_steps=120, disc_batch_size=8,
                                   disc_lr=1e-3, embed_dim=16)
    losses = [float(trainer.update(buffer)['loss/disc']) for _ in range(120)]
    assert np.mean(losses[-15:]) < 0.5 * np.mean(losses[:15]), (losses[:15], losses[-15:])
    z = trainer.label()
    assert z[trainer.data.demo_index].min() > z[trainer.data.unlabelled_index].max()


def test_ablations_and_config_errors():
    from offline_training.algos import dspo
    from saferl_ros.errors import ConfigError

    data = labelled()
    for overrides, mi in (({'mi_weight': 0.0}, False), ({'backbone': 'mlp'}, True)):
        trainer, buffer = make_trainer(data, **overrides)
        logs = trainer.update(buffer)
        assert ('loss/vclub' in logs) == mi
        assert all(torch.isfinite(v) for v in logs.values())
    # the MLP backbone has about the transformer's parameter count (Fig. 4)
    sizes = [sum(p.numel() for p in dspo.SafetyTransformer(8, 2, small_config(
        backbone=b, embed_dim=64, num_layers=2)).parameters()) for b in dspo.BACKBONES]
    assert 0.8 < sizes[1] / sizes[0] < 1.25, sizes
    with pytest.raises(ConfigError, match='split-demos'):
        dspo.prepare_arrays(data, small_config(demos=None))
    with pytest.raises(ConfigError, match='behaviour cloning'):
        small_config(steps=10)
    with pytest.raises(ConfigError, match='backbone'):
        small_config(backbone='rnn')


def test_algorithms_that_need_costs_refuse_a_cost_free_dataset(tmp_path):
    from offline_training.train import train
    from saferl_ros.errors import ConfigError

    data = labelled(episodes=6)
    data['costs'] = np.full_like(data['costs'], np.nan)
    for algo in ('bc_safe', 'fisor'):
        with pytest.raises(ConfigError, match='learns from cost labels but the dataset has none'):
            train(algo, TASK, preset='test', data=data, progress=False, out=tmp_path / algo)
    # BC-All (DSPO's baseline on the unlabelled data) needs none
    train('bc_all', TASK, preset='test', data=data, progress=False, out=tmp_path / 'bc_all')


def test_a_run_killed_in_any_stage_resumes_to_the_same_parameters(tmp_path):
    from offline_training.train import train

    data = labelled(episodes=10, length=30)
    run = train('dspo', TASK, preset='test', seed=1, data=data, progress=False,
                out=tmp_path / 'whole')
    whole = torch.load(run / 'checkpoint.pt', weights_only=False)['model']
    out = tmp_path / 'killed'
    for stop in (8, 4, 10):          # in the diffusion stage, in BC (after generation), the end
        train('dspo', TASK, preset='test', seed=1, data=data, progress=False, out=out,
              stop_after=stop, checkpoint_every=1)
    resumed = torch.load(out / 'checkpoint.pt', weights_only=False)
    assert resumed['step'] == 14
    for key, value in whole.items():
        assert torch.equal(value, resumed['model'][key]), key


# --------------------------------------------------------------------------- discriminator quality

def test_auc_and_correlations_by_hand():
    from offline_training.discriminator_quality import pearson, quality, roc_auc

    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9 > 0.4, 0.9 > 0.1, tie, 0.4 > 0.1) = 3.5/4
    assert roc_auc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert roc_auc([0.1, 0.2, 0.3], [False, False, True]) == 1.0
    assert roc_auc([0.3, 0.2, 0.1], [False, False, True]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    report = quality(np.array([0.9, 0.6, 0.4, 0.2]), np.array([1.0, 2.0, 3.0, 4.0]),
                     np.array([True, False, True, False]))
    # z > 0.5 flags trajectories 0 and 1: one of the two safe ones, one of two flagged is safe
    assert (report['recall'], report['precision'], report['accuracy']) == (0.5, 0.5, 0.5)
    assert report['pearson_z_return'] == pytest.approx(pearson([0.9, 0.6, 0.4, 0.2], [1, 2, 3, 4]))


def test_holdout_split_and_the_quality_report_of_a_run(tmp_path, capsys):
    from offline_training import discriminator_quality
    from offline_training.train import train

    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    data = labelled(episodes=20, length=24)
    write_dataset(path, data, TASK)
    prefix = tmp_path / 'bc'
    assert cli.main(['split-demos', str(path), '--kappa', '10', '--num-demos', '3',
                     '--holdout', '0.25', '-o', str(prefix)]) == 0
    unlabelled_path, demos_path, heldout_path = cli.split_paths(prefix, heldout=True)
    heldout, unlabelled = load_dataset(heldout_path), load_dataset(unlabelled_path)
    assert len(episode_spans(heldout)[0]) == 4 and len(episode_spans(unlabelled)[0]) == 13
    assert np.isfinite(heldout['costs']).all()          # held out with its labels
    with h5py.File(heldout_path, 'r') as h5, h5py.File(unlabelled_path, 'r') as h5u:
        held, rest = (set(json.loads(f.attrs['source_trajectories'])) for f in (h5, h5u))
    assert not held & rest and not held & {0, 1, 3} and len(held | rest) == 17
    run = train('dspo', TASK, preset='test', data=unlabelled, progress=False, out=tmp_path / 'r',
                overrides={'demos': str(demos_path)})
    capsys.readouterr()
    assert discriminator_quality.main([str(run), str(heldout_path), '--kappa', '10']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['trajectories'] == 4 and 0.0 < report['safe_share'] < 1.0
    assert 0.0 <= report['auc'] <= 1.0
    # a cost-free file cannot be scored
    assert discriminator_quality.main([str(run), str(unlabelled_path), '--kappa', '10']) == 2
    assert 'has no cost labels' in capsys.readouterr().err


def test_safety_signal_of_a_dataset_equals_the_training_labels():
    from offline_training.algos import dspo

    data = labelled(episodes=8, length=24)
    trainer, buffer = make_trainer(data, demos='first:2')
    for _ in range(3):
        trainer.update(buffer)
    labels = trainer.label()
    # the unlabelled part of the data (trajectories 2..7) comes first in training
    part = {k: v[episode_spans(data)[0][2]:] for k, v in data.items()}
    z, returns = dspo.safety_signal(trainer.model, trainer.config, part)
    np.testing.assert_allclose(z, labels[:6].numpy(), rtol=1e-5)
    np.testing.assert_allclose(returns, trainer.data.returns[:6].numpy(), rtol=1e-5)


def test_quality_only_on_the_trajectories_of_a_split_file(tmp_path, capsys):
    from offline_training import discriminator_quality
    from offline_training.train import train

    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    write_dataset(path, labelled(episodes=12, length=24), TASK)
    prefix = tmp_path / 'bc'
    assert cli.main(['split-demos', str(path), '--kappa', '10', '--num-demos', '3',
                     '-o', str(prefix)]) == 0
    unlabelled_path, demos_path = cli.split_paths(prefix)
    run = train('dspo', TASK, preset='test', data=load_dataset(unlabelled_path), progress=False,
                out=tmp_path / 'r', overrides={'demos': str(demos_path)})
    capsys.readouterr()
    assert discriminator_quality.main([str(run), str(path), '--kappa', '10', '--only',
                                       str(unlabelled_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    # cost returns 0..11, demonstrations 0, 1, 3: the 9 others, of which 2, 4..10 are <= 10
    assert report['trajectories'] == 9
    assert report['safe_share'] == pytest.approx(8 / 9)
    other = tmp_path / 'other.hdf5'
    write_dataset(other, labelled(episodes=12, length=24, seed=5), TASK)
    assert discriminator_quality.main([str(run), str(other), '--kappa', '10', '--only',
                                       str(unlabelled_path)]) == 2
    assert 'sha256 differs' in capsys.readouterr().err


def test_model_selection_keeps_the_discriminator_that_ranks_held_out_demos_highest(
        monkeypatch):
    from offline_training.algos import dspo
    from saferl_ros.errors import ConfigError

    # the score: held-out demonstrations against unlabelled trajectories of similar return
    assert dspo.select_score(torch.tensor([0.9, 0.4]), torch.tensor([0.4, 0.1])) == 0.875
    assert dspo.select_score(torch.tensor([0.1]), torch.tensor([0.5, 0.6])) == 0.0
    data = labelled(episodes=24, length=24, seed=1)
    starts, stops = episode_spans(data)
    for start, stop in zip(starts[:4], stops[:4]):
        data['actions'][start:stop] = np.clip(data['actions'][start:stop] + 0.8, -1, 1)
    trainer, buffer = make_trainer(data, demos='first:4', disc_steps=60, disc_batch_size=8,
                                   disc_lr=1e-3, embed_dim=16, disc_select_holdout=1,
                                   disc_select_every=20)
    # only unlabelled trajectories whose return reaches the demonstrations' lowest are matched
    # (at least 20 of them: here the 20 of highest return)
    trainer.update(buffer)
    data_ = trainer.data
    matched = trainer.select['matched']
    assert len(matched) == 20 and not data_.demo[matched].any()
    assert data_.returns[matched].min() >= data_.returns[data_.unlabelled_index].sort().values[-20]
    # one demonstration is held out of D_phi's positives, the others train it
    held, train = trainer.select['held'], trainer.select['train']
    assert len(held) == 1 and len(train) == 3
    assert sorted(torch.cat([held, train]).tolist()) == sorted(data_.demo_index.tolist())
    # scores that fall after iteration 20: the discriminator of iteration 20 is kept
    real_score, scores = dspo.select_score, iter([0.9, 0.5, 0.1])
    monkeypatch.setattr(dspo, 'select_score', lambda held, matched: (
        real_score(held, matched), next(scores))[1])
    logs = [trainer.update(buffer) for _ in range(59)]
    scored = [i + 2 for i, log in enumerate(logs) if 'value/select_auc' in log]
    assert scored == [20, 40, 60]
    assert trainer.select['best_iteration'] == 20 and trainer.select['best_score'] == 0.9
    # stage 2 labels with the kept discriminator, not the last iterate (which differs)
    kept = trainer.select['best_state']
    last = {k: v.clone() for k, v in trainer.model.discriminator.state_dict().items()}
    assert any(not torch.equal(last[k], kept[k]) for k in kept)
    trainer.label()
    for key, value in trainer.model.discriminator.state_dict().items():
        assert torch.equal(value, kept[key]), key
    with pytest.raises(ConfigError, match='must leave D_phi at least one'):
        bad, bad_buffer = make_trainer(data, demos='first:4', disc_select_holdout=4)
        bad.update(bad_buffer)
    with pytest.raises(ConfigError, match='disc_select_holdout'):
        small_config(disc_select_holdout=-1)
