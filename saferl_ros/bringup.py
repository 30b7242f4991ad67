"""
saferl-bringup: start the node graph of a ROS 2 parameters file in one process.

``ros2 launch`` exists only with a ROS 2 distro. This entry point reads the same parameter files
the launch files pass to their nodes (``config/*.yaml``, standard ``node_name: ros__parameters:``
layout), creates the nodes named there in one process, spins them on an rclpy executor and drives
their lifecycle transitions: configure every node (any failure stops here, nothing is activated,
the robot stays stopped), activate recorder -> monitor -> controller -> source (sim or robot
adapter, so every consumer is listening before the first observation), and on exit deactivate in
the reverse order (the monitor's deactivate publishes the safe action; the recorder's closes and
consolidates the run).

Example::

    saferl-bringup config/demo.yaml --episodes 3
    saferl-bringup config/sim.yaml --set controller_node.bundle=models/mine --duration 60
"""

import argparse
import json
import math
import re
import sys
import time
from typing import Dict, List, Optional

from saferl_ros import graph as node_graph
from saferl_ros.errors import (
    EXIT_USER_ERROR, load_yaml, MAX_YAML_BYTES, StrictSafeLoader, UserError, yaml_problem)
from saferl_ros.files import read_regular_file
import yaml

# Activation order (saferl_ros.graph): consumers first, the observation source last.
NODE_ORDER = node_graph.START_ORDER


def node_classes() -> Dict[str, type]:
    """Return {node name: class} of every node the bringup knows."""
    return {spec.name: spec.load() for spec in node_graph.NODES}


class BringupError(UserError, RuntimeError):
    """A parameters file or override that cannot be used."""


class _ParameterLoader(StrictSafeLoader):
    """
    YAML as ROS 2 reads parameter files: ``1.0e9`` and ``1e-3`` are numbers.

    PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent, so ``1.0e9``
    would arrive as the string '1.0e9' (and fail the node's type check with a confusing
    message), while rcl's parser, which ``ros2 launch`` uses for the same file, reads a double.
    Like every YAML reader of this project it refuses anchors and aliases (StrictSafeLoader).
    """


_ParameterLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?'
               r'|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)'
               r'|\.[0-9_]+(?:[eE][-+]?[0-9]+)?'
               r'|[-+]?\.(?:inf|Inf|INF)'
               r'|\.(?:nan|NaN|NAN))$'),
    list('-+0123456789.'))


def parse_value(text: str):
    """Parse one parameter value as ROS 2 parameter files do (``1.0e9`` is a float)."""
    return load_yaml(text, _ParameterLoader)


def load_parameters(path) -> Dict[str, dict]:
    """
    Read a ROS 2 parameters file into {node name: {parameter: value}}.

    Accepts ``/node:`` and ``node:`` keys and merges ``/**`` (all nodes) entries into each node.
    Raises BringupError naming the file and what to fix for anything else (an empty file, a
    list or scalar at the top level, a node without ``ros__parameters``).
    """
    layout = '`node_name: {ros__parameters: {param: value}}` (see config/sim.yaml)'
    try:
        raw = load_yaml(read_regular_file(path, MAX_YAML_BYTES, f'write {layout}').decode('utf-8'),
                        _ParameterLoader)
    except UserError as exc:
        raise BringupError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise BringupError(f'{path}: cannot read the parameters file (not UTF-8 text: '
                           f'{exc.reason} at byte {exc.start})') from None
    except yaml.YAMLError as exc:
        raise BringupError(f'{path}: cannot read the parameters file (not valid YAML: '
                           f'{yaml_problem(exc)})') from None
    if raw is None:
        raise BringupError(f'{path}: the parameters file is empty; it must name the nodes to '
                           f'start, as {layout}')
    if not isinstance(raw, dict):
        raise BringupError(f'{path}: the top level is a {type(raw).__name__}, not a mapping of '
                           f'node names; write {layout}')
    common_entry = raw.get('/**') or {}
    common = common_entry.get('ros__parameters') if isinstance(common_entry, dict) else None
    if '/**' in raw and not isinstance(common, dict):
        raise BringupError(f"{path}: entry '/**' has no ros__parameters mapping; write {layout}")
    nodes = {}
    for key, body in raw.items():
        if key == '/**':
            continue
        params = body.get('ros__parameters') if isinstance(body, dict) else None
        if not isinstance(params, dict):
            raise BringupError(f'{path}: entry {key!r} has no ros__parameters mapping; write '
                               f'{layout}')
        nodes[str(key).strip('/')] = {**(common or {}), **params}
    if not nodes:
        raise BringupError(f'{path}: names no node; write {layout}')
    return nodes


def apply_overrides(nodes: Dict[str, dict], overrides: List[str]) -> None:
    """Apply ``node.param=value`` strings (value parsed as YAML) in place."""
    for item in overrides:
        key, sep, text = item.partition('=')
        node, dot, param = key.partition('.')
        if not sep or not dot:
            raise BringupError(f'--set {item!r}: expected NODE.PARAM=VALUE, e.g. '
                               'controller_node.bundle=models/fisor-ballcircle')
        nodes.setdefault(node, {})[param] = parse_value(text)


def parameter_overrides(node_class, params: dict):
    """Return rclpy Parameters for ``params``, coerced to the node's declared types."""
    from rclpy.parameter import Parameter
    module = sys.modules[node_class.__module__]
    declared = {p.name: p for p in module.PARAMS}
    out = []
    for name, value in params.items():
        if name in ('use_sim_time',):
            out.append(Parameter(name, value=value))
            continue
        if name not in declared:
            raise BringupError(f'{node_class.__name__}: unknown parameter {name!r}; known: '
                               f'{sorted(declared)} (see docs/ros.md)')
        default = declared[name].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, list) and isinstance(value, list) and default and \
                isinstance(default[0], float):
            value = [float(v) for v in value]
        if isinstance(default, float) and value is None:
            value = math.nan
        out.append(Parameter(name, value=value))
    return out


class Graph:
    """The nodes of one parameters file in one process."""

    def __init__(self, nodes: Dict[str, dict], namespace: str = '', executor: str = 'events'):
        import rclpy

        from saferl_ros.nodes.common import make_executor
        classes = node_classes()
        unknown = sorted(set(nodes) - set(classes))
        if unknown:
            raise BringupError(f'unknown node(s) {unknown} in the parameters file; known: '
                               f'{sorted(classes)}')
        if not rclpy.ok():
            # No rclpy signal handlers: they would invalidate the context on Ctrl-C before the
            # nodes can publish the safe stop and close the recording (StopSignals does it).
            from rclpy.signals import SignalHandlerOptions
            rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        self.executor = make_executor(executor)
        self.nodes = {}
        for name in NODE_ORDER:
            if name in nodes:
                overrides = parameter_overrides(classes[name], nodes[name])
                try:
                    node = classes[name](name, namespace=namespace,
                                         parameter_overrides=overrides)
                except Exception as exc:  # rclpy's parameter type/range exceptions
                    self.shutdown()
                    raise BringupError(f'{name}: {exc}') from exc
                self.nodes[name] = node
                self.executor.add_node(node)

    def configure(self) -> List[str]:
        """Configure every node; return the errors of those that failed."""
        from rclpy.lifecycle import TransitionCallbackReturn
        errors = []
        for name, node in self.nodes.items():
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                errors.append(f'{name}: {node.last_error}')
        return errors

    def activate(self) -> None:
        """Activate in NODE_ORDER (consumers first, the observation source last)."""
        for node in self.nodes.values():
            node.trigger_activate()

    def deactivate(self) -> None:
        """Deactivate the source first and the recorder last (after the last steps arrived)."""
        active = [n for n in reversed(list(self.nodes.values())) if n.active]
        recorder = self.nodes.get(node_graph.RECORDER)
        for node in active:
            if node is not recorder:
                node.trigger_deactivate()
        # Let the last messages (final steps, the monitor's safe stop) reach the recorder: spin
        # until nothing new has arrived for 0.3 s (at most 3 s).
        start = last_change = time.monotonic()
        seen = None
        while time.monotonic() - last_change < 0.3 and time.monotonic() - start < 3.0:
            self.executor.spin_once(timeout_sec=0.02)
            count = recorder.received if recorder is not None else 0
            if count != seen:
                seen, last_change = count, time.monotonic()
        if recorder in active:
            recorder.trigger_deactivate()

    def spin_until(self, done, timeout: Optional[float]) -> bool:
        """Spin until ``done()`` or ``timeout`` seconds; return whether done() became true."""
        from saferl_ros.nodes.common import SPIN_SLICE
        start = time.monotonic()
        while not done():
            if timeout is not None and time.monotonic() - start > timeout:
                return False
            self.executor.spin_once(timeout_sec=SPIN_SLICE)
        return True

    def remove(self, name: str, drain: float = 0.1) -> None:
        """
        Take node ``name`` out of the running graph and destroy it (as if its process died).

        rclpy's EventsExecutor keeps dispatching a node's subscriptions after ``remove_node``,
        and runs events it queued before ``destroy_node``: a callback of a destroyed node then
        raises InvalidHandle on its first publish (measured with these wheels). So the node's
        subscriptions and timers go first, the executor spins ``drain`` seconds (what was still
        queued runs while the node's publishers are valid), then the node is destroyed.
        """
        node = self.nodes.pop(name)
        for subscription in list(node.subscriptions):
            node.destroy_subscription(subscription)
        for timer in list(node.timers):
            node.destroy_timer(timer)
        self.executor.remove_node(node)
        end = time.monotonic() + drain
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.01)
        node.destroy_node()

    def shutdown(self) -> None:
        """Destroy the nodes and shut rclpy down."""
        import rclpy
        for node in self.nodes.values():
            self.executor.remove_node(node)
            node.destroy_node()
        rclpy.try_shutdown()


def summarize(graph: Graph) -> dict:
    """Collect per-episode results from the sim, monitor and recorder nodes."""
    sim = graph.nodes.get(node_graph.SIM)
    rec = graph.nodes.get(node_graph.RECORDER)
    mon = graph.nodes.get(node_graph.MONITOR)
    episodes = [dict(e) for e in (sim.episode_summaries if sim else [])]
    recorded = {}
    if rec is not None and rec.writer is not None:
        recorded = {e['episode']: e for e in rec.writer.index['episodes']}
    for e in episodes:
        e['fallback_steps'] = recorded.get(e['episode'], {}).get('fallback_steps')
    latency = sim.latency.summary() if sim else {}
    # The loop's CPU time on this thread: only the loop's compute when it all spins here.
    shared = node_graph.CONTROLLER in graph.nodes and node_graph.MONITOR in graph.nodes
    return {'episodes': episodes, 'latency': latency,
            'latency_cpu': sim.cpu_latency.summary() if sim and shared else {},
            'monitor': mon.monitor.counters.as_dict() if mon and mon.monitor else None,
            'recording': str(rec.last_output) if rec and rec.last_output else None,
            'run_dir': rec.run_dir if rec and rec.writer else None}


def print_summary(summary: dict, out=sys.stdout) -> None:
    """Print the per-episode table and the totals."""
    print(f'{"episode":>7} {"steps":>5} {"reward":>9} {"cost":>6} {"R_norm":>7} '
          f'{"C_norm(k=10)":>12} {"fallback":>8} {"missed":>6} {"lat p50":>8} {"lat p99":>8}',
          file=out)
    for e in summary['episodes']:
        lat = e.get('latency') or {}
        print(f'{e["episode"]:>7} {e["steps"]:>5} {e["reward"]:>9.2f} {e["cost"]:>6.0f} '
              f'{e.get("normalized_reward", math.nan):>7.3f} '
              f'{e.get("normalized_cost_kappa10", math.nan):>12.2f} '
              f'{e["fallback_steps"] if e["fallback_steps"] is not None else "-":>8} '
              f'{e["missed"]:>6} {lat.get("p50_ms", math.nan):>6.2f}ms '
              f'{lat.get("p99_ms", math.nan):>6.2f}ms', file=out)
    lat = summary['latency'] or {}
    if lat and not lat.get('count'):
        print('control latency: no control step completed', file=out)
    elif lat:
        print(f'control latency (observation published -> final command at the sim) over '
              f'{lat["count"]} steps: p50 {lat["p50_ms"]:.2f} ms, p99 {lat["p99_ms"]:.2f} ms, '
              f'max {lat["max_ms"]:.2f} ms', file=out)
    cpu = summary.get('latency_cpu') or {}
    if cpu.get('count'):
        print(f"  of it CPU time of the loop's thread (its compute; independent of other load): "
              f'p50 {cpu["p50_ms"]:.2f} ms, p99 {cpu["p99_ms"]:.2f} ms, max {cpu["max_ms"]:.2f} '
              'ms', file=out)
    if summary['monitor']:
        print(f'monitor: {json.dumps(summary["monitor"])}', file=out)
    if summary['recording']:
        print(f'recording: {summary["recording"]}  (check: saferl-data validate '
              f'{summary["recording"]})', file=out)


def run(config, episodes: Optional[int] = None, overrides: Optional[List[str]] = None,
        duration: Optional[float] = None, namespace: str = '', quiet: bool = False,
        executor: str = 'events') -> dict:
    """
    Bring the graph of ``config`` up, run it, bring it down; return the summary.

    ``episodes`` overrides sim_node.episodes and ends the run when they are done; ``duration``
    [s] ends it otherwise. ``executor``: 'events' or 'single' (saferl_ros.nodes.common
    .make_executor). Raises BringupError if a node fails to configure.
    """
    from saferl_ros.nodes.common import StopSignals
    nodes = load_parameters(config)
    apply_overrides(nodes, list(overrides or []))
    if episodes is not None:
        if node_graph.SIM not in nodes:
            raise BringupError(f'{config}: --episodes counts simulator episodes, but the file '
                               'starts no sim_node; use --duration (or Ctrl-C) to end the run')
        if episodes < 1:
            raise BringupError(f'--episodes {episodes}: give at least 1')
        nodes[node_graph.SIM]['episodes'] = int(episodes)
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise BringupError(f'--duration {duration}: give a positive number of seconds')
    with StopSignals() as stop:
        graph = Graph(nodes, namespace=namespace, executor=executor)
        try:
            errors = graph.configure()
            if errors:
                raise BringupError('configure failed, nothing was activated (the robot stays '
                                   'stopped):\n  ' + '\n  '.join(errors))
            sim = graph.nodes.get(node_graph.SIM)
            finite = sim is not None and sim.cfg['episodes'] > 0
            if not stop.requested:
                graph.activate()
                graph.spin_until(lambda: stop.requested or (finite and sim.done), duration)
            # Orderly stop, also after SIGINT/SIGTERM: the context is still valid, so the
            # monitor publishes its safe action and the recorder closes every file.
            graph.deactivate()
            summary = summarize(graph)
        finally:
            graph.shutdown()
    summary['stopped_by'] = stop.name
    summary['exit_code'] = stop.exit_code(interrupted_work=finite or duration is not None)
    if not quiet:
        if stop.requested:
            print(f'saferl-bringup: stopped by {summary["stopped_by"]}; every node deactivated, '
                  'the recording closed', file=sys.stderr)
        print_summary(summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(prog='saferl-bringup',
                                     description=__doc__.strip().split('\n')[0])
    parser.add_argument('config', help='ROS 2 parameters file, e.g. config/demo.yaml')
    parser.add_argument('--episodes', type=int, help='run this many sim episodes, then stop')
    parser.add_argument('--duration', type=float, help='stop after this many seconds')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='NODE.PARAM=VALUE', help='override a parameter (repeatable)')
    parser.add_argument('--namespace', default='', help='ROS namespace for every node')
    # 'events' by default: the SingleThreadedExecutor rebuilds its wait set over every entity of
    # every node (lifecycle and parameter services included) for each callback it runs, the
    # largest CPU cost of the one-process loop (docs/ros.md "Latency"). A node taken out while
    # the graph keeps spinning goes through Graph.remove (the EventsExecutor's queued events).
    parser.add_argument('--executor', default='events', choices=('events', 'single'),
                        help="rclpy executor: 'events' (EventsExecutor, default: no wait-set "
                             "rebuild per callback) or 'single' (SingleThreadedExecutor)")
    return parser


def main(argv=None) -> int:
    """Console script saferl-bringup."""
    args = build_parser().parse_args(argv)
    if args.episodes is None and args.duration is None:
        print('saferl-bringup: running until Ctrl-C (use --episodes or --duration to stop '
              'automatically)', file=sys.stderr)
    try:
        summary = run(args.config, args.episodes, args.overrides, args.duration,
                      args.namespace, executor=args.executor)
    except BringupError as exc:
        print(f'saferl-bringup: error: {exc}', file=sys.stderr)
        return EXIT_USER_ERROR
    return summary['exit_code']


if __name__ == '__main__':
    sys.exit(main())
