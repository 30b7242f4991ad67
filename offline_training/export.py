"""
Export a trained run as a model bundle (docs/bundle.md): ``saferl-export RUN -o models/NAME``.

The bundle holds ONNX graphs that take RAW observations (the run's observation normalisation is
folded into each graph), a manifest that describes them, and ``golden.npz``: inputs together with
the outputs the torch model produced. Export ends by loading the bundle with the runtime loader
(:func:`saferl_ros.bundle.load_bundle`), so a bundle that is written is a bundle that verifies.

Each algorithm module describes its own graphs with ``export_plan(model, config)`` (the
:class:`~offline_training.algos.protocol.Algorithm` protocol): FISOR exports its whole sampler as
``policy(observation, noise)``, the feasibility ``critic`` and a ``fallback``; BC only a
``policy``; BCQ-Lag a ``policy`` and its cost ``critic``. This module knows no algorithm.

The noise of a stochastic policy is an explicit graph input, so a run is reproducible in the
runtime: the same observation and noise give the same action in torch and in ONNX Runtime.
"""

import argparse
from dataclasses import replace
from datetime import datetime, timezone
import io
import os
from pathlib import Path
import shutil
import sys
import tempfile
from typing import Dict, List, Optional
import warnings

import numpy as np
from offline_training.algos import fisor, get_algorithm
from offline_training.algos.protocol import ExportPlan, GraphSpec
from offline_training.runs import code_version, open_run, yaml_safe
from saferl_ros import bundle as rt
from saferl_ros.errors import ConfigError, read_yaml_mapping, reports_user_errors
from saferl_ros.files import atomic_write_yaml, sha256_file
from saferl_ros.observation import channel_names
from saferl_ros.paths import shown_path
from saferl_ros.tasks import get_task, TaskSpec
import torch
from torch import nn
import yaml

OPSET = 17
GOLDEN_BATCH = 4


class NormalizeObservation(nn.Module):
    """Map a raw observation to the normalised one the networks were trained on."""

    def __init__(self, mean: Optional[np.ndarray], std: Optional[np.ndarray], obs_dim: int):
        super().__init__()
        mean = np.zeros(obs_dim) if mean is None else np.asarray(mean)
        std = np.ones(obs_dim) if std is None else np.asarray(std)
        self.register_buffer('mean', torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.register_buffer('std', torch.as_tensor(std, dtype=torch.float32).reshape(-1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


class RawObservationGraph(nn.Module):
    """Wrap a graph module that expects normalised observations so that it takes raw ones."""

    def __init__(self, module: nn.Module, normalize: NormalizeObservation):
        super().__init__()
        self.module = module
        self.normalize = normalize

    def forward(self, observation: torch.Tensor, *rest: torch.Tensor):
        return self.module(self.normalize(observation), *rest)


def fold_normalization(plan: ExportPlan, obs_dim: int) -> Dict[str, GraphSpec]:
    """Return the plan's graphs taking RAW observations (normalisation folded in when set)."""
    if plan.obs_mean is None:
        return dict(plan.graphs)
    normalize = NormalizeObservation(plan.obs_mean, plan.obs_std, obs_dim)
    graphs = {}
    for name, graph in plan.graphs.items():
        if next(iter(graph.inputs)) != 'observation':
            raise ValueError(f'graph {name}: the first input must be the observation')
        graphs[name] = GraphSpec(RawObservationGraph(graph.module, normalize), graph.inputs,
                                 graph.outputs)
    return graphs


def _shape(spec: list, batch: int) -> tuple:
    return tuple(batch if d == rt.BATCH else int(d) for d in spec)


def golden_inputs(plan: ExportPlan, spec: TaskSpec, low: np.ndarray, high: np.ndarray,
                  seed: int, batch: int = GOLDEN_BATCH) -> Dict[str, Dict[str, np.ndarray]]:
    """
    Draw the golden inputs of every graph: observations near the data, noise, actions.

    Observations are drawn from the normalisation statistics (the data's mean and spread) so the
    golden check exercises the region a robot will see, not only the origin.
    """
    rng = np.random.default_rng(seed)
    mean = np.zeros(spec.obs_dim) if plan.obs_mean is None else np.asarray(plan.obs_mean)
    std = np.ones(spec.obs_dim) if plan.obs_std is None else np.asarray(plan.obs_std)
    obs = (mean + std * rng.standard_normal((batch, spec.obs_dim))).astype(np.float32)
    act = rng.uniform(low, high, size=(batch, spec.act_dim)).astype(np.float32)
    feeds = {}
    for name, graph in plan.graphs.items():
        feeds[name] = {}
        for tensor, shape in graph.inputs.items():
            if tensor == 'observation':
                feeds[name][tensor] = obs
            elif tensor == 'action':
                feeds[name][tensor] = act
            elif tensor == 'noise':
                feeds[name][tensor] = rng.standard_normal(_shape(shape, batch)).astype(np.float32)
            else:
                raise ValueError(f'graph {name}: no rule to draw golden input {tensor!r}')
    return feeds


def run_torch(graph: GraphSpec, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run a graph's torch module on numpy inputs; return its outputs by declared name."""
    with torch.no_grad():
        args = [torch.as_tensor(feeds[t]) for t in graph.inputs]
        result = graph.module(*args)
    if isinstance(result, torch.Tensor):
        result = (result,)
    return {name: value.detach().cpu().numpy().astype(np.float32)
            for name, value in zip(graph.outputs, result)}


def _mish_symbolic(g, x):
    """
    Export mish(x) = x tanh(softplus(x)) as x n / (n + 2) with n = e (e + 2), e = exp(min(x, 20)).

    The identity tanh(log(1 + e)) = ((1 + e)^2 - 1) / ((1 + e)^2 + 1) replaces ONNX Runtime's
    scalar Softplus kernel, which took ~45 % of FISOR's sampler time, by vectorised Exp/Mul/Div:
    ~9x faster per activation and as accurate (max error 7e-7 against float64 over [-100, 100],
    the same as torch's float32 mish). Above x = 20 the ratio is 1 to float32 precision.
    """
    limit = g.op('Constant', value_t=torch.tensor(20.0))
    two = g.op('Constant', value_t=torch.tensor(2.0))
    e = g.op('Exp', g.op('Min', x, limit))
    n = g.op('Mul', e, g.op('Add', e, two))
    return g.op('Mul', x, g.op('Div', n, g.op('Add', n, two)))


def export_onnx(graph: GraphSpec, feeds: Dict[str, np.ndarray], file: Path) -> None:
    """
    Write ``graph`` as ONNX with a dynamic batch dimension on every input and output.

    The TorchScript-based exporter traces the module once: Python loops over the fixed number of
    denoising steps unroll into a straight-line graph, which is what a fixed-T sampler is. (The
    dynamo exporter works too with torch 2.13 but takes ~10x longer for the same graph.)
    """
    names = list(graph.inputs) + list(graph.outputs)
    dynamic = {name: {0: rt.BATCH} for name in names}
    args = tuple(torch.as_tensor(feeds[t]) for t in graph.inputs)
    graph.module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter warns that it is legacy, and about tracing shape arithmetic; the
        # export is checked below against the torch outputs, which is the real guard.
        warnings.simplefilter('ignore')
        buffer = io.BytesIO()
        torch.onnx.register_custom_op_symbolic('aten::mish', _mish_symbolic, OPSET)
        try:
            torch.onnx.export(graph.module, args, buffer, input_names=list(graph.inputs),
                              output_names=list(graph.outputs), dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        finally:
            torch.onnx.unregister_custom_op_symbolic('aten::mish', OPSET)
    file.write_bytes(buffer.getvalue())


def write_bundle(plan: ExportPlan, out_dir, task, name: Optional[str] = None,
                 provenance: Optional[dict] = None, metrics: Optional[dict] = None,
                 seed: int = 0, overwrite: bool = True) -> Path:
    """
    Export ``plan`` as a bundle folder ``out_dir``, verify it with the runtime and return it.

    The bundle is assembled in a temporary folder next to ``out_dir`` and moved into place only
    after :func:`saferl_ros.bundle.load_bundle` accepted it, so a failed export never leaves a
    half-written bundle where the runtime would look for one.
    """
    spec = get_task(task)
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise FileExistsError(f'{out_dir} exists; pass --force (overwrite=True) to replace it')
        # --force replaces a bundle, nothing else: not a folder of other files (`-o models`
        # would take every shipped bundle with it), not a link, not a file
        if out_dir.is_symlink() or not out_dir.is_dir() or \
                not (out_dir / rt.MANIFEST).is_file():
            what = ('a symbolic link' if out_dir.is_symlink() else
                    'a folder without a manifest.yaml' if out_dir.is_dir() else 'not a folder')
            raise FileExistsError(f'{out_dir} exists and is {what}, not a bundle: --force only '
                                  'replaces a bundle; choose another output folder')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    low = -np.ones(spec.act_dim, dtype=np.float32)
    high = np.ones(spec.act_dim, dtype=np.float32)
    if plan.obs_mean is not None and plan.obs_std is None:
        raise ValueError('ExportPlan has obs_mean but no obs_std')
    plan = replace(plan, graphs=fold_normalization(plan, spec.obs_dim))
    feeds = golden_inputs(plan, spec, low, high, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared and installed
    try:
        golden, graphs = {}, {}
        for graph_name, graph in plan.graphs.items():
            file = f'{graph_name}.onnx'
            export_onnx(graph, feeds[graph_name], tmp / file)
            outputs = run_torch(graph, feeds[graph_name])
            for tensor, value in {**feeds[graph_name], **outputs}.items():
                golden[rt.golden_key(graph_name, tensor)] = value
            graphs[graph_name] = {'file': file, 'inputs': graph.inputs,
                                  'outputs': graph.outputs}
        np.savez(tmp / rt.GOLDEN, **golden)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        normalization = None
        if plan.obs_mean is not None:
            normalization = {'mean': _floats(plan.obs_mean), 'std': _floats(plan.obs_std)}
        manifest = {
            'format': rt.FORMAT,
            'name': name or out_dir.name,
            'algorithm': plan.algorithm,
            'task': {'name': spec.name, 'env_id': spec.env_id, 'offline_id': spec.offline_id,
                     'horizon': spec.horizon, 'max_reward': spec.max_reward,
                     'min_reward': spec.min_reward, 'max_cost': spec.max_cost},
            'observation': {'dim': spec.obs_dim, 'channels': channel_names(spec.name),
                            'normalization': normalization},
            'action': {'dim': spec.act_dim, 'low': _floats(low), 'high': _floats(high)},
            'graphs': graphs,
            'critic': plan.critic,
            'algorithm_config': plan.extra,
            'provenance': {'dataset': None, 'dataset_sha256': None, 'config': None,
                           'code_version': code_version(), 'seed': seed, 'steps': None,
                           'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
                           **(provenance or {})},
            'metrics': metrics or {},
            'files': files,
        }
        with open(tmp / rt.MANIFEST, 'w') as stream:
            yaml.safe_dump(yaml_safe(manifest), stream, sort_keys=False, width=120)
        # The runtime's own verification (checksums, dims, golden outputs at the golden batch),
        # then batch 1, the size a controller runs at: a batch size baked into the graph by the
        # tracer would pass the first check and fail this one.
        loaded = rt.load_bundle(tmp)
        check_parity(loaded, plan, {g: {t: v[:1] for t, v in f.items()} for g, f in feeds.items()})
        # The old bundle is moved aside, not deleted, until the new one is in place: a kill in
        # between leaves it whole next to out_dir (.NAME.replaced-PID), never lost.
        replaced = None
        if out_dir.exists():
            replaced = out_dir.with_name(f'.{out_dir.name}.replaced-{os.getpid()}')
            os.replace(out_dir, replaced)
        os.replace(tmp, out_dir)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_parity(bundle: 'rt.Bundle', plan: ExportPlan, feeds: Dict[str, Dict[str, np.ndarray]],
                 atol: float = rt.GOLDEN_ATOL) -> float:
    """
    Compare every graph of a loaded bundle with the torch modules on ``feeds``.

    Return the largest absolute difference; raise BundleError if it exceeds ``atol``.
    """
    worst = 0.0
    for name, graph in plan.graphs.items():
        expected = run_torch(graph, feeds[name])
        if name == 'critic':
            found = bundle.critic(feeds[name]['observation'], feeds[name]['action'])
        else:
            act = getattr(bundle, name)
            found = {'action': act(feeds[name]['observation'], noise=feeds[name].get('noise'))}
        for tensor, value in expected.items():
            error = float(np.max(np.abs(value - found[tensor])))
            worst = max(worst, error)
            if error > atol:
                raise rt.BundleError(f'{name}.onnx: output {tensor} differs from torch by '
                                     f'{error:.3g} (tolerance {atol:g}) at batch {len(value)}')
    return worst


def update_metrics(bundle_dir, metrics: dict) -> None:
    """Store evaluation results in a bundle's manifest (the manifest is not in its own hashes)."""
    file = Path(bundle_dir) / rt.MANIFEST
    manifest = read_yaml_mapping(file, rt.REEXPORT)
    manifest['metrics'] = yaml_safe(metrics)
    atomic_write_yaml(file, manifest)


def _floats(values) -> List[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


# --------------------------------------------------------------------------- test bundles

def build_test_model(task='BallCircle', seed: int = 0, algorithm: str = 'fisor',
                     train_steps: int = 30):
    """
    Return (model, plan) of the algorithm's 'test' preset, trained ``train_steps`` iterations.

    ``algorithm``: a name of the algorithm registry (fisor, drcorl, dspo, bc_all, ...).
    """
    from offline_training.algos.batching import ReplayBuffer
    from offline_training.algos.infrastructure import set_seed
    from offline_training.data.synthetic import synthetic_dataset

    spec = get_task(task)
    module, fixed = get_algorithm(algorithm)
    set_seed(seed)
    config = module.make_config('test', **fixed, steps=max(train_steps, 1))
    config = module.resolve_config(config, spec)
    model = module.build_model(spec.obs_dim, spec.act_dim, config)
    if train_steps > 0:
        data = synthetic_dataset(spec.name, episodes=16, seed=seed, max_length=170)
        buffer = ReplayBuffer(module.prepare_arrays(data, config), torch.device('cpu'),
                              seed=seed)
        trainer = module.make_trainer(model, config)
        model.train()
        for _ in range(train_steps):
            trainer.update(buffer)
    model.eval()
    return model, module.export_plan(model, config)


def make_test_bundle(out_dir, task='BallCircle', seed: int = 0, algorithm: str = 'fisor',
                     train_steps: int = 30) -> Path:
    """
    Export a complete, verifiable bundle of a tiny model in a few seconds (for tests).

    The model is the algorithm's real code with its 'test' preset (tiny networks; FISOR: N = 8
    candidates, 16 for the fallback), trained ``train_steps`` iterations on a synthetic dataset
    (offline_training.data.synthetic). It is not a useful policy; it exercises every part of the
    bundle contract.
    ``algorithm``: any registered algorithm (fisor by default).
    """
    _, plan = build_test_model(task, seed, algorithm, train_steps)
    provenance = {'dataset': 'synthetic (make_test_bundle)', 'steps': train_steps,
                  'config': f'make_test_bundle tiny {algorithm}'}
    return write_bundle(plan, out_dir, task, name=f'test-{algorithm}-{get_task(task).name}',
                        provenance=provenance, seed=seed)


# --------------------------------------------------------------------------- run folders

def export_run(run_dir, out_dir, name: Optional[str] = None, seed: int = 0,
               num_candidates: Optional[int] = None,
               fallback_candidates: Optional[int] = None, overwrite: bool = False,
               selection: Optional[str] = None) -> Path:
    """
    Export the model of a ``saferl-train`` run folder as a bundle; return the bundle folder.

    ``num_candidates``/``fallback_candidates`` override FISOR's N for the policy/fallback graphs
    (the paper's N = 16; more candidates is more conservative: a wider search for low Q_h);
    ``selection`` FISOR's choice among the candidates ('minqc', the paper's, or
    'feasible-maxq'). The bundle's provenance config records the values used.
    """
    inference = {key: value for key, value in (('num_candidates', num_candidates),
                                               ('fallback_candidates', fallback_candidates),
                                               ('selection', selection)) if value is not None}
    run = open_run(run_dir, inference=inference)
    run_config = run.run_config
    bad = [name for name, tensor in run.model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        # said here: the golden-output check would blame the difference on onnxruntime
        raise ConfigError(f'{run_dir}: the checkpoint holds NaN or Inf weights ({len(bad)} '
                          f'tensors, e.g. {bad[0]}): training diverged; retrain it (a lower '
                          'learning rate, another seed)')
    plan = run.export_plan()
    dataset = run_config.get('dataset') or {}
    if not isinstance(dataset, dict):   # written by saferl-train as a mapping; edited by hand
        dataset = {'source': str(dataset)[:200]}
    provenance = {
        'dataset': shown_path(dataset['path']) if dataset.get('path') else dataset.get('source'),
        'dataset_sha256': dataset.get('sha256'),
        'config': {'preset': run_config.get('preset'), **run_config['algo_config'],
                   **run_config.get('inference', {})},
        'code_version': run_config.get('code_version') or code_version(),
        'export_code_version': code_version(),
        'seed': run_config.get('seed'),
        'steps': run_config.get('checkpoint_step'),
        'run': shown_path(run_dir),
        'trained': run_config.get('created'),
    }
    return write_bundle(plan, out_dir, run_config['task']['name'], name=name,
                        provenance=provenance, seed=seed, overwrite=overwrite)


@reports_user_errors('saferl-export')
def main(argv=None) -> int:
    """Command-line entry point of saferl-export."""
    parser = argparse.ArgumentParser(
        prog='saferl-export',
        description='Export a saferl-train run folder as a verified model bundle (manifest.yaml, '
        'policy/critic/fallback ONNX graphs, golden.npz); see docs/bundle.md.')
    parser.add_argument('run', help='run folder written by saferl-train')
    parser.add_argument('-o', '--out', required=True, help='bundle folder, e.g. models/NAME')
    parser.add_argument('--name', default=None, help='bundle name (default: folder name)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the golden inputs')
    parser.add_argument('--candidates', type=int, default=None,
                        help="FISOR: candidates N of the policy graph (default: the run's)")
    parser.add_argument('--fallback-candidates', type=int, default=None,
                        help="FISOR: candidates of the fallback graph (default: the run's)")
    parser.add_argument('--selection', default=None, choices=fisor.SELECTIONS,
                        help="FISOR: the policy graph's choice among its candidates (default: "
                        "the run's; minqc is the paper's, docs/algorithms.md)")
    parser.add_argument('--force', action='store_true', help='replace an existing bundle')
    parser.add_argument('--feasibility-plot', nargs='?', const='', default=None, metavar='PNG',
                        help='also draw V_h over the x-y plane (Circle tasks; default '
                        'OUT/feasibility.png, not part of the verified files)')
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f'--seed must be >= 0, got {args.seed}')
    for option, value in (('--candidates', args.candidates),
                          ('--fallback-candidates', args.fallback_candidates)):
        if value is not None and value < 1:
            parser.error(f'{option} must be >= 1, got {value}')
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = export_run(args.run, args.out, args.name, args.seed, args.candidates,
                     args.fallback_candidates, overwrite=args.force, selection=args.selection)
    print(f'saferl-export: wrote and verified {out}')
    if args.feasibility_plot is not None:
        from offline_training.feasibility_plot import plot_bundle_feasibility
        png = Path(args.feasibility_plot) if args.feasibility_plot else out / 'feasibility.png'
        plot_bundle_feasibility(out, png)
        print(f'saferl-export: feasibility picture {png}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
