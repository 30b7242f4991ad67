"""
What every saferl_ros node shares: topic names, QoS, message helpers, declared parameters.

Messages (docs/architecture.md "Messages"):

- the records of the loop have types of their own, from the saferl_interfaces package of this
  repository: ``step`` is ``saferl_interfaces/StepRecord``, ``monitor/verdict`` is
  ``saferl_interfaces/MonitorVerdict``; saferl_ros.nodes.records encodes and decodes them;
- observations and actions are ``sensor_msgs/JointState``: ``name`` = channel names,
  ``position`` = values, ``header.stamp`` = the stamp of the observation the message belongs to;
- status is ``diagnostic_msgs/DiagnosticStatus`` (and ``DiagnosticArray`` on /diagnostics);
- episode events are ``std_msgs/String`` holding one JSON object.
"""

from dataclasses import dataclass
import json
import math
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)
from rclpy.signals import SignalHandlerOptions
from saferl_ros.errors import ConfigError
from sensor_msgs.msg import JointState
from std_msgs.msg import String

# Topic names, relative so that a namespace (or remapping) moves the whole graph.
OBSERVATION = 'observation'          # sim/robot adapter -> controller, monitor
PROPOSED = 'action/proposed'         # controller -> monitor
FINAL = 'action/final'               # monitor -> sim/robot adapter
STEP = 'step'                        # sim/robot adapter -> recorder: StepRecord (a transition)
EPISODE = 'episode'                  # sim/robot adapter: episode start/end events (JSON)
VERDICT = 'monitor/verdict'          # monitor -> recorder: MonitorVerdict (the decision)
STATUS = 'monitor/status'            # monitor: current state, reliable + transient local
DIAGNOSTICS = '/diagnostics'
ESTOP = 'estop'                      # operator -> robot adapter: std_msgs/Bool, true = stop
SET_ESTOP = '~/set_estop'            # robot adapter service: std_srvs/SetBool, true = stop
ODOM = 'odom'                        # robot (or a stand-in) -> robot adapter: nav_msgs/Odometry
CMD_VEL = 'cmd_vel'                  # robot adapter -> robot: geometry_msgs/Twist (or Stamped)

# docs/architecture.md "Topics, time and QoS".
SENSOR_QOS = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.BEST_EFFORT,
                        durability=DurabilityPolicy.VOLATILE)
COMMAND_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
STATUS_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Records (transitions, verdicts, episode events) must not be dropped: reliable with a queue.
RECORD_QOS = QoSProfile(depth=200, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
# The e-stop is a state, not an event: reliable and transient local, so a stop published before
# the adapter starts (or before it reconnects) still reaches it.
ESTOP_QOS = STATUS_QOS
DIAGNOSTICS_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE)


def action_names(act_dim: int) -> List[str]:
    """Return the channel names of an action vector."""
    return [f'action_{i}' for i in range(act_dim)]


def stamp_to_ns(stamp: Time) -> int:
    """Return a builtin_interfaces/Time as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """Return integer nanoseconds as builtin_interfaces/Time."""
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def joint_state(names: Sequence[str], values, stamp_ns: int, frame: str = '') -> JointState:
    """Build a named vector message stamped ``stamp_ns`` (``frame``: a real frame id or none)."""
    msg = JointState()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame
    msg.name = list(names)
    msg.position = [float(v) for v in values]
    return msg


def json_msg(value: dict) -> String:
    """Wrap a dict as a std_msgs/String holding JSON."""
    return String(data=json.dumps(value, default=float))


def diagnostic(name: str, level: int, message: str, values: Dict[str, Any],
               hardware_id: str = 'saferl_ros') -> DiagnosticStatus:
    """Build a DiagnosticStatus with string key-values."""
    status = DiagnosticStatus(level=bytes([level]), name=name, message=message,
                              hardware_id=hardware_id)
    status.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    return status


def diagnostic_array(node, statuses: List[DiagnosticStatus]) -> DiagnosticArray:
    """Wrap statuses in a DiagnosticArray stamped now."""
    array = DiagnosticArray(status=statuses)
    array.header.stamp = node.get_clock().now().to_msg()
    return array


def _fmt(value) -> str:
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else f'{value:.6g}'
    return str(value)


@dataclass
class Param:
    """One node parameter: name, default (its type is the parameter's type), description."""

    name: str
    default: Any
    description: str
    read_only: bool = False
    min_value: Optional[float] = None
    max_value: Optional[float] = None


def declare(node, params: Sequence[Param]) -> None:
    """
    Declare every parameter with a descriptor (description, type, range).

    rclpy enforces the range when a value is set (parameter file, --set, ros2 param set), so an
    out-of-range value fails the node's creation with the parameter's name and range.
    """
    for p in params:
        descriptor = ParameterDescriptor(description=p.description, read_only=p.read_only)
        bounded = p.min_value is not None or p.max_value is not None
        if bounded and isinstance(p.default, float):
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(-math.inf if p.min_value is None else p.min_value),
                to_value=float(math.inf if p.max_value is None else p.max_value), step=0.0)]
        elif bounded and isinstance(p.default, int) and not isinstance(p.default, bool):
            descriptor.integer_range = [IntegerRange(
                from_value=int(-2 ** 63 if p.min_value is None else p.min_value),
                to_value=int(2 ** 63 - 1 if p.max_value is None else p.max_value), step=1)]
        node.declare_parameter(p.name, p.default, descriptor)


def values(node, params: Sequence[Param]) -> Dict[str, Any]:
    """Return the current value of each declared parameter."""
    return {p.name: node.get_parameter(p.name).value for p in params}


def fail(node, error: Exception) -> TransitionCallbackReturn:
    """Log why a transition failed (one clear line) and return FAILURE."""
    node.get_logger().error(f'{node.get_name()}: configure failed: {error}')
    node.last_error = str(error)
    return TransitionCallbackReturn.FAILURE


def require_positive(config: Dict[str, Any], *names: str) -> None:
    """Raise ConfigError unless every named parameter is a positive finite number."""
    for name in names:
        value = config[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f'parameter {name} is {value!r}; it must be a positive number')


def optional_float(value: float) -> Optional[float]:
    """Map a NaN parameter (ROS has no None) to None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class ConfiguredEntities:
    """
    The publishers, subscriptions and timers a node creates in on_configure, for on_cleanup.

    A lifecycle node must leave cleanup as it entered configure: without this, configure ->
    cleanup -> configure would create every publisher, subscription and timer a second time and
    run every callback twice. Create them through this object; :meth:`destroy` removes them.

    Outputs that must fall silent while the node is inactive are lifecycle publishers
    (:meth:`lifecycle_publisher`): rclpy enables them when the node's on_activate reaches
    ``LifecycleNode.on_activate`` and disables them in ``LifecycleNode.on_deactivate``, so a node
    that publishes a safe stop on deactivate does so before calling ``super().on_deactivate``.
    Plain publishers (:meth:`publisher`) are for what a node reports while inactive too (status,
    diagnostics).
    """

    def __init__(self, node):
        self.node = node
        self.items: List[tuple] = []      # (destroy function, entity), in creation order

    def publisher(self, *args, **kwargs):
        """Create a publisher on the node (same arguments), remembered for destroy()."""
        return self._keep(self.node.destroy_publisher, self.node.create_publisher(*args, **kwargs))

    def lifecycle_publisher(self, *args, **kwargs):
        """Create a lifecycle publisher (silent while inactive), remembered for destroy()."""
        return self._keep(self.node.destroy_lifecycle_publisher,
                          self.node.create_lifecycle_publisher(*args, **kwargs))

    def subscription(self, *args, **kwargs):
        """Create a subscription on the node (same arguments), remembered for destroy()."""
        return self._keep(self.node.destroy_subscription,
                          self.node.create_subscription(*args, **kwargs))

    def service(self, *args, **kwargs):
        """Create a service on the node (same arguments), remembered for destroy()."""
        return self._keep(self.node.destroy_service, self.node.create_service(*args, **kwargs))

    def timer(self, *args, **kwargs):
        """Create a timer on the node (same arguments), remembered for destroy()."""
        return self._keep(self.node.destroy_timer, self.node.create_timer(*args, **kwargs))

    def _keep(self, destroy, entity):
        self.items.append((destroy, entity))
        return entity

    def destroy(self) -> None:
        """Destroy every remembered entity, newest first."""
        while self.items:
            destroy, entity = self.items.pop()
            destroy(entity)


class StopSignals:
    """
    SIGINT and SIGTERM request an orderly stop instead of raising inside a callback.

    rclpy's own handlers invalidate the context at once, so nothing can publish the safe stop or
    close the recording afterwards ("context is not valid"); a KeyboardInterrupt raised in the
    middle of a callback or a transition leaves it half done. Here a signal only sets
    ``signum``; the spin loops poll :attr:`requested` (they spin in short slices) and then
    deactivate every node while the context is still valid. Used as a context manager, the
    previous handlers come back on exit (in-process tests run several graphs).
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._saved: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Return True once SIGINT or SIGTERM arrived."""
        return self.signum is not None

    @property
    def name(self) -> Optional[str]:
        """Return the signal that arrived, as 'SIGINT' or 'SIGTERM' (None if none did)."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def exit_code(self, interrupted_work: bool = True) -> int:
        """
        Return the process exit status after an orderly stop.

        SIGTERM (a supervisor's stop) gives 0; SIGINT gives 130 (the shell's Ctrl-C status)
        when it cut work short, 0 when stopping by Ctrl-C is the documented way to end.
        """
        if self.signum == signal.SIGINT and interrupted_work:
            return 130
        return 0

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> 'StopSignals':
        """Install the handlers (only possible in the main thread; elsewhere a no-op)."""
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()


# How long one spin slice may block: the longest delay between a signal and the start of the
# orderly stop (Python runs signal handlers only between C calls).
SPIN_SLICE = 0.1


def set_realtime_priority(priority: int, logger=None) -> bool:
    """Switch this process to SCHED_FIFO at ``priority``; warn and go on if not permitted."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (PermissionError, OSError, AttributeError) as exc:
        if logger is not None:
            logger.warning(f'cannot set SCHED_FIFO priority {priority} ({exc}); running with '
                           'normal priority (grant rtprio in /etc/security/limits.conf)')
        return False


EXECUTORS = ('events', 'single')


def make_executor(kind: str = 'events'):
    """
    Return the executor that spins a node: 'events' or 'single'.

    'events' is rclpy's EventsExecutor (rclpy.experimental): middleware events go into a C++
    queue and each callback is dispatched without rebuilding a wait set, which is what Python's
    SingleThreadedExecutor ('single', the classic one) does on every spin over all of a lifecycle
    node's services, timers and subscriptions. bench/bench_ros_latency.py compares the two.
    """
    if kind == 'events':
        from rclpy.experimental import EventsExecutor
        # It calls faulthandler.enable(), which needs a sys.stderr with a file descriptor;
        # a captured stream (pytest's capsys, an embedding application) has none.
        try:
            sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            saved, sys.stderr = sys.stderr, sys.__stderr__
            try:
                return EventsExecutor()
            finally:
                sys.stderr = saved
        return EventsExecutor()
    if kind == 'single':
        return SingleThreadedExecutor()
    raise ValueError(f'unknown executor {kind!r}; choose one of {EXECUTORS}')


def _pop_option(argv: List[str], flag: str, default: str) -> str:
    """Remove ``flag VALUE`` from argv and return VALUE (or ``default``)."""
    if flag not in argv:
        return default
    i = argv.index(flag)
    if i + 1 >= len(argv):
        raise SystemExit(f'{flag} needs a value')
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def run_node(node_class, args=None, executor: str = 'single'):
    """
    Spin one lifecycle node; with --autostart configure and activate it first.

    Used by every console script: ``ros2 run`` / launch files manage the lifecycle themselves,
    a plain shell passes --autostart. ``--realtime-priority N`` runs the process with SCHED_FIFO
    priority N (needs CAP_SYS_NICE / rtprio in limits.conf, as Nav2's use_realtime_priority), so a
    loaded CPU does not delay its wake-ups. ``--executor events|single`` picks the executor
    (default: $SAFERL_EXECUTOR, else ``executor``: 'events' for the controller and the monitor,
    which sit on the control path, 'single' for the others, see make_executor). Exits non-zero
    if configure fails.
    """
    argv = list(sys.argv if args is None else args)
    autostart = '--autostart' in argv
    argv = [a for a in argv if a != '--autostart']
    priority = int(_pop_option(argv, '--realtime-priority', '0'))
    executor_kind = _pop_option(argv, '--executor', os.environ.get('SAFERL_EXECUTOR', executor))
    if executor_kind not in EXECUTORS:
        raise SystemExit(f'--executor {executor_kind}: choose one of {EXECUTORS}')
    # Our own SIGINT/SIGTERM handling (not rclpy's, which invalidates the context at once): on
    # Ctrl-C or `kill` the node is deactivated while it can still publish, so the monitor sends
    # its safe action, the adapter a zero command and the recorder closes its run.
    with StopSignals() as stop:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
        node = node_class()
        if priority:
            set_realtime_priority(priority, node.get_logger())
        executor = make_executor(executor_kind)
        executor.add_node(node)
        code = 0
        try:
            if autostart and not stop.requested:
                if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    node.get_logger().fatal(f'{node.get_name()}: configure failed; the robot '
                                            f'stays stopped: {node.last_error}')
                    code = 1
                elif not stop.requested and \
                        node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                    code = 1
            # spin_once in short slices, not spin(): the EventsExecutor's spin() of these wheels
            # busy-waits (70 % of a core while idle, measured); spin_once sleeps until an event,
            # and the slice bounds how late a stop signal is noticed.
            # A node whose work is done (sim_node after its `episodes`) sets `finished`: the
            # process then ends as after a stop signal, so a launch file can end with it.
            while code == 0 and rclpy.ok() and not stop.requested and \
                    not getattr(node, 'finished', False):
                executor.spin_once(timeout_sec=SPIN_SLICE)
        except ExternalShutdownException:
            pass
        finally:
            if stop.requested:
                node.get_logger().info(f'{stop.name}: stopping')
            try:
                if node.active:      # each node tracks its own activation (on_(de)activate)
                    node.trigger_deactivate()
                    for _ in range(5):   # let the safe stop go out
                        executor.spin_once(timeout_sec=0.01)
            except Exception as exc:  # shutting down anyway: report, do not mask the exit
                node.get_logger().error(f'deactivate on exit failed: {exc}')
            executor.remove_node(node)
            node.destroy_node()
            rclpy.try_shutdown()
    return code
