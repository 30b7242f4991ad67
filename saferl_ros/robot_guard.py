"""
The robot adapter's last line of defence: which velocity command may go out, and why not.

The monitor judges actions; this guard sits behind it, on the robot side, and holds the robot at
zero whatever the monitor sends when the adapter itself cannot vouch for the command:

1. **e-stop** engaged by any input (a latched std_msgs/Bool topic, a std_srvs/SetBool service,
   or the start-up latch): zero until every input that engaged it has released it explicitly
   (a release never comes from a timeout, nor from a reconfiguration: a new guard takes over
   the stops of the one it replaces). Each input releases only its own stop; the start-up latch
   is released by the first explicit release from any input.
2. **no odometry**: none yet, or none for ``odometry_timeout`` seconds (the pose the fence and
   the observation need is unknown).
3. **clock**: the newest odometry was refused because its stamp went backwards or disagrees with
   the adapter's clock by more than ``max_stamp_skew`` (a jumped robot clock): its observation
   would be stamped wrongly downstream, so nothing moves until a stamp agrees again (a refused
   message never updates the pose).
4. **timeout**: no final action for ``command_timeout`` seconds.
5. otherwise the action's command within the speed limits, cut by the hard fence if it points
   out of it (state GEOFENCE), else DRIVING.

Freshness is measured on the caller's monotonic clock (seconds), never with the stamps, so a
clock jump cannot make old odometry or an old action look fresh. ROS-free (numpy only): the
node passes times and messages in and publishes what :meth:`RobotGuard.decide` returns.
"""

from dataclasses import dataclass
import math
from typing import Iterable, Optional, Set, Tuple

import numpy as np
from saferl_ros.robot_adapter import RobotConfigError, RobotState, RobotTask

# States, most severe first, and their diagnostic levels (DiagnosticStatus OK 0, WARN 1,
# ERROR 2).
ESTOP = 'ESTOP'
NO_ODOMETRY = 'NO_ODOMETRY'
CLOCK = 'CLOCK'
TIMEOUT = 'TIMEOUT'
GEOFENCE = 'GEOFENCE'
DRIVING = 'DRIVING'
INACTIVE = 'INACTIVE'
LEVEL = {ESTOP: 2, NO_ODOMETRY: 2, CLOCK: 2, TIMEOUT: 1, GEOFENCE: 1, DRIVING: 0, INACTIVE: 1}
HOLDS = (ESTOP, NO_ODOMETRY, CLOCK, TIMEOUT)     # states whose command is a hold at zero
# States whose command the adapter re-sends at every watchdog tick, not only per final action:
# the holds, and the fence cut (the robot may reach the fence between two final actions, when
# the last command sent was still the uncut one).
RESENT = HOLDS + (GEOFENCE,)
STARTUP = 'start-up'                 # the e-stop input that engage_at_start stands for
ZERO = (0.0, 0.0, 0.0)


@dataclass
class GuardConfig:
    """Time limits and the e-stop default of the guard."""

    command_timeout: float = 0.5     # no final action for this long -> zero [s]
    odometry_timeout: float = 0.5    # no accepted odometry for this long -> zero [s]
    max_stamp_skew: float = 1.0      # |receive time - odometry stamp| above this: refused [s]
    estop_at_start: bool = True      # the e-stop is engaged until explicitly released

    def validate(self) -> None:
        """Raise RobotConfigError naming the first bad parameter."""
        for name in ('command_timeout', 'odometry_timeout'):
            value = getattr(self, name)
            # finite: a robot that never stops when commands or odometry stop is not an option
            if not (math.isfinite(value) and value > 0):
                raise RobotConfigError(f'{name} is {value!r}; it must be a positive, finite '
                                       'number of seconds (e.g. 0.5)')
        if not (self.max_stamp_skew > 0):      # inf allowed: no clock check
            raise RobotConfigError(f'max_stamp_skew is {self.max_stamp_skew!r}; it must be a '
                                   'positive number of seconds (inf: no clock check)')


@dataclass
class Decision:
    """What goes out now: the command, the action it applies and why."""

    command: Tuple[float, float, float]    # body-frame (v_forward, v_left, yaw_rate)
    action: np.ndarray                     # the applied action (zero when held at zero)
    state: str
    reason: str

    @property
    def level(self) -> int:
        """Return the diagnostic level of the state."""
        return LEVEL[self.state]

    @property
    def resent(self) -> bool:
        """Return True if the command goes out at every watchdog tick, not once per action."""
        return self.state in RESENT


class RobotGuard:
    """E-stop, odometry freshness and clock, command timeout and the hard fence."""

    def __init__(self, task: RobotTask, config: GuardConfig, act_dim: int = 2,
                 estops: Iterable[str] = ()):
        """
        Start with the e-stop engaged by ``estops`` (and the start-up latch if configured).

        ``estops``: the inputs that held the e-stop in a guard this one replaces (a node's
        cleanup and configure): only an explicit release clears a stop, never a reconfiguration.
        """
        config.validate()
        self.task = task
        self.config = config
        self.act_dim = act_dim
        self.estops: Set[str] = set(estops) | ({STARTUP} if config.estop_at_start else set())
        self.counts = {'estop_engaged': 0, 'estop_released': 0, 'odometry_refused': 0,
                       'timeouts': 0, 'fence_cuts': 0}
        self.reset()

    def reset(self) -> None:
        """Forget odometry and actions (on activation); the e-stop and the counts stay."""
        self.state: Optional[RobotState] = None
        self.odometry_at = -math.inf          # monotonic time of the last accepted odometry
        self.received_at = -math.inf          # monotonic time of the last odometry, refused or not
        self.last_stamp_ns: Optional[int] = None   # newest odometry stamp seen
        self.clock_fault = ''                 # why the newest odometry was refused ('' if not)
        self.action = np.zeros(self.act_dim, np.float32)
        self.action_at = -math.inf            # monotonic time of the last final action
        self.last_state = INACTIVE

    # Inputs

    def odometry(self, state: RobotState, stamp_ns: int, now_ns: int, mono: float) -> str:
        """
        Take one odometry message; return '' if accepted, else why it was refused.

        ``stamp_ns``: its header stamp; ``now_ns``: the adapter's clock when it arrived;
        ``mono``: the monotonic time it arrived. Refused: a stamp not newer than the newest seen
        (backwards: reordered or a clock reset) or more than ``max_stamp_skew`` away from
        ``now_ns``. A refused message leaves the pose as it was and holds the robot at zero
        until a message is accepted.
        """
        skew = (now_ns - stamp_ns) * 1e-9
        self.received_at = mono
        previous, self.last_stamp_ns = self.last_stamp_ns, stamp_ns
        if previous is not None and stamp_ns <= previous:
            why = f'odometry stamp went back {(previous - stamp_ns) * 1e-9:.3f} s'
        elif abs(skew) > self.config.max_stamp_skew:
            why = (f'odometry stamp {-skew:+.3f} s from the adapter clock '
                   f'(max_stamp_skew {self.config.max_stamp_skew:g} s)')
        else:
            self.clock_fault = ''
            self.state, self.odometry_at = state, mono
            return ''
        self.clock_fault = why
        self.counts['odometry_refused'] += 1
        return why

    def final_action(self, action, mono: float) -> bool:
        """Take the monitor's final action; return False (and forget it) if malformed."""
        action = np.asarray(action, np.float32).reshape(-1)
        if action.shape != (self.act_dim,) or not np.isfinite(action).all():
            self.action, self.action_at = np.zeros(self.act_dim, np.float32), -math.inf
            return False
        self.action, self.action_at = np.clip(action, -1.0, 1.0), mono
        return True

    def estop(self, engaged: bool, source: str) -> bool:
        """
        Engage or release the e-stop from input ``source``; return whether it changed state.

        A release clears ``source``'s own stop and the start-up latch; a stop engaged by
        another input stays engaged.
        """
        before = self.engaged
        if engaged:
            self.estops.add(source)
        else:
            self.estops.discard(source)
            self.estops.discard(STARTUP)
        if self.engaged != before:
            self.counts['estop_engaged' if engaged else 'estop_released'] += 1
        return self.engaged != before

    @property
    def engaged(self) -> bool:
        """Return True while the e-stop holds the robot."""
        return bool(self.estops)

    def estop_reason(self) -> str:
        """Return 'e-stop engaged by <inputs>' (the diagnostics reason while engaged)."""
        return 'e-stop engaged by ' + ', '.join(sorted(self.estops))

    # Output

    def decide(self, mono: float) -> Decision:
        """Return the command to send now and the state that explains it."""
        decision = self._decide(mono)
        if decision.state != self.last_state:
            if decision.state == TIMEOUT and self.last_state in (DRIVING, GEOFENCE):
                self.counts['timeouts'] += 1      # commands stopped while driving
            elif decision.state == GEOFENCE:
                self.counts['fence_cuts'] += 1
            self.last_state = decision.state
        return decision

    def _decide(self, mono: float) -> Decision:
        if self.engaged:
            return self._zero(ESTOP, self.estop_reason())
        heard = mono - self.received_at      # any odometry, refused or not
        if math.isinf(heard):
            return self._zero(NO_ODOMETRY, 'no odometry yet')
        if heard > self.config.odometry_timeout:
            return self._zero(NO_ODOMETRY, f'no odometry for {heard:.2f} s')
        if self.clock_fault:                 # the newest odometry was refused
            return self._zero(CLOCK, self.clock_fault)
        silent = mono - self.action_at
        if silent > self.config.command_timeout:
            return self._zero(TIMEOUT, 'no final action' if math.isinf(silent)
                              else f'no final action for {silent:.2f} s')
        command, cut = self.task.fence_limit(self.task.command(self.action, self.state),
                                             self.state)
        if cut:
            # The recorded action is the one the cut command applies (what the robot did),
            # not the policy's: retraining on the uncut one would teach motion that never was.
            applied = self.task.action_from_command(*command, self.state)
            return Decision(command, applied, GEOFENCE,
                            f'fence at |x| {self.task.fence[0]:g} m, |y| '
                            f'{self.task.fence[1]:g} m: outward motion cut')
        return Decision(command, self.action, DRIVING, 'driving')

    def _zero(self, state: str, reason: str) -> Decision:
        return Decision(ZERO, np.zeros(self.act_dim, np.float32), state, reason)
