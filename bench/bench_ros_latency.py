"""
End-to-end control latency of the ROS 2 loop: observation published -> final command received.

The controller and the safety monitor run as separate processes (console scripts, as on a robot)
with the FISOR bundle; this process plays the robot: it publishes BallCircle observations at a
fixed rate (50 Hz and 100 Hz), stamps each with its publish time and records when the proposal
(controller) and the final command (monitor) come back. Beside it, in the same run, the rclpy
transport floor: a ping-pong between this process and an echo process on the same QoS.

The same run can also time the one-process loop of ``saferl-demo`` / ``saferl-bringup``
(configuration option ``onebox``: sim, controller, monitor and recorder of config/demo.yaml in
one process, lock-step at the rate, the simulator measuring), with the CPU time its thread spent
on each callback between observation and command (robust to other load on the machine), and a
DRCORL bundle with the paper's sizes (option ``drcorl``).

    python bench/bench_ros_latency.py [--bundle models/fisor-ballcircle] [--samples 1000]
    python bench/bench_ros_latency.py --configs single+precompute+onebox@50 events+onebox@50 \
        events+precompute@50 events+drcorl@100 events+onebox+drcorl@100

Without --bundle it uses models/fisor-ballcircle if present, else an untrained FISOR bundle with
the paper's network sizes (latency does not depend on the weights). Target: p99 <= 5 ms at 50 Hz
on 2 cores (FISOR), p99 <= 2 ms at 100 Hz (DRCORL).
"""

import argparse
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def untrained_bundle(algorithm: str, out_dir: Path, task: str = 'BallCircle') -> str:
    """
    Export an untrained model with the paper's sizes as a bundle (latency needs no weights).

    'fisor': N = 16 candidates x T = 5 denoising steps; 'drcorl': the policy MLP 256 x 256.
    """
    import torch

    from offline_training.algos import get_algorithm
    from offline_training.export import write_bundle
    from saferl_ros.tasks import get_task

    module, _ = get_algorithm(algorithm)
    torch.set_num_threads(1)
    spec = get_task(task)
    config = module.resolve_config(module.make_config('paper'), spec)
    torch.manual_seed(0)
    model = module.build_model(spec.obs_dim, spec.act_dim, config).eval()
    return str(write_bundle(module.export_plan(model, config),
                            out_dir / f'{algorithm}-paper-untrained', spec.name))


def pass_through(bundle_dir: str) -> dict:
    """Return the monitor parameters that let every proposal of this bundle's critic pass."""
    from saferl_ros.bundle import load_bundle
    from saferl_ros.monitor import boundary_at

    return boundary_at(load_bundle(bundle_dir, verify_golden=False).critic_kind, 1e9)


def shown(path: str) -> str:
    """Return a path as the results show it: relative to the repository, else its last part."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return Path(path).name


def stats(ms) -> dict:
    """Return p50/p99/max/mean of milliseconds."""
    ms = np.asarray(ms, np.float64)
    if ms.size == 0:
        return {'n': 0}
    return {'n': int(ms.size), 'p50': float(np.percentile(ms, 50)),
            'p99': float(np.percentile(ms, 99)), 'max': float(ms.max()),
            'mean': float(ms.mean())}


def compute_only(bundle_dir: str, observations: np.ndarray, n: int = 500) -> dict:
    """Time the bundle's graphs in this process (what the nodes compute, without transport)."""
    from saferl_ros.bundle import load_bundle
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    out = {}
    calls = [('policy', lambda o: bundle.policy(o, rng=rng)),
             ('critic', lambda o: bundle.critic(o, np.zeros((1, bundle.act_dim), np.float32)))]
    if bundle.has_fallback:
        calls.append(('fallback', lambda o: bundle.fallback(o, rng=rng)))
    for name, call in calls:
        times = []
        for i in range(n):
            obs = observations[i % len(observations)][None]
            start = time.perf_counter_ns()
            call(obs)
            times.append((time.perf_counter_ns() - start) / 1e6)
        out[name] = stats(times[20:])
    return out


def echo_main() -> int:
    """Echo process: republish every ping as a pong."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import JointState

    from saferl_ros.nodes.common import COMMAND_QOS
    rclpy.init()
    node = Node('latency_echo')
    pub = node.create_publisher(JointState, 'pong', COMMAND_QOS)
    node.create_subscription(JointState, 'ping', pub.publish, COMMAND_QOS)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, Exception):  # ExternalShutdownException on SIGINT
        pass
    return 0


def sim_observations(bundle_dir: str, n: int = 400) -> np.ndarray:
    """Return BallCircle observations visited by the bundle's own policy (what the loop sees)."""
    from saferl_ros.bundle import load_bundle
    from saferl_ros.sim import SimEpisodes
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    sim = SimEpisodes('BallCircle', seed=0)
    obs = [sim.reset()]
    while len(obs) < n:
        result = sim.step(bundle.policy(obs[-1][None], rng=rng)[0])
        obs.append(result.observation)
        if result.terminated or result.truncated:
            obs.append(sim.reset())
    sim.close()
    return np.asarray(obs[:n], np.float32)


def start(executable: str, args: list, log: Path, priority: int = 0,
          executor: str = 'events') -> subprocess.Popen:
    """Start a console-script node (configured and activated) in its own process."""
    exe = shutil.which(executable, path=os.path.dirname(sys.executable)) or executable
    rt = ['--realtime-priority', str(priority)] if priority else []
    return subprocess.Popen([exe, '--autostart', '--executor', executor] + rt + ['--ros-args']
                            + args, stdout=open(log, 'w'), stderr=subprocess.STDOUT,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})


CONFIG_OPTIONS = ('precompute', 'composed', 'onebox', 'drcorl', 'baseline')


def parse_config(name: str) -> dict:
    """
    Parse a configuration name EXECUTOR[+OPTION...][@RATE,...], e.g. 'events+onebox@50'.

    precompute: the monitor computes the fallback when the observation arrives; composed: the
    controller and the monitor share one process and executor (saferl-bringup), else two;
    onebox: the whole loop of config/demo.yaml in one saferl-bringup process (simulator and
    recorder included); drcorl: the DRCORL bundle with the paper's sizes instead of FISOR's;
    baseline (with onebox): the nodes' code of --baseline-tree (e.g. an older commit's files).
    @RATE: the rates [Hz] of this configuration (default --rates).
    """
    body, _, rates = name.partition('@')
    parts = body.split('+')
    from saferl_ros.nodes.common import EXECUTORS
    try:
        rate_list = [float(r) for r in rates.split(',')] if rates else None
    except ValueError:
        rate_list = []
    if parts[0] not in EXECUTORS or any(p not in CONFIG_OPTIONS for p in parts[1:]) or \
            rate_list == [] or ('onebox' in parts and 'composed' in parts) or \
            ('baseline' in parts and 'onebox' not in parts):
        raise SystemExit(f'bad configuration {name!r}: use EXECUTOR[+OPTION...][@RATE,...] '
                         f'with EXECUTOR one of {EXECUTORS}, OPTION of {CONFIG_OPTIONS} '
                         '(onebox or composed), e.g. events+onebox@50')
    return {'name': name, 'executor': parts[0], 'precompute': 'precompute' in parts[1:],
            'composed': 'composed' in parts[1:], 'onebox': 'onebox' in parts[1:],
            'drcorl': 'drcorl' in parts[1:], 'baseline': 'baseline' in parts[1:],
            'rates': rate_list}


def start_composed(bundle: str, monitor_params: dict, log: Path, executor: str,
                   tmp: Path) -> subprocess.Popen:
    """Start controller and monitor in one saferl-bringup process (one executor, one thread)."""
    import yaml

    from saferl_ros import graph
    config = tmp / f'composed-{executor}.yaml'
    config.write_text(yaml.safe_dump({
        graph.CONTROLLER: {'ros__parameters': {'bundle': bundle}},
        graph.MONITOR: {'ros__parameters': monitor_params}}))
    exe = shutil.which('saferl-bringup', path=os.path.dirname(sys.executable)) or \
        'saferl-bringup'
    return subprocess.Popen([exe, str(config), '--executor', executor], stdout=open(log, 'w'),
                            stderr=subprocess.STDOUT,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def measure(config: dict, bundle: str, observations: np.ndarray, args, tmp: Path) -> dict:
    """Start controller + monitor (+ echo) in one configuration; time the loop through them."""
    from rclpy.node import Node
    from saferl_interfaces.msg import MonitorVerdict
    from sensor_msgs.msg import JointState

    from saferl_ros import graph
    from saferl_ros.monitor import MonitorState
    from saferl_ros.nodes import common
    from saferl_ros.observation import channel_names

    executor_kind, tag = config['executor'], config['name'].replace('+', '_')
    monitor_params = {'bundle': bundle, 'observation_timeout': 1.0, 'proposal_timeout': 1.0,
                      'watchdog': False, 'precompute_fallback': config['precompute']}
    if args.pass_through:
        monitor_params.update(pass_through(bundle))
    if config['composed']:
        procs = [start_composed(bundle, monitor_params, tmp / f'composed-{tag}.log',
                                executor_kind, tmp)]
    else:
        monitor_args = []
        for key, value in monitor_params.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            monitor_args += ['-p', f'{key}:={text}']
        procs = [
            start(graph.CONTROLLER, ['-p', f'bundle:={bundle}'], tmp / f'controller-{tag}.log',
                  args.realtime_priority, executor_kind),
            start(graph.MONITOR, monitor_args, tmp / f'monitor-{tag}.log',
                  args.realtime_priority, executor_kind)]
    procs.append(subprocess.Popen([sys.executable, __file__, '--echo'], env=os.environ.copy()))
    node = Node('latency_bench')
    executor = common.make_executor(executor_kind)
    executor.add_node(node)
    names = channel_names('BallCircle')
    proposed, final, verdicts, pongs = {}, {}, {}, {}

    def now_ns():
        return time.time_ns()

    node.create_subscription(JointState, common.PROPOSED, lambda m: proposed.setdefault(
        common.stamp_to_ns(m.header.stamp), now_ns()), common.COMMAND_QOS)
    node.create_subscription(JointState, common.FINAL, lambda m: final.setdefault(
        common.stamp_to_ns(m.header.stamp), now_ns()), common.COMMAND_QOS)
    node.create_subscription(MonitorVerdict, common.VERDICT, lambda m: verdicts.setdefault(
        common.stamp_to_ns(m.header.stamp), m.state), common.RECORD_QOS)
    node.create_subscription(JointState, 'pong', lambda m: pongs.setdefault(
        common.stamp_to_ns(m.header.stamp), now_ns()), common.COMMAND_QOS)
    obs_pub = node.create_publisher(JointState, common.OBSERVATION, common.SENSOR_QOS)
    ping_pub = node.create_publisher(JointState, 'ping', common.COMMAND_QOS)

    def wait(condition, timeout):
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.001)
        return condition()

    result = {'config': config, 'rates': {}}
    try:
        ready = wait(lambda: node.count_subscribers(common.OBSERVATION) >= 2 and
                     node.count_publishers(common.FINAL) >= 1 and
                     node.count_subscribers('ping') >= 1, 60.0)
        if not ready:
            raise RuntimeError(f'nodes did not come up; logs in {tmp}')
        time.sleep(1.0)
        # Transport floor: one JointState of the observation's size, ping -> pong, back to back.
        rtt = []
        for i in range(args.pings + 20):
            stamp = now_ns()
            ping_pub.publish(common.joint_state(names, observations[i % len(observations)],
                                                stamp))
            if wait(lambda: stamp in pongs, 1.0) and i >= 20:
                rtt.append((pongs[stamp] - stamp) / 1e6)
        result['pingpong_rtt_ms'] = stats(rtt)
        result['pingpong_one_way_ms'] = stats(np.asarray(rtt) / 2)
        for rate in config['rates'] or args.rates:
            stamps = []
            period = 1.0 / rate
            next_time = time.monotonic()
            for i in range(args.samples + args.warmup):
                next_time += period
                stamp = now_ns()
                obs_pub.publish(common.joint_state(names, observations[i % len(observations)],
                                                   stamp))
                if i >= args.warmup:
                    stamps.append(stamp)
                while time.monotonic() < next_time:
                    executor.spin_once(timeout_sec=max(0.0, next_time - time.monotonic()))
            wait(lambda: stamps[-1] in final, 2.0)
            got = [s for s in stamps if s in final and s in proposed]
            total = [(final[s] - s) / 1e6 for s in got]
            to_proposal = [(proposed[s] - s) / 1e6 for s in got]
            monitor_stage = [(final[s] - proposed[s]) / 1e6 for s in got]
            states = np.array([verdicts.get(s, -1) for s in got])
            result['rates'][str(int(rate))] = {
                'total_ms': stats(total), 'observation_to_proposal_ms': stats(to_proposal),
                'proposal_to_final_ms': stats(monitor_stage),
                'lost': len(stamps) - len(got),
                'fallback_share': float(np.isin(states, [MonitorState.INTERVENING,
                                                         MonitorState.RECOVERY]).mean())}
    finally:
        executor.remove_node(node)
        node.destroy_node()
        if hasattr(executor, 'shutdown'):
            executor.shutdown()
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return result


class CallbackClock:
    """
    CPU time of this thread per callback, split by whether the loop was waiting for a command.

    Wraps every subscription callback of a one-process graph. A callback that starts while the
    simulator waits for the command answering its observation is on the control path (the
    simulator's own command callback excepted: it ends the wait). ``time.thread_time`` counts
    only what this thread computed, so the split does not depend on other load.
    """

    def __init__(self, graph, sim):
        self.sim = sim
        self.path: dict = {}
        self.off_path: dict = {}
        for name, node in graph.nodes.items():
            for sub in node.subscriptions:
                label = f'{name} <- {sub.topic_name}'
                ends_wait = node is sim and sub.topic_name.endswith('action/final')
                sub.callback = self._timed(label, sub.callback, ends_wait)

    def _timed(self, label, callback, ends_wait):
        def timed(msg):
            in_path = self.sim.stamp_ns is not None and not ends_wait
            start = time.thread_time()
            try:
                return callback(msg)
            finally:
                table = self.path if in_path else self.off_path
                table.setdefault(label, []).append(time.thread_time() - start)
        return timed


def onebox_main(spec_file: str) -> int:
    """Child process of an onebox configuration: run config/demo.yaml's graph, save latencies."""
    spec = json.loads(Path(spec_file).read_text())
    if spec.get('tree'):      # another checkout's code (--baseline-tree), imported before ours
        sys.path.insert(0, spec['tree'])
    from saferl_ros import graph as node_graph
    from saferl_ros.bringup import apply_overrides, Graph, load_parameters
    nodes = load_parameters(REPO / 'config' / 'demo.yaml')
    apply_overrides(nodes, spec['overrides'])
    graph = Graph(nodes, executor=spec['executor'])
    out = {}
    try:
        errors = graph.configure()
        if errors:
            raise RuntimeError(f'configure failed: {errors}')
        sim = graph.nodes[node_graph.SIM]
        clock = CallbackClock(graph, sim)
        graph.activate()
        need = spec['warmup'] + spec['samples']
        if not graph.spin_until(lambda: len(sim.latency.samples) >= need, spec['timeout']):
            raise RuntimeError(f'only {len(sim.latency.samples)} of {need} steps in time')
        graph.deactivate()
        counts = graph.nodes[node_graph.MONITOR].monitor.counters.as_dict()
        cpu = getattr(sim, 'cpu_latency', None)     # None: a baseline without it
        steps = len(sim.latency.samples[spec['warmup']:need])
        out = {'wall_ms': [x * 1e3 for x in sim.latency.samples[spec['warmup']:need]],
               'cpu_ms': [x * 1e3 for x in cpu.samples[spec['warmup']:need]] if cpu else [],
               'fallback_share': (counts['intervening'] + counts['recovery'])
               / max(1, counts['decisions']),
               'path_cpu_ms_per_step': {k: 1e3 * sum(v) / max(1, len(sim.latency.samples))
                                        for k, v in clock.path.items()},
               'off_path_cpu_ms_per_step': {k: 1e3 * sum(v) / max(1, len(sim.latency.samples))
                                            for k, v in clock.off_path.items()},
               'steps': steps}
    finally:
        graph.shutdown()
    Path(spec['out']).write_text(json.dumps(out))
    return 0


def measure_onebox(config: dict, bundle: str, args, tmp: Path) -> dict:
    """Run the one-process loop (config/demo.yaml) once per rate in a child process."""
    from saferl_ros import graph as node_graph
    result = {'config': config, 'rates': {}}
    for rate in config['rates'] or args.rates:
        tag = f'{config["name"].replace("+", "_").replace("@", "_")}-{int(rate)}'
        overrides = [f'{node}.{param}={bundle}' for node, params in
                     node_graph.bundle_parameters(bundle, node_graph.SIM_LOOP).items()
                     for param in params]
        overrides += [f'{node_graph.SIM}.rate_hz={rate}', f'{node_graph.SIM}.episodes=0',
                      f'{node_graph.RECORDER}.output_dir={tmp / ("rec-" + tag)}',
                      f'{node_graph.MONITOR}.precompute_fallback='
                      f'{str(config["precompute"]).lower()}']
        if args.pass_through:
            overrides += [f'{node_graph.MONITOR}.{name}={value}'
                          for name, value in pass_through(bundle).items()]
        spec = tmp / f'onebox-{tag}.json'
        out = tmp / f'onebox-{tag}.out.json'
        spec.write_text(json.dumps({
            'overrides': overrides, 'executor': config['executor'], 'warmup': args.warmup,
            'samples': args.samples, 'timeout': 60 + 3 * (args.samples + args.warmup) / rate,
            'out': str(out), 'tree': args.baseline_tree if config['baseline'] else None}))
        log = tmp / f'onebox-{tag}.log'
        with open(log, 'w') as stream:
            code = subprocess.call([sys.executable, __file__, '--onebox', str(spec)],
                                   stdout=stream, stderr=subprocess.STDOUT,
                                   env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        if code != 0 or not out.is_file():
            raise RuntimeError(f'{config["name"]} at {rate} Hz failed; log {log}')
        child = json.loads(out.read_text())
        result['rates'][str(int(rate))] = {
            'total_ms': stats(child['wall_ms']), 'cpu_ms': stats(child['cpu_ms']),
            'lost': args.samples - child['steps'], 'fallback_share': child['fallback_share'],
            'path_cpu_ms_per_step': child['path_cpu_ms_per_step'],
            'off_path_cpu_ms_per_step': child['off_path_cpu_ms_per_step']}
    return result


def main(argv=None) -> int:
    """Run the benchmark; print and optionally save the table."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('--bundle', default=None,
                        help="bundle folder, 'paper' (untrained FISOR, paper sizes) or 'test' "
                             "(make_test_bundle's tiny FISOR); default models/fisor-ballcircle")
    parser.add_argument('--configs', nargs='+',
                        default=['single', 'events', 'events+precompute', 'events+composed'],
                        help='configurations to compare in this run, each '
                             "EXECUTOR[+precompute][+composed]: the nodes' executor ('single' = "
                             "rclpy's SingleThreadedExecutor, 'events' = EventsExecutor), whether "
                             'the monitor computes the fallback while the controller runs, and '
                             'whether controller and monitor share one process')
    parser.add_argument('--realtime-priority', type=int, default=0,
                        help='run the nodes and this process with SCHED_FIFO at this priority '
                             '(what a robot deployment does; needs CAP_SYS_NICE)')
    parser.add_argument('--pass-through', action='store_true',
                        help='monitor thresholds +1e9: every proposal passes (no fallback), '
                             'the common case of a trained policy in the feasible region')
    parser.add_argument('--rates', type=float, nargs='+', default=[50.0, 100.0])
    parser.add_argument('--samples', type=int, default=1000)
    parser.add_argument('--warmup', type=int, default=50)
    parser.add_argument('--pings', type=int, default=1000)
    parser.add_argument('--json', default=None, help='write the results here')
    parser.add_argument('--baseline-tree', default=None,
                        help="folder with another version's saferl_ros (e.g. `git archive "
                             "COMMIT | tar -x -C DIR`), run by the '+baseline' configurations")
    parser.add_argument('--echo', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--onebox', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo:
        return echo_main()
    if args.onebox:
        return onebox_main(args.onebox)
    configs = [parse_config(name) for name in args.configs]
    if any(c['baseline'] for c in configs) and not args.baseline_tree:
        parser.error('a +baseline configuration needs --baseline-tree DIR')
    os.environ.setdefault('ROS_DOMAIN_ID', str(90 + os.getpid() % 40))
    os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')

    from offline_training.machine import machine_info
    tmp = Path(tempfile.mkdtemp(prefix='bench-ros-'))
    bundle = args.bundle
    if bundle == 'paper':
        bundle = untrained_bundle('fisor', tmp)
    elif bundle == 'test':
        from offline_training.export import make_test_bundle
        bundle = str(make_test_bundle(tmp / 'test-fisor'))
    elif bundle is None:
        shipped = REPO / 'models' / 'fisor-ballcircle'
        bundle = (str(shipped) if (shipped / 'manifest.yaml').is_file()
                  else untrained_bundle('fisor', tmp))
    bundles = {'fisor': bundle}
    if any(c['drcorl'] for c in configs):
        bundles['drcorl'] = untrained_bundle('drcorl', tmp)
    observations = {kind: sim_observations(path) for kind, path in bundles.items()}
    compute = {f'{kind} {graph}': s for kind, path in bundles.items()
               for graph, s in compute_only(path, observations[kind]).items()}

    import rclpy
    rclpy.init()
    results_rt = False
    if args.realtime_priority:
        from saferl_ros.nodes.common import set_realtime_priority
        results_rt = set_realtime_priority(args.realtime_priority)
    load_before = os.getloadavg()
    results = {'machine': machine_info(), 'bundle': shown(bundle), 'samples': args.samples,
               'bundles': {kind: shown(path) for kind, path in bundles.items()},
               'loadavg_before': load_before,
               'baseline_tree': shown(args.baseline_tree) if args.baseline_tree else None,
               'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
               'pass_through': args.pass_through,
               'realtime_priority': args.realtime_priority if args.realtime_priority and
               results_rt else 0,
               'compute_ms': compute, 'configs': []}
    try:
        for config in configs:
            kind = 'drcorl' if config['drcorl'] else 'fisor'
            if config['onebox']:
                results['configs'].append(measure_onebox(config, bundles[kind], args, tmp))
            else:
                results['configs'].append(measure(config, bundles[kind], observations[kind],
                                                  args, tmp))
    finally:
        rclpy.try_shutdown()
    results['loadavg'] = os.getloadavg()
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + '\n')
    return 0


def print_results(r: dict) -> None:
    """Print one table: every configuration and rate, p99 as a ratio to the first row."""
    m = r['machine']
    load = r.get('loadavg')
    print(f'machine: {m["cpu"]}, {m["cores"]} cores, {m["platform"]}, python {m["python"]}, '
          f'onnxruntime {m["onnxruntime"]}; {r.get("date", "")}; load average (1/5/15 min) '
          f'{tuple(round(x, 2) for x in r.get("loadavg_before", ()))} before, '
          f'{tuple(round(x, 2) for x in load) if load else None} after')
    print('bundles: ' + ', '.join(f'{k} {v}' for k, v in r.get('bundles', {}).items())
          + ('  (monitor pass-through)' if r['pass_through'] else '')
          + (f'  (SCHED_FIFO {r["realtime_priority"]})' if r['realtime_priority'] else ''))

    def cells(s):
        return (f'{s.get("p50", float("nan")):.2f} | {s.get("p99", float("nan")):.2f} | '
                f'{s.get("max", float("nan")):.2f}')
    print('\n| row | rate | n | p50 [ms] | p99 [ms] | max [ms] | p99 / first row | CPU of the '
          'loop thread p50 / p99 [ms] | monitor stage p99 [ms] | fallback share |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    base = None
    for c in r['configs']:
        where = 'one process (saferl-bringup)' if c['config']['onebox'] else \
            'controller+monitor in one process' if c['config']['composed'] else \
            'separate processes'
        if c['config'].get('baseline'):
            where += ', the code of --baseline-tree'
        for rate, s in c['rates'].items():
            total = s['total_ms']
            base = base if base is not None else total.get('p99', float('nan'))
            cpu = s.get('cpu_ms')
            cpu_text = f'{cpu["p50"]:.2f} / {cpu["p99"]:.2f}' if cpu and cpu.get('n') else '-'
            stage = s.get('proposal_to_final_ms', {}).get('p99')
            print(f'| {c["config"]["name"]} ({where}) | {rate} Hz | {total.get("n", 0)} | '
                  f'{cells(total)} | {total.get("p99", float("nan")) / base:.2f} | {cpu_text} '
                  f'| {"-" if stage is None else f"{stage:.2f}"} | {s["fallback_share"]:.2f} |')
    for c in r['configs']:
        if 'pingpong_rtt_ms' in c:
            print(f'| transport floor: rclpy ping-pong round trip ({c["config"]["name"]} '
                  f'executor) | back to back | {c["pingpong_rtt_ms"].get("n", 0)} | '
                  f'{cells(c["pingpong_rtt_ms"])} | | | | |')
            break
    for name, s in r['compute_ms'].items():
        print(f'| compute only: {name} graph, in-process, back to back | | {s.get("n", 0)} | '
              f'{cells(s)} | | | | |')
    for c in r['configs']:
        for rate, s in c['rates'].items():
            if 'path_cpu_ms_per_step' not in s:
                continue
            path = sorted(s['path_cpu_ms_per_step'].items(), key=lambda kv: -kv[1])
            print(f'\n{c["config"]["name"]} at {rate} Hz: CPU time per step on the control path '
                  f'(mean over steps; the rest of the CPU p50 is executor, message taking and '
                  f'the simulator publishing): ' + ', '.join(f'{k} {v:.3f} ms' for k, v in path))
            off = sorted(s['off_path_cpu_ms_per_step'].items(), key=lambda kv: -kv[1])
            print('  off the path: ' + ', '.join(f'{k} {v:.3f} ms' for k, v in off))


if __name__ == '__main__':
    sys.exit(main())
