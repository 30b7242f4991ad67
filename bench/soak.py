"""
Soak test of the ROS 2 loop: the simulator at 100 Hz (realtime) for a long time.

Runs the controller and the safety monitor as their own processes (console scripts, as on a
robot, so they use both cores) and the simulator plus the recorder in this process, with the
shipped FISOR bundle, and prints, with the machine:

- missed deadlines: observations not answered by a final command within the period (1 / rate_hz;
  the simulator then steps with the previous command), and steps the simulator applied the safe
  action for (no command newer than its 100 ms timeout);
- control latency (observation published -> final command seen in this process, every answered
  observation, also late ones) p50 / p99 / max;
- memory: resident set size of all three processes after a warm-up minute and at the end
  (growth in MiB and MiB/hour);
- lost rows: steps the simulator took vs rows in the recording (episodes + the partial one).

    python bench/soak.py                 # 10 minutes
    python bench/soak.py --minutes 60 --json docs/results/bench/soak-60min.json

Ctrl-C ends the run early and still prints the figures (the recording is closed first).
"""

import argparse
from array import array
import json
from pathlib import Path
import signal
import sys
import tempfile
import time

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib(pids) -> dict:
    """Return {name: resident set size in MiB} of the processes ``{name: pid}`` (Linux /proc)."""
    out = {}
    for name, pid in pids.items():
        with open(f'/proc/{pid}/status') as stream:
            for line in stream:
                if line.startswith('VmRSS:'):
                    out[name] = int(line.split()[1]) / 1024
    return out


class CommandProbe:
    """
    Times every observation -> final command pair by stamp, answered late or not.

    The simulator's own latency figure counts only commands that answer the newest observation;
    this one sees every command, so a loop that answers each observation one step late shows up
    here as latencies above the period instead of disappearing from the statistics.
    """

    def __init__(self, node, period: float):
        from saferl_ros.nodes import common
        from sensor_msgs.msg import JointState
        self.period = period
        self.sent = {}                # stamp -> monotonic time the observation was seen
        # seconds, every answered observation: 8 bytes each (a list of floats would take 32 and
        # show up in the memory figures as growth of the bench itself)
        self.latencies = array('d')
        self.unanswered = 0           # observations with no command within 1 s
        node.create_subscription(JointState, common.OBSERVATION, self._on_observation,
                                 common.SENSOR_QOS)
        node.create_subscription(JointState, common.FINAL, self._on_final, common.RECORD_QOS)

    def _on_observation(self, msg):
        from saferl_ros.nodes.common import stamp_to_ns
        now = time.monotonic()
        self.sent[stamp_to_ns(msg.header.stamp)] = now
        if len(self.sent) > 200:          # bounded: what waited > 1 s is unanswered
            for stamp in [k for k, t in self.sent.items() if now - t > 1.0]:
                del self.sent[stamp]
                self.unanswered += 1

    def _on_final(self, msg):
        from saferl_ros.nodes.common import stamp_to_ns
        sent = self.sent.pop(stamp_to_ns(msg.header.stamp), None)
        if sent is not None:
            self.latencies.append(time.monotonic() - sent)


def steps_taken(sim) -> int:
    """Return how many steps the sim node took (finished episodes + the one in progress)."""
    return sum(e['steps'] for e in sim.episode_summaries) + (sim.sim.steps if sim.sim else 0)


def soak_nodes(bundle: str, rate_hz: float, output_dir: str) -> dict:
    """Return the node parameters of the soak graph."""
    from saferl_ros import graph
    return {
        graph.SIM: {'task': 'BallCircle', 'mode': 'realtime', 'rate_hz': rate_hz,
                    'command_timeout': 0.1, 'min_subscribers': 2, 'wait_for_recorder': True},
        graph.RECORDER: {'task': 'BallCircle', 'output_dir': output_dir, 'run_name': 'soak',
                         'bundle': bundle, 'monitor_bundle': bundle},
    }


def main(argv=None) -> int:
    """Run the soak and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
    parser.add_argument('--minutes', type=float, default=10.0)
    parser.add_argument('--rate', type=float, default=100.0, help='simulator rate [Hz]')
    parser.add_argument('--bundle', default=str(REPO / 'models' / 'fisor-ballcircle'))
    parser.add_argument('--output', default=None, help='recording folder (default: a temp dir)')
    parser.add_argument('--json', default=None, help='also write the figures to this file')
    args = parser.parse_args(argv)

    from offline_training.machine import machine_info
    from saferl_ros import graph as node_graph
    from saferl_ros.bringup import Graph
    from saferl_ros.nodes.common import StopSignals
    from saferl_ros.recorder import read_index

    output = args.output or tempfile.mkdtemp(prefix='saferl-soak-')
    period = 1.0 / args.rate
    from bench_ros_latency import start    # the latency bench's node starter (same folder)
    bundle = ['-p', f'bundle:={args.bundle}']
    procs = [start(node_graph.CONTROLLER, bundle, Path(output) / 'controller.log'),
             start(node_graph.MONITOR, bundle, Path(output) / 'monitor.log')]
    pids = {'sim+recorder': 'self', 'controller': procs[0].pid, 'monitor': procs[1].pid}
    with StopSignals() as stop:
        graph = Graph(soak_nodes(args.bundle, args.rate, output))
        try:
            errors = graph.configure()
            if errors:
                print('configure failed:', errors, file=sys.stderr)
                return 1
            from rclpy.node import Node
            probe_node = Node('soak_probe')
            probe = CommandProbe(probe_node, period)
            graph.executor.add_node(probe_node)
            graph.activate()
            sim = graph.nodes[node_graph.SIM]
            start = time.monotonic()
            end = start + args.minutes * 60
            rss = [(0.0, rss_mib(pids))]
            next_sample = start + 60.0
            while time.monotonic() < end and not stop.requested:
                graph.executor.spin_once(timeout_sec=0.05)
                if time.monotonic() >= next_sample:
                    rss.append((time.monotonic() - start, rss_mib(pids)))
                    next_sample += 60.0
                    print(f'{rss[-1][0] / 60:5.1f} min: {steps_taken(sim)} steps, RSS '
                          f'{sum(rss[-1][1].values()):.1f} MiB ' + ', '.join(
                              f'{k} {v:.1f}' for k, v in rss[-1][1].items()), flush=True)
            elapsed = time.monotonic() - start
            rss.append((elapsed, rss_mib(pids)))
            graph.deactivate()
            steps = steps_taken(sim)
            graph.executor.remove_node(probe_node)
            probe_node.destroy_node()
        finally:
            graph.shutdown()
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                proc.wait(30)
    index = read_index(Path(output) / 'soak')
    rows = sum(e['steps'] for e in index['episodes'])
    import numpy as np
    answered = np.asarray(probe.latencies) * 1e3
    late = int((answered > period * 1e3).sum())
    unanswered = probe.unanswered + len(probe.sent)
    lat = {'p50_ms': float(np.percentile(answered, 50)), 'p99_ms': float(np.percentile(
        answered, 99)), 'max_ms': float(answered.max())} if answered.size else \
        {'p50_ms': float('nan'), 'p99_ms': float('nan'), 'max_ms': float('nan')}
    warm = rss[1][1] if len(rss) > 2 else rss[0][1]
    hours = max(elapsed - (rss[1][0] if len(rss) > 2 else 0.0), 1e-9) / 3600
    growth = {k: rss[-1][1][k] - warm[k] for k in warm}
    figures = {
        'machine': machine_info(), 'minutes': elapsed / 60, 'rate_hz': args.rate,
        'steps': steps, 'achieved_rate_hz': steps / elapsed,
        'missed_deadlines': late + unanswered, 'late_commands': late,
        'unanswered_observations': unanswered, 'stale_command_steps': sim.misses,
        'latency_ms': lat, 'answered': int(answered.size),
        'rss_mib': {'start': rss[0][1], 'after_warmup': warm, 'end': rss[-1][1],
                    'growth_after_warmup': growth,
                    'growth_per_hour': {k: v / hours for k, v in growth.items()},
                    'samples': rss},
        'rows_recorded': rows, 'rows_lost': steps - rows,
        'stopped_by_signal': stop.requested,
    }
    m = figures['machine']
    print(f'machine: {m["cpu"]}, {m["cores"]} cores, {m["platform"]}')
    print(f'soak: {figures["minutes"]:.1f} min at {args.rate:g} Hz: {steps} steps '
          f'({figures["achieved_rate_hz"]:.1f} Hz achieved)')
    print(f'missed deadlines: {figures["missed_deadlines"]} of {answered.size + unanswered} '
          f'observations ({late} answered later than the {period * 1e3:.0f} ms period, '
          f'{unanswered} never answered); {sim.misses} steps applied the safe action (no '
          'command newer than 100 ms)')
    print(f'latency observation -> final command, every answered observation: p50 '
          f'{lat["p50_ms"]:.2f} ms, p99 {lat["p99_ms"]:.2f} ms, max {lat["max_ms"]:.2f} ms')
    r = figures['rss_mib']
    for name in r['end']:
        print(f'RSS {name}: {r["after_warmup"][name]:.1f} MiB after warm-up, '
              f'{r["end"][name]:.1f} at the end ({r["growth_after_warmup"][name]:+.1f} MiB, '
              f'{r["growth_per_hour"][name]:+.1f} MiB/hour)')
    print(f'rows: {steps} steps, {rows} recorded, {steps - rows} lost '
          f'(recording: {Path(output) / "soak"})')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
