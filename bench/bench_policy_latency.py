"""
Per-action latency at batch 1: FISOR's policy (torch eager and ONNX Runtime) beside DRCORL's.

The policy is FISOR's whole sampler (N = 16 candidates, T = 5 DDPM steps, argmin over the
max-of-heads Q_h), with the paper's network sizes by default (ln_resnet 256 x 3 blocks, critics
256 x 256). Latency does not depend on the weights, so a freshly initialised model is exported
and timed. Both run in this process, one thread each (torch.set_num_threads(1); onnxruntime
intra_op_num_threads=1, as the runtime uses), on the same observations and noise.

DRCORL's policy is its deterministic tanh MLP (the diffusion model only regularised training)
and its critic the cost-critic ensemble (mean and std of Q_c, the monitor's UCB input), also
freshly initialised at the same preset's sizes and timed in the same round-robin.

    python bench/bench_policy_latency.py [--preset paper|cpu] [--iterations 1000]

A second table times FISOR's policy graph under the ONNX Runtime options that matter on a small
CPU, as ratios to the session the runtime uses (saferl_ros.bundle.make_session: 1 intra-op
thread, sequential, all graph optimisations): 2 intra-op threads (with and without spinning),
lower graph optimisation levels, pre-allocated IO binding, and a new session per call (what
not reusing the session would cost).

Reference: FISOR's sampler is ~7 ms per action and DRCORL's policy ~0.37 ms in the DRCORL
paper's comparison (paper's numbers, GPU machine); the targets here are <= 1 ms per action for
FISOR with ONNX Runtime and well under 0.1 ms for DRCORL, on a 2-core CPU.
"""

import argparse
import os
from pathlib import Path
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline_training.machine import machine_info  # noqa: E402


def timings(calls: dict, iterations: int, warmup: int, cpu_clock=time.thread_time_ns) -> dict:
    """
    Return per-call (wall, CPU) times [ms] of every call, measured round-robin.

    Each iteration times every call once, in turn, so all of them see the same background load
    (this machine's 2 cores are shared); their ratio is fair even when the absolute figures move.
    The CPU time (``time.thread_time``) counts only what this thread computed: with one thread,
    torch and ONNX Runtime run their kernels in the calling thread, so it is the latency the call
    would have on an idle core, undisturbed by other processes taking the CPU away.
    ``cpu_clock=time.process_time_ns`` counts every thread of this process instead (the cost of
    a call that uses more than one intra-op thread).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    wall = {name: np.empty(iterations) for name in calls}
    cpu = {name: np.empty(iterations) for name in calls}
    for i in range(iterations):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter_ns(), cpu_clock()
            call()
            cpu[name][i] = (cpu_clock() - start_cpu) / 1e6
            wall[name][i] = (time.perf_counter_ns() - start) / 1e6
    return {name: (wall[name], cpu[name]) for name in calls}


def stats(times) -> dict:
    """Return p50, p99 and mean of the wall times and p50 and mean of the CPU times [ms]."""
    wall, cpu = times
    return {'p50': float(np.percentile(wall, 50)), 'p99': float(np.percentile(wall, 99)),
            'mean': float(wall.mean()), 'cpu_p50': float(np.percentile(cpu, 50)),
            'cpu_mean': float(cpu.mean())}


def line(name: str, s: dict) -> str:
    """Format one row of the result table."""
    return (f'{name:<28} wall p50 {s["p50"]:7.3f}  p99 {s["p99"]:7.3f}  mean {s["mean"]:7.3f} ms'
            f' | CPU p50 {s["cpu_p50"]:7.3f}  mean {s["cpu_mean"]:7.3f} ms')


def ort_sessions(model: bytes) -> dict:
    """Return {label: session} of FISOR's policy graph under the ONNX Runtime options compared."""
    import onnxruntime as ort

    from saferl_ros.bundle import make_session

    def session(threads=1, level=None, spinning=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if spinning is not None:
            options.add_session_config_entry('session.intra_op.allow_spinning', spinning)
        return ort.InferenceSession(model, sess_options=options,
                                    providers=['CPUExecutionProvider'])
    level = ort.GraphOptimizationLevel
    return {'shipped (1 thread, ORT_ENABLE_ALL)': make_session(model),
            '2 intra-op threads (spinning)': session(threads=2),
            '2 intra-op threads, no spinning': session(threads=2, spinning='0'),
            'ORT_ENABLE_EXTENDED': session(level=level.ORT_ENABLE_EXTENDED),
            'ORT_ENABLE_BASIC': session(level=level.ORT_ENABLE_BASIC),
            'ORT_DISABLE_ALL': session(level=level.ORT_DISABLE_ALL)}


def ort_option_calls(model: bytes, obs: np.ndarray, noise: np.ndarray, act_dim: int) -> dict:
    """Return {label: call} running the policy graph once per call, one per option compared."""
    import onnxruntime as ort

    from saferl_ros.bundle import make_session
    feeds = {'observation': obs, 'noise': noise}
    calls = {label: (lambda s=sess: s.run(['action'], feeds))
             for label, sess in ort_sessions(model).items()}
    shipped = make_session(model)
    binding = shipped.io_binding()
    binding.bind_cpu_input('observation', obs)
    binding.bind_cpu_input('noise', noise)
    out = ort.OrtValue.ortvalue_from_numpy(np.zeros((len(obs), act_dim), np.float32))
    binding.bind_ortvalue_output('action', out)
    calls['IO binding, pre-allocated output'] = lambda: shipped.run_with_iobinding(binding)
    return calls


SAMPLER_PARTS = (('condition network (time features + cond MLP)', ('cond', 'time_features')),
                 ('body input layer', ('body/inp',)), ('body residual blocks', ('body/blocks',)),
                 ('body output layer', ('body/out',)), ('critic ranking of candidates', ('q_h',)))


def sampler_shares(model: bytes, obs: np.ndarray, noise: np.ndarray, calls: int = 200) -> dict:
    """
    Return each part's share of the policy graph's kernel time (ONNX Runtime's own profiler).

    Says what a cheaper sampler could save, e.g. computing the condition network once per
    denoising step instead of once per candidate and step (it depends on the step only).
    Profiling adds a fixed cost per node, so small element-wise nodes weigh more than they do
    without it: read the shares as upper bounds for the small parts.
    """
    import json

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / 'policy')
        session = ort.InferenceSession(model, sess_options=options,
                                       providers=['CPUExecutionProvider'])
        for _ in range(calls):
            session.run(['action'], {'observation': obs, 'noise': noise})
        events = json.loads(Path(session.end_profiling()).read_text())
    shares = {name: 0.0 for name, _ in SAMPLER_PARTS}
    other = 'other nodes (sampler arithmetic, concat, argmin)'
    shares[other] = 0.0
    for event in events:
        name = event.get('name', '')
        if event.get('cat') != 'Node' or not name.endswith('_kernel_time'):
            continue
        part = next((label for label, keys in SAMPLER_PARTS if any(k in name for k in keys)),
                    other)
        shares[part] += event['dur']
    total = sum(shares.values())
    return {name: value / total for name, value in shares.items()}


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--preset', default='paper', choices=['paper', 'cpu'],
                        help="FISOR network sizes: 'paper' (default) or the 'cpu' preset")
    parser.add_argument('--task', default='BallCircle')
    parser.add_argument('--iterations', type=int, default=1000)
    parser.add_argument('--warmup', type=int, default=50)
    parser.add_argument('--torch-threads', type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from offline_training.algos import drcorl, fisor
    from saferl_ros.tasks import get_task
    from offline_training.export import write_bundle
    from saferl_ros.bundle import load_bundle, make_session

    torch.set_num_threads(args.torch_threads)
    spec = get_task(args.task)
    config = fisor.resolve_config(fisor.make_config(args.preset), spec)
    torch.manual_seed(0)
    model = fisor.build_model(spec.obs_dim, spec.act_dim, config).eval()
    drcorl_config = drcorl.resolve_config(drcorl.make_config(args.preset), spec)
    drcorl_model = drcorl.build_model(spec.obs_dim, spec.act_dim, drcorl_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(write_bundle(fisor.export_plan(model, config), Path(tmp) / 'bench',
                                          spec.name))
        drcorl_bundle = load_bundle(write_bundle(drcorl.export_plan(drcorl_model, drcorl_config),
                                                 Path(tmp) / 'drcorl', spec.name))
        model_bytes = Path(bundle._graphs['policy'].path).read_bytes()
    rng = np.random.default_rng(0)
    obs = rng.normal(scale=0.3, size=(1, spec.obs_dim)).astype(np.float32)
    noise = bundle.sample_noise(1, rng)
    fallback_noise = bundle.sample_noise(1, rng, graph='fallback')
    act = bundle.policy(obs, noise)
    obs_t, noise_t = torch.as_tensor(obs), torch.as_tensor(noise)

    def torch_policy():
        with torch.no_grad():
            return model.act(obs_t, noise_t)

    def torch_policy_with_noise():
        with torch.no_grad():  # includes drawing the noise, as a controller would
            return model.act(obs_t, model.sample_noise(1))

    calls = {
        'torch eager policy': torch_policy,
        'torch eager policy + noise': torch_policy_with_noise,
        'onnxruntime policy': lambda: bundle.policy(obs, noise),
        'onnxruntime policy + noise': lambda: bundle.policy(obs, rng=rng),
        'onnxruntime critic': lambda: bundle.critic(obs, act),
        f'onnxruntime fallback (N={model.fallback_candidates})':
            lambda: bundle.fallback(obs, fallback_noise),
        'DRCORL onnxruntime policy': lambda: drcorl_bundle.policy(obs),
        'DRCORL onnxruntime critic': lambda: drcorl_bundle.critic(obs, act),
    }
    load_before = os.getloadavg()
    measured = timings(calls, args.iterations, args.warmup)
    results = {name: stats(t) for name, t in measured.items()}
    diff = float(np.abs(torch_policy().numpy() - bundle.policy(obs, noise)).max())
    info = machine_info()
    print(f'FISOR policy latency at batch 1, preset {args.preset!r} (actor {config.actor_hidden} '
          f'x {config.actor_blocks} blocks, N = {config.num_candidates}, T = '
          f'{config.diffusion_steps}), task {spec.name}, {args.iterations} calls after '
          f'{args.warmup} warm-up')
    print(f'machine: {info["cpu"]}, {info["cores"]} cores, 1-min load average '
          f'{load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after; python '
          f'{info["python"]}, torch '
          f'{info["torch"]} ({args.torch_threads} thread), onnxruntime {info["onnxruntime"]} '
          '(1 intra-op thread), numpy ' + info['numpy'])
    for name, s in results.items():
        print(line(name, s))
    ratio = results['torch eager policy']['p50'] / results['onnxruntime policy']['p50']
    ratio_cpu = (results['torch eager policy']['cpu_p50']
                 / results['onnxruntime policy']['cpu_p50'])
    print(f'speed-up torch eager / onnxruntime: {ratio:.1f}x (wall p50), {ratio_cpu:.1f}x (CPU '
          f'p50); max |torch - onnx| action difference: {diff:.2e}')
    fisor_over_drcorl = (results['onnxruntime policy']['cpu_p50']
                         / results['DRCORL onnxruntime policy']['cpu_p50'])
    print(f'DRCORL policy (MLP {"x".join(map(str, drcorl_config.policy_hidden))}) is '
          f'{fisor_over_drcorl:.0f}x faster than the FISOR sampler (ONNX Runtime, CPU p50)')

    # ONNX Runtime options on FISOR's policy graph, as ratios to the shipped session.
    options = timings(ort_option_calls(model_bytes, obs, noise, spec.act_dim), args.iterations,
                      args.warmup, cpu_clock=time.process_time_ns)
    option_stats = {name: stats(t) for name, t in options.items()}
    creation = []
    for _ in range(10):
        start = time.perf_counter_ns()
        make_session(model_bytes).run(['action'], {'observation': obs, 'noise': noise})
        creation.append((time.perf_counter_ns() - start) / 1e6)
    base = option_stats['shipped (1 thread, ORT_ENABLE_ALL)']
    print(f'\nONNX Runtime options, FISOR policy graph, batch 1 (load average now '
          f'{os.getloadavg()[0]:.2f}); CPU = every thread of this process (both intra-op '
          'threads where there are two):')
    print('| option | wall p50 [ms] | wall p99 [ms] | CPU p50 [ms] | wall p50 / shipped | '
          'wall p99 / shipped |')
    print('|---|---|---|---|---|---|')
    for name, st in option_stats.items():
        print(f'| {name} | {st["p50"]:.3f} | {st["p99"]:.3f} | {st["cpu_p50"]:.3f} | '
              f'{st["p50"] / base["p50"]:.2f} | {st["p99"] / base["p99"]:.2f} |')
    print(f'| new session per call (no reuse; 10 calls) | {np.percentile(creation, 50):.3f} | '
          f'{max(creation):.3f} (max) | | {np.percentile(creation, 50) / base["p50"]:.0f} | |')
    print('\nFISOR policy graph: share of kernel time per part (ONNX Runtime profiler, '
          f'{args.preset!r} sizes):')
    for name, share in sampler_shares(model_bytes, obs, noise).items():
        print(f'  {name}: {100 * share:.1f} %')
    return 0


if __name__ == '__main__':
    sys.exit(main())
