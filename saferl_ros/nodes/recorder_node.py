"""
recorder_node: every rollout becomes DSRL-format offline data (and optionally an MCAP bag).

Each ``step`` message (one DSRL transition, from sim_node or robot_adapter_node) is joined by
stamp with the monitor's verdict for the same observation (proposed action, state, critic values)
and handed to :class:`saferl_ros.recorder.RecordingWriter`, which commits every finished episode
atomically: a crash or kill loses at most the episode in progress. activate starts a run folder,
deactivate closes it (the partial episode is kept as a truncation) and consolidates the run into
``recording.hdf5``. With ``mcap: true`` the raw topics are also written, byte for byte, to
``<run>/raw/episode_<k>.mcap`` with ROS 2 schema names, one file per episode (finished when
the raw copy of the episode's last step message is written, so a killed recorder loses only the
open one), and ``ros2 bag play`` replays each.

A run folder that already exists and is not empty is refused: configure (when ``run_name`` names
it) or activate (e.g. a second activation with the same ``run_name``) fails with one line naming
the folder, before any step is received. A step with NaN or Inf in its observation, next
observation, action, reward or cost is dropped, never written (one such value makes the whole
run fail ``saferl-data validate`` and ``merge``): a throttled warning names the fields, the
steps before it are committed as a truncated episode (index entry ``cut: non-finite``), the steps
after it start the next one, and ``dropped_non_finite`` counts the drops.
"""

from collections import OrderedDict
import sys
import time
from typing import Any, Dict, List, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.serialization import deserialize_message
from saferl_interfaces.msg import MonitorVerdict, StepRecord
from saferl_ros import graph
from saferl_ros.monitor import Verdict
from saferl_ros.nodes.common import (COMMAND_QOS, ConfiguredEntities, declare, DIAGNOSTICS,
                                     DIAGNOSTICS_QOS, EPISODE, fail, FINAL, OBSERVATION, Param,
                                     PROPOSED, RECORD_QOS, run_node, SENSOR_QOS,
                                     STATUS, STATUS_QOS, STEP, values, VERDICT)
from saferl_ros.nodes.records import (step_from_msg, STEP_TYPE, Transition, verdict_from_msg,
                                      VERDICT_TYPE)
from saferl_ros.observation import channel_names
from saferl_ros.paths import resolve_path
from saferl_ros.recorder import (check_new_run_dir, check_output_dir, new_run_dir,
                                 non_finite_fields, RecordingError, RecordingWriter, Step)
from sensor_msgs.msg import JointState
from std_msgs.msg import String

PARAMS = [
    Param('task', 'BallCircle', 'Task of the recorded data (DSRL name).'),
    Param('output_dir', 'recordings', 'Folder that receives one run folder per activation. '
          'Created if needed; one that cannot be written fails configure (and activate) in '
          'one line, before anything moves.'),
    Param('run_name', '', "Run folder name (default: 'run_<UTC time>')."),
    Param('bundle', '', "Controller bundle folder; its manifest's sha256 is stored."),
    Param('monitor_bundle', '', "Monitor bundle folder; its manifest's sha256 is stored."),
    Param('join_timeout', 0.5, 'Wait this long for the verdict of a step before writing it '
          'without one [s].', min_value=0.0),
    Param('mcap', False, 'Also write the raw topics to <run>/raw/episode_<k>.mcap, one file per '
          'episode (ros2 bag compatible).'),
    Param('consolidate', True, 'On deactivate, write all episodes into <run>/recording.hdf5.'),
]

# Topics written to MCAP: (topic, message class, type name, QoS).
MCAP_TOPICS = [
    (OBSERVATION, JointState, 'sensor_msgs/msg/JointState', SENSOR_QOS),
    (PROPOSED, JointState, 'sensor_msgs/msg/JointState', COMMAND_QOS),
    (FINAL, JointState, 'sensor_msgs/msg/JointState', COMMAND_QOS),
    (STEP, StepRecord, STEP_TYPE, RECORD_QOS),
    (VERDICT, MonitorVerdict, VERDICT_TYPE, RECORD_QOS),
    (EPISODE, String, 'std_msgs/msg/String', RECORD_QOS),
    (STATUS, DiagnosticStatus, 'diagnostic_msgs/msg/DiagnosticStatus', STATUS_QOS),
    (DIAGNOSTICS, DiagnosticArray, 'diagnostic_msgs/msg/DiagnosticArray', DIAGNOSTICS_QOS),
    ('odom', Odometry, 'nav_msgs/msg/Odometry', SENSOR_QOS),
    ('cmd_vel', Twist, 'geometry_msgs/msg/Twist', COMMAND_QOS),
]


def _qos_yaml(qos) -> str:
    """Describe a QoS profile the way rosbag2 stores offered_qos_profiles."""
    return (f'- history: {int(qos.history)}\n  depth: {qos.depth}\n'
            f'  reliability: {int(qos.reliability)}\n  durability: {int(qos.durability)}\n'
            '  deadline:\n    sec: 0\n    nsec: 0\n  lifespan:\n    sec: 0\n    nsec: 0\n'
            '  liveliness: 1\n  liveliness_lease_duration:\n    sec: 0\n    nsec: 0\n'
            '  avoid_ros_namespace_conventions: false\n')


class RecorderNode(LifecycleNode):
    """Write the loop's transitions as DSRL data, episode by episode."""

    def __init__(self, name: str = graph.RECORDER, **kwargs):
        super().__init__(name, **kwargs)
        declare(self, PARAMS)
        self.entities = ConfiguredEntities(self)   # created in configure, gone in cleanup
        self.writer: Optional[RecordingWriter] = None
        self.mcap = None
        self.active = False            # set by on_activate, cleared by on_deactivate
        self.last_error = ''
        self.run_dirs: List[str] = []
        self.received = 0
        self.dropped_non_finite = 0    # steps refused for NaN/Inf (never written)
        self.last_output = None
        # Set by configure:
        self.cfg: Dict[str, Any] = {}
        self.channels: List[str] = []
        self.obs_dim = 0
        self.hashes: Dict[str, str] = {}
        self.pending: List[tuple] = []           # steps waiting for their verdict
        self.verdicts: 'OrderedDict[int, Verdict]' = OrderedDict()
        # Set by activate (the run being written):
        self.run_dir: Optional[str] = None
        self.act_dim: Optional[int] = None
        self.episode: Optional[int] = None
        self.raw_episode: Optional[int] = None   # episode of the steps in the open MCAP file

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Validate the parameters and hash the bundles; subscribe."""
        from saferl_ros.bundle import MANIFEST, read_bundle_file
        try:
            cfg = values(self, PARAMS)
            channels = channel_names(cfg['task'])
            hashes = {}
            for key in ('bundle', 'monitor_bundle'):
                if cfg[key]:
                    folder = resolve_path(cfg[key], f'parameter {key}').resolve()
                    # the bundle layer's reader: a symlinked or oversized manifest is refused
                    hashes[f'{key}_sha256'], _ = read_bundle_file(
                        folder, MANIFEST, f'parameter {key} must name a bundle folder',
                        keep=False)
                    hashes[f'{key}_path'] = cfg[key]
            check_output_dir(cfg['output_dir'])
            if cfg['run_name']:
                check_new_run_dir(f'{cfg["output_dir"]}/{cfg["run_name"]}')
        except Exception as exc:  # unknown task, unreadable bundle manifest, run folder in use
            return fail(self, exc)
        self.cfg, self.channels, self.hashes = cfg, channels, hashes
        self.obs_dim = len(channels)
        self.pending.clear()
        self.verdicts.clear()
        self.entities.timer(0.05, self._flush)
        if cfg['mcap']:
            # One subscription per topic feeds both formats (_on_raw decodes steps and verdicts
            # for the HDF5 path): DDS matches two subscriptions to one topic separately, so at
            # start-up one of them could get steps the other missed, and an episode's MCAP file
            # would hold fewer steps than its HDF5 file.
            for topic, cls, type_name, qos in MCAP_TOPICS:
                self.entities.subscription(
                    cls, topic, lambda data, t=topic: self._on_raw(t, data), qos, raw=True)
        else:
            self.entities.subscription(StepRecord, STEP, self._on_step, RECORD_QOS)
            self.entities.subscription(MonitorVerdict, VERDICT, self._on_verdict, RECORD_QOS)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Open a new run folder."""
        from saferl_ros.mcap_log import McapSeries
        root = self.cfg['output_dir']
        run_dir = (f'{root}/{self.cfg["run_name"]}' if self.cfg['run_name']
                   else str(new_run_dir(root)))
        try:
            # both checked at configure too; the folder may be gone or in use by now
            check_output_dir(root)
            check_new_run_dir(run_dir)
        except RecordingError as exc:
            # Refused here, not on the first step (inside a callback: the run would be lost).
            self.get_logger().error(f'{self.get_name()}: activate failed: {exc}')
            self.last_error = str(exc)
            return TransitionCallbackReturn.FAILURE
        self.act_dim = None
        self.episode = None
        self.run_dir = run_dir
        self.raw_episode = None
        self.writer = None
        self.dropped_non_finite = 0
        if self.cfg['mcap']:
            self.mcap = McapSeries(f'{run_dir}/raw',
                                   metadata={'task': self.cfg['task'], **self.hashes})
            for topic, _, type_name, qos in MCAP_TOPICS:
                self.mcap.add_topic(self.resolve_topic_name(topic), type_name, _qos_yaml(qos))
        self.active = True
        self.get_logger().info(f'recording to {run_dir}')
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Write what is pending, keep the partial episode, consolidate the run."""
        self.active = False
        self._flush(force=True)
        if self.writer is not None:
            self.last_output = self.writer.close(consolidate_run=self.cfg['consolidate'])
            self.run_dirs.append(self.run_dir)
            dropped = (f', {self.dropped_non_finite} steps with NaN/Inf dropped'
                       if self.dropped_non_finite else '')
            self.get_logger().info(f'closed {self.run_dir} ({len(self.writer.index["episodes"])}'
                                   f' episodes{dropped}) -> {self.last_output}')
        if self.mcap is not None:
            self.mcap.close()
            self.mcap = None
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Destroy what configure created (subscriptions, the flush timer)."""
        self.entities.destroy()
        self.pending.clear()
        self.verdicts.clear()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        """Close the run if still active."""
        if self.active:
            self.on_deactivate(state)
        return TransitionCallbackReturn.SUCCESS

    # -- joining -------------------------------------------------------------------------------

    def _on_raw(self, topic: str, data: bytes):
        if not (self.active and self.mcap is not None):
            return
        step = None
        if topic == STEP:
            step = deserialize_message(data, StepRecord)
            if self.raw_episode is not None and step.episode != self.raw_episode:
                self.mcap.rotate()          # the episode was cut short (no terminal step seen)
            self.raw_episode = step.episode
        self.mcap.write(self.resolve_topic_name(topic), data, self.get_clock().now().nanoseconds)
        if step is not None and (step.terminated or step.truncated):
            # Episode boundaries come from the step stream as it arrives, not from the HDF5
            # path's commit, which waits for the episode's verdicts (up to join_timeout) while
            # the next episode's first steps arrive. Messages of other topics near a boundary
            # may fall in either file (DDS does not order topics against each other).
            self.mcap.rotate()
            self.raw_episode = None
        if step is not None:
            self._on_step(step)
        elif topic == VERDICT:
            self._on_verdict(deserialize_message(data, MonitorVerdict))

    def _on_verdict(self, msg: MonitorVerdict):
        if not self.active:
            return
        try:
            verdict, stamp = verdict_from_msg(msg)
        except ValueError as exc:       # a state code this recorder does not know
            self.get_logger().error(f'ignoring verdict: {exc}', throttle_duration_sec=5.0)
            return
        # The first verdict for an observation decided the applied action; later ones for the
        # same stamp (watchdog repeats) are not what was applied to it.
        self.verdicts.setdefault(stamp, verdict)
        while len(self.verdicts) > 2000:
            self.verdicts.popitem(last=False)
        self._flush()

    def _on_step(self, msg: StepRecord):
        if not self.active:
            return
        self.received += 1
        self.pending.append((step_from_msg(msg), time.monotonic()))
        self._flush()

    def _flush(self, force: bool = False):
        now = time.monotonic()
        while self.pending:
            transition, received = self.pending[0]
            if not force and transition.stamp_ns not in self.verdicts and \
                    now - received < self.cfg['join_timeout']:
                return
            self.pending.pop(0)
            self._write(transition, self.verdicts.pop(transition.stamp_ns, None))

    def _write(self, t: Transition, verdict: Optional[Verdict]):
        obs_dim = self.obs_dim
        # Every step names its observation channels: one of another task (or in another order)
        # is refused, not written under this task's names.
        if t.observation_names != self.channels or len(t.observation) != obs_dim or \
                len(t.next_observation) != obs_dim or len(t.action) == 0 or \
                (self.act_dim is not None and len(t.action) != self.act_dim):
            self.get_logger().error(
                f'step message does not carry {self.cfg["task"]} observations and '
                f'{self.act_dim or "an"} action values ({t.observation_names[:3]}..., '
                f'{len(t.action)} action values); check the recorder task parameter',
                throttle_duration_sec=5.0)
            return
        bad = non_finite_fields(t)
        if bad:
            self._drop_non_finite(t, bad)
            return
        if self.writer is None:
            try:
                self.writer = RecordingWriter(self.run_dir, self.cfg['task'], obs_dim,
                                              len(t.action), attrs=dict(self.hashes))
            except (RecordingError, OSError) as exc:
                # e.g. another process took the folder after activate: a line, not a traceback
                self.get_logger().error(f'cannot record step {t.step} of episode {t.episode}: '
                                        f'{exc}', throttle_duration_sec=5.0)
                return
            self.act_dim = len(t.action)
        if self.episode is not None and t.episode != self.episode and self.writer.steps:
            self._end_episode(terminal=False, timeout=True, info={'cut': True})
        self.episode = t.episode
        step = Step(observation=t.observation, next_observation=t.next_observation,
                    action=t.action, reward=t.reward, cost=t.cost, stamp_ns=t.stamp_ns,
                    missed=t.missed)
        if verdict is not None:
            step.verdict = int(verdict.state)
            step.v_h, step.q_h, step.q_c = verdict.v_h, verdict.q_h, verdict.q_c
            step.risk_final = verdict.risk_final
            step.replaced = verdict.replaced
            step.proposed = verdict.proposed
        self.writer.add(step)
        if t.terminated or t.truncated:
            missed = int(sum(s.missed for s in self.writer.steps))
            self._end_episode(terminal=t.terminated, timeout=t.truncated,
                              info={'missed': missed})

    def _drop_non_finite(self, t: Transition, fields: List[str]):
        """
        Drop a step with NaN/Inf: never written, and the episode is cut there.

        Dropping it alone would leave a gap (next_observations[t] != observations[t + 1]),
        which validation refuses too; so the steps before it are committed as a truncated
        episode and those after it start a new one (also when the dropped step ended the
        episode: its terminal flag is lost with it, and the truncation says so honestly).
        """
        self.dropped_non_finite += 1
        self.get_logger().warning(
            f'dropped step {t.step} of episode {t.episode} (stamp {t.stamp_ns}): '
            f'{", ".join(fields)} hold NaN or Inf; the episode is cut there '
            f'({self.dropped_non_finite} dropped in this run)', throttle_duration_sec=5.0)
        if self.writer is not None and self.writer.steps:
            self._end_episode(terminal=False, timeout=True,
                              info={'cut': 'non-finite', 'non_finite': fields})
        self.episode = t.episode

    def _end_episode(self, **kwargs):
        """Commit the episode (HDF5)."""
        self.writer.end_episode(**kwargs)


def read_mcap(path) -> Dict[str, list]:
    """
    Return {topic: [decoded message, ...]} of an MCAP file written by this node.

    Decoded by mcap-ros2-support from the schemas stored in the file (as any MCAP tool reads
    it, without the ROS message packages): each message is an object with the message's
    fields as attributes.
    """
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory
    out: Dict[str, list] = {}
    with open(path, 'rb') as stream:
        reader = make_reader(stream, decoder_factories=[DecoderFactory()])
        for _, channel, _, decoded in reader.iter_decoded_messages():
            out.setdefault(channel.topic, []).append(decoded)
    return out


def main(args=None):
    """Console script: recorder_node [--autostart] [--ros-args -p output_dir:=DIR ...]."""
    sys.exit(run_node(RecorderNode, args))


if __name__ == '__main__':
    main()
