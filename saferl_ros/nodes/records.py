"""
The records of the loop as messages: encode and decode ``step`` and ``monitor/verdict``.

One place converts between the Python values the nodes work with and the saferl_interfaces
messages (docs/architecture.md "Messages"):

- ``step`` (saferl_interfaces/msg/StepRecord): one DSRL transition, a :class:`Transition`;
  sim_node and robot_adapter_node encode it (:func:`step_msg`), recorder_node decodes it
  (:func:`step_from_msg`);
- ``monitor/verdict`` (saferl_interfaces/msg/MonitorVerdict): one
  :class:`saferl_ros.monitor.Verdict` and the stamp of the observation it decides;
  safety_monitor_node encodes it (:func:`verdict_msg`), recorder_node decodes it
  (:func:`verdict_from_msg`).

Both stamps are the stamp of the observation the record belongs to, in integer nanoseconds.
The encoders convert every value to its field's type themselves (numpy scalars and float32
arrays included): the generated classes check types only when ROS_PYTHON_CHECK_FIELDS=1.
"""

import array
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
from saferl_interfaces.msg import MonitorVerdict, StepRecord
from saferl_ros.monitor import MonitorState, Verdict
from saferl_ros.nodes.common import ns_to_stamp, stamp_to_ns

STEP_TYPE = 'saferl_interfaces/msg/StepRecord'
VERDICT_TYPE = 'saferl_interfaces/msg/MonitorVerdict'


def _doubles(values) -> array.array:
    """Return values as the array.array('d') that rclpy keeps float64[] fields in."""
    return array.array('d', np.asarray(values, np.float64).ravel().tobytes())


def _vector(values) -> np.ndarray:
    return np.array(values, np.float64)


@dataclass
class Transition:
    """One environment transition as published on ``step``; see StepRecord.msg for units."""

    stamp_ns: int                     # stamp of observation s
    task: str                         # DSRL task name
    episode: int
    step: int                         # steps taken in the episode, this one included
    reward: float
    cost: float
    terminated: bool
    truncated: bool
    missed: bool                      # no command in time: the safe action was applied
    observation_names: List[str] = field(default_factory=list)
    observation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    next_observation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    action: np.ndarray = field(default_factory=lambda: np.zeros(0))   # the applied action


def step_msg(t: Transition) -> StepRecord:
    """Encode a transition as a StepRecord message."""
    msg = StepRecord()
    msg.header.stamp = ns_to_stamp(t.stamp_ns)
    msg.task = str(t.task)
    msg.episode = int(t.episode)
    msg.step = int(t.step)
    msg.reward = float(t.reward)
    msg.cost = float(t.cost)
    msg.terminated = bool(t.terminated)
    msg.truncated = bool(t.truncated)
    msg.missed = bool(t.missed)
    msg.observation_names = [str(n) for n in t.observation_names]
    msg.observation = _doubles(t.observation)
    msg.next_observation = _doubles(t.next_observation)
    msg.action = _doubles(t.action)
    return msg


def step_from_msg(msg: StepRecord) -> Transition:
    """Decode a StepRecord message (arrays become float64 numpy arrays)."""
    return Transition(stamp_ns=stamp_to_ns(msg.header.stamp), task=msg.task,
                      episode=int(msg.episode), step=int(msg.step), reward=float(msg.reward),
                      cost=float(msg.cost), terminated=bool(msg.terminated),
                      truncated=bool(msg.truncated), missed=bool(msg.missed),
                      observation_names=list(msg.observation_names),
                      observation=_vector(msg.observation),
                      next_observation=_vector(msg.next_observation),
                      action=_vector(msg.action))


def verdict_msg(verdict: Verdict, stamp_ns: int) -> MonitorVerdict:
    """Encode a monitor verdict for the observation stamped ``stamp_ns``."""
    msg = MonitorVerdict()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.state = int(verdict.state)
    msg.v_h = float(verdict.v_h)
    msg.q_h = float(verdict.q_h)
    msg.q_c = float(verdict.q_c)
    msg.risk_final = float(verdict.risk_final)
    msg.replaced = bool(verdict.replaced)
    msg.proposed = _doubles([] if verdict.proposed is None else verdict.proposed)
    msg.action = _doubles(verdict.action)
    msg.reason = str(verdict.reason)
    return msg


def verdict_from_msg(msg: MonitorVerdict) -> Tuple[Verdict, int]:
    """
    Decode a MonitorVerdict message: return the verdict and its stamp in nanoseconds.

    ``Verdict.stamp`` is the same stamp in seconds; an empty ``proposed`` becomes None. A state
    code that is not a :class:`MonitorState` raises ValueError.
    """
    stamp_ns = stamp_to_ns(msg.header.stamp)
    proposed = _vector(msg.proposed) if len(msg.proposed) else None
    return Verdict(state=MonitorState(msg.state), action=_vector(msg.action), proposed=proposed,
                   stamp=stamp_ns * 1e-9, reason=msg.reason, v_h=msg.v_h, q_h=msg.q_h,
                   q_c=msg.q_c, risk_final=msg.risk_final,
                   replaced=bool(msg.replaced)), stamp_ns
