"""The saferl_interfaces messages: encode/decode round trips, state codes, MCAP schemas."""

import math
from pathlib import Path
import re

from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from saferl_interfaces.msg import MonitorVerdict, StepRecord
from saferl_ros.mcap_log import McapLog, message_definition, msg_file, SEPARATOR
from saferl_ros.monitor import MonitorState, Verdict
from saferl_ros.nodes.records import (step_from_msg, step_msg, STEP_TYPE, Transition,
                                      verdict_from_msg, verdict_msg, VERDICT_TYPE)
from saferl_ros.observation import channel_names

REPO = Path(__file__).resolve().parents[1]
CHANNELS = channel_names('BallCircle')


def transition(**changes) -> Transition:
    """Return a BallCircle transition with distinct values in every field."""
    rng = np.random.default_rng(1)
    values = {'stamp_ns': 1_700_000_000_123_456_789, 'task': 'BallCircle', 'episode': 3,
              'step': 41, 'reward': 0.25, 'cost': 1.0, 'terminated': False, 'truncated': True,
              'missed': True, 'observation_names': CHANNELS, 'observation': rng.normal(size=8),
              'next_observation': rng.normal(size=8),
              'action': np.array([0.5, -1.0], np.float32)}
    values.update(changes)
    return Transition(**values)


def assert_same_transition(got: Transition, want: Transition):
    for name in ('stamp_ns', 'task', 'episode', 'step', 'reward', 'cost', 'terminated',
                 'truncated', 'missed', 'observation_names'):
        assert getattr(got, name) == getattr(want, name), name
    for name in ('observation', 'next_observation', 'action'):
        np.testing.assert_array_equal(getattr(got, name),
                                      np.asarray(getattr(want, name), np.float64), name)
        assert getattr(got, name).dtype == np.float64


def test_step_record_round_trip_through_cdr():
    want = transition()
    data = serialize_message(step_msg(want))
    msg = deserialize_message(data, StepRecord)
    assert msg.task == 'BallCircle' and msg.header.frame_id == ''
    assert msg.step == 41 and msg.truncated
    assert msg.header.stamp.sec == 1_700_000_000 and msg.header.stamp.nanosec == 123_456_789
    assert_same_transition(step_from_msg(msg), want)


@pytest.mark.parametrize('verdict', [
    Verdict(MonitorState.INTERVENING, np.array([0.1, -0.2]), np.array([0.9, 0.8]), 12.5,
            'proposal infeasible: q_h 0.7 > 0.0', v_h=-0.3, q_h=0.7, q_c=math.nan,
            risk_final=0.25, replaced=True),
    Verdict(MonitorState.STALE, np.zeros(2), None, 12.5, 'controller silent for 0.31 s'),
])
def test_monitor_verdict_round_trip_through_cdr(verdict):
    stamp_ns = 1_700_000_000_000_000_007
    msg = deserialize_message(serialize_message(verdict_msg(verdict, stamp_ns)), MonitorVerdict)
    assert msg.state == int(verdict.state) and msg.header.frame_id == ''
    got, got_stamp = verdict_from_msg(msg)
    assert got_stamp == stamp_ns and got.stamp == pytest.approx(stamp_ns * 1e-9)
    assert got.state is verdict.state and got.reason == verdict.reason
    assert got.replaced == verdict.replaced
    for name in ('v_h', 'q_h', 'q_c', 'risk_final'):
        np.testing.assert_equal(getattr(got, name), getattr(verdict, name), name)
    np.testing.assert_array_equal(got.action, verdict.action)
    if verdict.proposed is None:
        assert got.proposed is None and len(msg.proposed) == 0
    else:
        np.testing.assert_array_equal(got.proposed, verdict.proposed)


def test_unknown_state_code_is_refused():
    msg = verdict_msg(Verdict(MonitorState.NOMINAL, np.zeros(2), np.zeros(2), 0.0), 5)
    msg.state = 9
    with pytest.raises(ValueError):
        verdict_from_msg(msg)


def test_verdict_constants_are_the_monitor_states():
    # both ways: every MonitorState is a constant of the message, and the .msg file (as
    # installed, and in the repository) defines no other state
    text = msg_file(VERDICT_TYPE).read_text()
    assert text == (REPO / 'saferl_interfaces' / 'msg' / 'MonitorVerdict.msg').read_text()
    constants = dict(re.findall(r'^uint8 ([A-Z_]+)=(\d+)', text, re.MULTILINE))
    assert {name: int(code) for name, code in constants.items()} == \
        {state.name: int(state) for state in MonitorState}
    for state in MonitorState:
        assert getattr(MonitorVerdict, state.name) == int(state)


def test_schemas_are_ros2msg_with_their_dependencies():
    for type_name in (STEP_TYPE, VERDICT_TYPE):
        text = message_definition(type_name)
        parts = text.split(SEPARATOR + '\n')
        assert parts[0] == msg_file(type_name).read_text()
        assert [p.splitlines()[0] for p in parts[1:]] == [
            'MSG: std_msgs/Header', 'MSG: builtin_interfaces/Time']
        assert 'builtin_interfaces/Time stamp' in parts[1] and 'int32 sec' in parts[2]


def test_mcap_of_records_decodes_with_mcap_ros2(tmp_path):
    want_step = transition(truncated=False)
    verdict = Verdict(MonitorState.RECOVERY, np.array([0.0, 0.3]), np.array([1.0, 1.0]), 1.0,
                      'state infeasible', v_h=0.4, q_h=0.9, q_c=2.0, risk_final=0.1,
                      replaced=True)
    log = McapLog(tmp_path / 'records.mcap')
    log.add_topic('/step', STEP_TYPE)
    log.add_topic('/monitor/verdict', VERDICT_TYPE)
    log.write('/step', serialize_message(step_msg(want_step)), 10)
    log.write('/monitor/verdict', serialize_message(verdict_msg(verdict, want_step.stamp_ns)),
              11)
    log.close()
    with open(tmp_path / 'records.mcap', 'rb') as stream:
        decoded = [(schema.name, channel.topic, msg) for schema, channel, _, msg in make_reader(
            stream, decoder_factories=[DecoderFactory()]).iter_decoded_messages()]
    assert [(name, topic) for name, topic, _ in decoded] == [
        (STEP_TYPE, '/step'), (VERDICT_TYPE, '/monitor/verdict')]
    step, judged = decoded[0][2], decoded[1][2]
    assert list(step.observation_names) == CHANNELS and step.episode == 3 and step.step == 41
    assert step.task == 'BallCircle' and step.missed and not step.truncated
    np.testing.assert_array_equal(step.observation, want_step.observation)
    np.testing.assert_array_equal(step.action, want_step.action)
    assert judged.state == MonitorState.RECOVERY and judged.reason == 'state infeasible'
    assert judged.header.stamp.sec == want_step.stamp_ns // 1_000_000_000
    assert judged.replaced and list(judged.proposed) == [1.0, 1.0]
    assert (judged.v_h, judged.q_h, judged.q_c, judged.risk_final) == (0.4, 0.9, 2.0, 0.1)
