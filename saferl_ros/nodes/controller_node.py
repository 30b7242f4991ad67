"""
controller_node: the policy of a model bundle, one proposed action per observation.

configure loads and verifies the bundle (checksums, dimensions, golden outputs) and checks the
bundle's observation channels against the task's; a mismatch fails the transition with a message
that says which channel differs. Every observation message must name its channels in exactly
that order: a reordered or foreign observation is refused (no proposal; the monitor then stops
the robot), never acted on. The proposal carries the observation's stamp.
"""

import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from saferl_ros import graph
from saferl_ros.nodes.common import (action_names, COMMAND_QOS, ConfiguredEntities, declare,
                                     diagnostic, diagnostic_array, DIAGNOSTICS, DIAGNOSTICS_QOS,
                                     fail, joint_state, OBSERVATION, Param, PROPOSED, run_node,
                                     SENSOR_QOS, stamp_to_ns, values)
from saferl_ros.observation import channel_names, check_channels, ObservationError
from saferl_ros.paths import resolve_path
from saferl_ros.policy_runner import LatencyStats, PolicyInputError, PolicyRunner
from sensor_msgs.msg import JointState

PARAMS = [
    Param('bundle', '', 'Model bundle folder whose policy runs: package://saferl_ros/models/'
          '<name>, an absolute path, or relative (current folder, else the package share).'),
    Param('task', '', 'Task whose observation layout the robot publishes (default: the '
          "bundle's task); configure fails if the bundle expects other channels."),
    Param('seed', 0, 'Seed of the policy noise (diffusion policies), for reproducible runs.'),
    Param('verify_golden', True, 'Check the ONNX graphs against golden.npz at configure.'),
    Param('diagnostics_period', 1.0, 'Publish latency diagnostics this often [s].',
          min_value=0.0),
]


class ControllerNode(LifecycleNode):
    """Run the bundle's policy on each observation."""

    def __init__(self, name: str = graph.CONTROLLER, **kwargs):
        super().__init__(name, **kwargs)
        declare(self, PARAMS)
        self.entities = ConfiguredEntities(self)   # created in configure, gone in cleanup
        self.runner: Optional[PolicyRunner] = None
        self.active = False            # set by on_activate, cleared by on_deactivate
        self.last_error = ''
        self.refused = 0
        self.proposals = 0
        # Set by configure:
        self.cfg: Dict[str, Any] = {}
        self.bundle = None
        self.channels: List[str] = []
        self.act_names: List[str] = []
        self.pub = None                # proposals: a lifecycle publisher, silent while inactive
        self.diag_pub = None           # diagnostics: also while inactive
        self.loop_latency = LatencyStats()

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Load + verify the bundle, check the channels, warm the policy up."""
        from saferl_ros.bundle import load_bundle
        try:
            cfg = values(self, PARAMS)
            if not cfg['bundle']:
                raise ValueError('parameter bundle is empty; set it to a bundle folder, e.g. '
                                 'models/fisor-ballcircle')
            bundle = load_bundle(resolve_path(cfg['bundle'], 'parameter bundle'),
                                 verify_golden=cfg['verify_golden'])
            self.channels = channel_names(cfg['task'] or bundle.task_name)
            check_channels(self.channels, bundle.obs_channels, source=f'bundle {bundle.name}')
            self.runner = PolicyRunner(bundle, self.channels, seed=cfg['seed'])
        except Exception as exc:  # BundleError, ObservationError, bad parameters
            return fail(self, exc)
        self.cfg = cfg
        self.bundle = bundle
        self.act_names = action_names(bundle.act_dim)
        self.pub = self.entities.lifecycle_publisher(JointState, PROPOSED, COMMAND_QOS)
        self.diag_pub = self.entities.publisher(type(diagnostic_array(self, [])), DIAGNOSTICS,
                                                DIAGNOSTICS_QOS)
        self.entities.subscription(JointState, OBSERVATION, self._on_observation, SENSOR_QOS)
        self.loop_latency = LatencyStats()
        if cfg['diagnostics_period'] > 0:
            self.entities.timer(cfg['diagnostics_period'], self._publish_diagnostics)
        self.get_logger().info(f'configured {bundle!r} (sha256 {bundle.sha256[:12]})')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Start proposing actions."""
        self.active = True
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop proposing (the monitor then holds the robot in its safe action)."""
        self.active = False
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Drop the bundle and everything configure created."""
        self.entities.destroy()
        self.runner = self.bundle = self.pub = self.diag_pub = None
        return TransitionCallbackReturn.SUCCESS

    def _on_observation(self, msg: JointState):
        received = time.perf_counter()
        if not self.active:
            return
        if list(msg.name) != self.channels:
            self.refused += 1
            try:
                check_channels(self.channels, msg.name, source='incoming')
            except ObservationError as exc:
                self.get_logger().error(str(exc), throttle_duration_sec=2.0)
            return
        try:
            action = self.runner.act(np.asarray(msg.position, np.float32))
        except PolicyInputError as exc:
            self.refused += 1
            self.get_logger().error(f'no proposal: {exc}', throttle_duration_sec=2.0)
            return
        stamp = stamp_to_ns(msg.header.stamp)
        self.pub.publish(joint_state(self.act_names, action, stamp))
        self.proposals += 1
        self.loop_latency.add(time.perf_counter() - received)

    def _publish_diagnostics(self):
        policy = self.runner.latency.summary() if self.runner else {}
        loop = self.loop_latency.summary()
        status = diagnostic(
            f'{self.get_name()}: policy', 0 if self.refused == 0 else 1,
            'active' if self.active else 'inactive',
            {'bundle': self.bundle.name, 'bundle_sha256': self.bundle.sha256,
             'proposals': self.proposals, 'refused_observations': self.refused,
             'policy_p50_ms': policy.get('p50_ms', float('nan')),
             'policy_p99_ms': policy.get('p99_ms', float('nan')),
             # receive -> publish inside this node, on the steady clock: stamps may be
             # simulation time (use_sim_time), where a stamp difference means nothing
             'receive_to_proposal_p50_ms': loop['p50_ms'],
             'receive_to_proposal_p99_ms': loop['p99_ms']})
        self.diag_pub.publish(diagnostic_array(self, [status]))


def main(args=None):
    """Console script: controller_node [--autostart] [--ros-args -p bundle:=DIR ...]."""
    sys.exit(run_node(ControllerNode, args, executor='events'))   # on the control path


if __name__ == '__main__':
    main()
