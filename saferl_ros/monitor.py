"""
The safety monitor's rule, without ROS: pass a proposed action or replace it with a fallback.

FISOR (Zheng et al., ICLR 2024) learns a feasibility value V_h(s) and action values Q_h^j(s, a)
(j over an ensemble of heads) with the Hamilton-Jacobi reachability sign convention: h = -1 safe,
h = +M unsafe, so ``<= 0`` means feasible. The monitor applies, for observation s and proposal a
(docs/architecture.md "The safety monitor's rule"):

1. invalid input (wrong size, NaN/Inf, a stamp more than ``future_tolerance`` ahead of the
   monitor's clock) -> the configured safe action, state FAULT; an observation or proposal older
   than its timeout -> the safe action, state STALE;
2. v = V_h(s), q = max_j Q_h^j(s, a)  (the critic graph already takes the max over heads);
3. v <= thr_v and q <= thr_q -> pass a through, state NOMINAL;
4. otherwise the fallback (FISOR's infeasible-region policy: argmin over candidates of max-of-heads
   Q_h), state INTERVENING (s feasible, a not) or RECOVERY (s infeasible). The fallback searches
   more widely than the controller (``fallback_samples`` runs of the fallback graph, each with
   its own candidates, on the monitor's own noise stream) and the candidate with the lowest risk
   (max-of-heads Q_h, or Q_c) is chosen. It replaces the proposal only if it is strictly safer
   by the critic's own measure; otherwise the proposal is kept and the verdict says so
   (``replaced`` False, counted as ``kept``), so no intervention is claimed that did not happen.
   Once the fallback takes over it keeps control for at least ``min_hold`` seconds (of stamp
   time) so the command does not chatter between proposal and fallback;
5. a cost critic (Q_c(s, a), BCQ-Lag) uses q_c <= budget in place of step 3's test; a cost
   ensemble (DRCORL) the upper confidence bound q_c = mean + k std of its Q_c <= budget;
6. the monitor's bundle may differ from the controller's, so it shields any policy, also one with
   no critics of its own.

Time is the observations' stamps (seconds) plus a receive clock the caller passes in, so the same
decisions come out in a lock-step simulation, on a robot and in the unit tests.
"""

from dataclasses import dataclass, field, fields
from enum import IntEnum
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from saferl_ros.errors import ConfigError
from saferl_ros.seeding import noise_rng


class MonitorState(IntEnum):
    """Verdict of one decision; the numeric codes are what recordings store."""

    NOMINAL = 0      # proposal passed through
    INTERVENING = 1  # state feasible, proposed action not: fallback action
    RECOVERY = 2     # state infeasible: fallback (recovery) action
    STALE = 3        # observation or proposal too old, or controller silent: safe action
    FAULT = 4        # invalid input or critic output: safe action
    INACTIVE = 5     # monitor not active (lifecycle inactive, deactivated): safe action


# States in which the monitor consults its fallback.
FALLBACK_STATES = (MonitorState.INTERVENING, MonitorState.RECOVERY)

# Diagnostic levels (diagnostic_msgs/DiagnosticStatus: OK 0, WARN 1, ERROR 2) per state.
STATE_LEVEL = {MonitorState.NOMINAL: 0, MonitorState.INTERVENING: 1, MonitorState.RECOVERY: 1,
               MonitorState.STALE: 2, MonitorState.FAULT: 2, MonitorState.INACTIVE: 1}


class MonitorConfigError(ConfigError):
    """A monitor configuration that cannot be used (names the parameter and the fix)."""


@dataclass
class MonitorConfig:
    """Monitor parameters; None thresholds are read from the monitor bundle's manifest."""

    # Feasibility thresholds (FISOR: 0.0, i.e. feasible means V_h <= 0 and Q_h <= 0).
    threshold_v: Optional[float] = None
    threshold_q: Optional[float] = None
    # Cost budget for a cost critic (Q_c(s, a) <= budget).
    budget: Optional[float] = None
    # An observation older than this when the decision is made is stale [s].
    observation_timeout: float = 0.25
    # A proposal that answers an observation older than this is stale [s]; also how long the
    # monitor waits for the controller after an observation before it stops the robot.
    proposal_timeout: float = 0.25
    # An observation (or proposal) stamped more than this ahead of the monitor's clock is refused
    # (FAULT) [s]: its age would be negative, so it would pass every freshness test, and the
    # watchdog, which measures silence from the newest stamp, would stay quiet until the clock
    # caught up. The tolerance absorbs clock skew and /clock arriving just after the
    # observation it stamps (one control period of simulation time: 0.1 s on Circle tasks).
    future_tolerance: float = 0.2
    # Once the fallback takes over it keeps control at least this long [s] (anti-chattering).
    min_hold: float = 0.1
    # The action published on FAULT, STALE and INACTIVE (None: zeros, clipped into the bounds).
    safe_action: Optional[Sequence[float]] = None
    # 'bundle': the monitor bundle's fallback graph (FISOR's recovery policy); 'safe_action':
    # always the safe action. 'bundle' falls back to the safe action if the bundle has none.
    fallback: str = 'bundle'
    # Seed of the noise the diffusion fallback draws (reproducible evaluations). The monitor's
    # stream is derived from it independently of the controller's (saferl_ros.seeding).
    seed: int = 0
    # Runs of the fallback graph per observation (each with its own noise and candidates); the
    # safest result is chosen. FISOR's graph holds N = 16 candidates, so 2 runs search 32, twice
    # the controller's. Cost grows linearly (shipped bundle, one thread: 1.3 ms for 1 run, 3.0
    # for 2, 4.8 for 4), and the monitor computes it for every observation.
    fallback_samples: int = 2

    def validate(self) -> None:
        """Raise MonitorConfigError naming the first bad parameter."""
        for name in ('observation_timeout', 'proposal_timeout'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise MonitorConfigError(f'{name} is {value!r}; it must be a positive number of '
                                         'seconds (e.g. 0.25 = several control periods)')
        if not (isinstance(self.future_tolerance, (int, float))
                and math.isfinite(self.future_tolerance) and self.future_tolerance >= 0):
            raise MonitorConfigError(f'future_tolerance is {self.future_tolerance!r}; it must be '
                                     'a number of seconds >= 0 (e.g. 0.2)')
        if not (math.isfinite(self.min_hold) and self.min_hold >= 0):
            raise MonitorConfigError(f'min_hold is {self.min_hold!r}; it must be >= 0 seconds')
        if not (isinstance(self.fallback_samples, int) and 1 <= self.fallback_samples <= 256):
            raise MonitorConfigError(f'fallback_samples is {self.fallback_samples!r}; it must be '
                                     'an integer in [1, 256] (runs of the fallback graph)')
        if self.fallback not in ('bundle', 'safe_action'):
            raise MonitorConfigError(f"fallback is {self.fallback!r}; use 'bundle' (the bundle's "
                                     "recovery policy) or 'safe_action'")
        for name in ('threshold_v', 'threshold_q', 'budget'):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise MonitorConfigError(f'{name} is {value!r}; it must be a finite number, or '
                                         'unset to use the bundle manifest')


# What kind of value each MonitorConfig field takes from a command line or a YAML file.
_OPTIONAL_NUMBERS = ('threshold_v', 'threshold_q', 'budget')        # None: the manifest's
_NUMBERS = ('observation_timeout', 'proposal_timeout', 'future_tolerance', 'min_hold')


def _number(name: str, value, optional: bool = False):
    """Return ``value`` as a float (YAML reads 1e9 as a string); MonitorConfigError if not one."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    unset = ", or null for the bundle manifest's" if optional else ''
    raise MonitorConfigError(f'{name} is {value!r}; give a number{unset}')


def monitor_config(overrides: Dict[str, object]) -> MonitorConfig:
    """
    Return a validated MonitorConfig with ``overrides`` (e.g. from saferl-eval --monitor-set).

    Values are converted to the field's kind first (the numbers YAML reads as strings, one
    number for ``safe_action`` = that value on every action dimension); an unknown name or a
    value of the wrong kind raises MonitorConfigError naming it and the fix.
    """
    known = [f.name for f in fields(MonitorConfig) if f.name != 'seed']
    converted = {}
    for name, value in dict(overrides).items():
        if name not in known:
            raise MonitorConfigError(f'{name!r} is not a monitor parameter; use one of '
                                     f'{", ".join(known)}')
        if name in _OPTIONAL_NUMBERS or name in _NUMBERS:
            value = _number(name, value, optional=name in _OPTIONAL_NUMBERS)
        elif name == 'fallback_samples':
            number = _number(name, value)
            if not number.is_integer():
                raise MonitorConfigError(f'fallback_samples is {value!r}; give an integer in '
                                         '[1, 256]')
            value = int(number)
        elif name == 'fallback':
            if not isinstance(value, str):
                raise MonitorConfigError(f"fallback is {value!r}; use 'bundle' or 'safe_action'")
        elif name == 'safe_action' and value is not None:
            items = value if isinstance(value, (list, tuple)) else [value]
            if not items:
                raise MonitorConfigError('safe_action is []; give one number per action '
                                         'dimension, or one for all')
            value = [_number('safe_action', item) for item in items]
        converted[name] = value
    config = MonitorConfig(**converted)
    config.validate()
    return config


def boundary_at(critic_kind: str, value: float) -> Dict[str, float]:
    """
    Return the monitor parameters that put the boundary of a ``critic_kind`` critic at ``value``.

    Feasibility: V_h <= value and Q_h <= value; a cost critic (or its UCB): Q_c <= value. A huge
    value lets every proposal pass (a latency benchmark's pass-through).
    """
    if critic_kind not in CRITIC_RULES:
        raise MonitorConfigError(f'critic kind {critic_kind!r} has no boundary to move; the '
                                 f'monitor judges with {sorted(CRITIC_RULES)}')
    return {name: float(value) for name in CRITIC_RULES[critic_kind].parameters}


def check_applies(overrides: Dict[str, object], critic_kind: str, bundle_name: str = '?'):
    """
    Refuse monitor parameters the bundle's critic never reads (MonitorConfigError).

    A feasibility critic is judged by threshold_v and threshold_q, a cost critic by budget: a
    threshold given to the other kind would change nothing while looking like it did.
    """
    if critic_kind not in CRITIC_RULES:
        return      # no critic: the monitor refuses the bundle itself, with its own message
    used = CRITIC_RULES[critic_kind].parameters
    for rule in CRITIC_RULES.values():
        for name in rule.parameters:
            if name not in used and overrides.get(name) is not None:
                raise MonitorConfigError(
                    f'{name} does not apply to monitor bundle {bundle_name!r}: its '
                    f'{critic_kind} critic is judged by {" and ".join(used)}; set that instead')


@dataclass
class Verdict:
    """One decision: the action to apply and why."""

    state: MonitorState
    action: np.ndarray
    proposed: Optional[np.ndarray]
    stamp: float
    reason: str = ''
    v_h: float = math.nan
    q_h: float = math.nan
    q_c: float = math.nan
    # The critic's risk (max-of-heads Q_h, or Q_c) of the action actually published; NaN when
    # no critic judged it (FAULT/STALE/INACTIVE publish the safe action unjudged).
    risk_final: float = math.nan
    # True when the published action is the fallback's instead of the proposal.
    replaced: bool = False

    @property
    def passed(self) -> bool:
        """Return True if the proposal was applied unchanged."""
        return self.state == MonitorState.NOMINAL


@dataclass
class FallbackChoice:
    """The safest fallback action found for one observation, with the critic's risk of it."""

    action: np.ndarray
    risk: float


@dataclass
class MonitorCounters:
    """How many decisions ended in each state, and how long the monitor took."""

    counts: Dict[str, int] = field(default_factory=lambda: {s.name: 0 for s in MonitorState})
    decisions: int = 0
    interventions: int = 0   # runs of replaced steps started (the fallback took over)
    replaced: int = 0        # INTERVENING/RECOVERY steps whose action was replaced
    kept: int = 0            # INTERVENING/RECOVERY steps kept: no fallback was safer

    def add(self, verdict: Verdict, started_fallback: bool) -> None:
        """Count one verdict."""
        self.counts[verdict.state.name] += 1
        self.decisions += 1
        self.interventions += int(started_fallback)
        if verdict.state in FALLBACK_STATES:
            self.replaced += int(verdict.replaced)
            self.kept += int(not verdict.replaced)

    def as_dict(self) -> Dict[str, int]:
        """Return the counters as a flat dict (for diagnostics and episode summaries)."""
        return {'decisions': self.decisions, 'interventions': self.interventions,
                'replaced': self.replaced, 'kept': self.kept,
                **{k.lower(): v for k, v in self.counts.items()}}


class CriticRule:
    """
    How one critic kind judges a proposal: the monitor's rule asks it, never the kind's name.

    A rule reads its thresholds from the bundle manifest's ``critic`` section, overridden by the
    monitor configuration. :meth:`values` turns the critic graph's outputs into the values it
    judges (fields of :class:`Verdict`); ``risk_key`` names the one that measures the risk of an
    action (lower is safer); the fallback's candidates are ranked by it. A new critic kind (e.g.
    DRCORL's cost-critic ensemble) is one subclass plus one line in :data:`CRITIC_RULES`.
    """

    kind = ''
    risk_key = ''
    parameters: Tuple[str, ...] = ()   # the MonitorConfig fields that place its boundary

    def values(self, outputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Return the values judged (Verdict's v_h, q_h, q_c) from the critic's outputs."""
        return outputs

    def state_ok(self, values: Dict[str, float]) -> bool:
        """Return True if the critic calls the state feasible before looking at a fallback."""
        raise NotImplementedError

    def action_ok(self, risk: float) -> bool:
        """Return True if the proposal's risk is acceptable."""
        raise NotImplementedError

    def state_ok_given_fallback(self, state_ok: bool, action_ok: bool,
                                fallback_risk: float) -> bool:
        """Return whether the state is feasible once the fallback's risk is known."""
        return state_ok

    def state_reason(self, values: Dict[str, float]) -> str:
        """Return the verdict reason for an infeasible state."""
        return 'state infeasible'

    def describe(self) -> str:
        """Return the rule with its thresholds in force, e.g. 'V_h <= 0, Q_h <= 0'."""
        raise NotImplementedError

    def action_reason(self, risk: float) -> str:
        """Return the verdict reason for an unacceptable proposal in a feasible state."""
        raise NotImplementedError


def _threshold(override: Optional[float], critic: Dict, key: str) -> float:
    """Return the configured value if set, else the manifest's."""
    return float(override if override is not None else critic[key])


class FeasibilityRule(CriticRule):
    """FISOR's feasibility critic: V_h(s) <= threshold_v and max_j Q_h^j(s, a) <= threshold_q."""

    kind = 'feasibility'
    risk_key = 'q_h'
    parameters = ('threshold_v', 'threshold_q')

    def __init__(self, critic: Dict, config: MonitorConfig):
        self.threshold_v = _threshold(config.threshold_v, critic, 'threshold_v')
        self.threshold_q = _threshold(config.threshold_q, critic, 'threshold_q')

    def state_ok(self, values: Dict[str, float]) -> bool:
        """Return V_h(s) <= threshold_v (step 3)."""
        return values['v_h'] <= self.threshold_v

    def action_ok(self, risk: float) -> bool:
        """Return max_j Q_h^j(s, a) <= threshold_q (step 3)."""
        return risk <= self.threshold_q

    def state_reason(self, values: Dict[str, float]) -> str:
        """Name V_h and its threshold."""
        return f'state infeasible (V_h={values["v_h"]:.3g} > {self.threshold_v:g})'

    def action_reason(self, risk: float) -> str:
        """Name Q_h and its threshold."""
        return f'action infeasible (Q_h={risk:.3g} > {self.threshold_q:g})'

    def describe(self) -> str:
        """Return 'V_h <= threshold_v, Q_h <= threshold_q'."""
        return f'V_h <= {self.threshold_v:g}, Q_h <= {self.threshold_q:g}'


class CostRule(CriticRule):
    """A cost critic (BCQ-Lag, DRCORL): Q_c(s, a) <= budget; it has no state value."""

    kind = 'cost'
    risk_key = 'q_c'
    parameters = ('budget',)

    def __init__(self, critic: Dict, config: MonitorConfig):
        self.budget = _threshold(config.budget, critic, 'budget')

    def state_ok(self, values: Dict[str, float]) -> bool:
        """Return True: without V the state is judged through the fallback (see below)."""
        return True

    def action_ok(self, risk: float) -> bool:
        """Return Q_c(s, a) <= budget (step 5)."""
        return risk <= self.budget

    def state_ok_given_fallback(self, state_ok: bool, action_ok: bool,
                                fallback_risk: float) -> bool:
        """Call the state infeasible when even the fallback exceeds the budget."""
        if action_ok:
            return state_ok
        return fallback_risk <= self.budget

    def action_reason(self, risk: float) -> str:
        """Name Q_c and the budget."""
        return f'cost over budget (Q_c={risk:.3g} > {self.budget:g})'

    def describe(self) -> str:
        """Return 'Q_c <= budget'."""
        return f'Q_c <= {self.budget:g}'


class CostUCBRule(CostRule):
    """
    A cost-critic ensemble (DRCORL): Q_c^UCB = mean + k std of Q_c(s, a) <= budget.

    The critic graph returns the ensemble's ``q_c_mean`` and ``q_c_std``; k and the budget come
    from the manifest (the budget may be overridden like any cost budget). The judged q_c, the
    verdict's and the fallback ranking's, is the upper confidence bound (DRCORL, Sec. 4.2).
    """

    kind = 'cost_ucb'

    def __init__(self, critic: Dict, config: MonitorConfig):
        super().__init__(critic, config)
        self.k = float(critic['k'])
        if not (math.isfinite(self.k) and self.k >= 0):
            raise MonitorConfigError(f"the monitor bundle's critic.k is {self.k!r}; it must be a "
                                     'finite number >= 0 (re-export the bundle)')

    def values(self, outputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Return {'q_c': q_c_mean + k q_c_std}."""
        mean = np.asarray(outputs['q_c_mean'], np.float64)
        return {'q_c': mean + self.k * np.asarray(outputs['q_c_std'], np.float64)}

    def action_reason(self, risk: float) -> str:
        """Name the upper confidence bound, k and the budget."""
        return f'cost over budget (Q_c mean + {self.k:g} std = {risk:.3g} > {self.budget:g})'

    def describe(self) -> str:
        """Return 'Q_c mean + k std <= budget'."""
        return f'Q_c mean + {self.k:g} std <= {self.budget:g}'


# Critic kind (manifest critic.kind) -> the rule that judges with it.
CRITIC_RULES = {'feasibility': FeasibilityRule, 'cost': CostRule, 'cost_ucb': CostUCBRule}


def critic_rule(kind: str, critic: Dict, config: MonitorConfig, bundle_name: str = '?'
                ) -> CriticRule:
    """Return the rule of critic kind ``kind`` (MonitorConfigError if there is none)."""
    if kind not in CRITIC_RULES:
        raise MonitorConfigError(
            f'monitor bundle {bundle_name!r} has critic kind {kind!r}; the monitor judges with '
            f'{sorted(CRITIC_RULES)}')
    return CRITIC_RULES[kind](critic, config)


def _finite_vector(value, size: int) -> Optional[np.ndarray]:
    """Return ``value`` as a float32 vector of ``size`` finite entries, or None."""
    try:
        array = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None
    if array.shape != (size,) or not np.isfinite(array).all():
        return None
    return array


class SafetyMonitor:
    """
    Apply the rule to (observation, proposal) pairs with a bundle's critic and fallback.

    ``bundle`` is a :class:`saferl_ros.bundle.Bundle` (or anything with the same ``critic``,
    ``fallback``, ``critic_kind``, ``critic_config``, ``has_fallback``, ``obs_dim``, ``act_dim``,
    ``action_low``, ``action_high`` and ``sample_noise``).
    """

    def __init__(self, bundle, config: Optional[MonitorConfig] = None):
        self.bundle = bundle
        self.config = config or MonitorConfig()
        self.config.validate()
        if bundle.critic_kind == 'none':
            raise MonitorConfigError(
                f'monitor bundle {getattr(bundle, "name", "?")!r} has no critic (critic kind '
                "'none'); give the monitor a bundle with a feasibility or cost critic "
                '(monitor_bundle parameter); it may differ from the controller bundle')
        cfg = self.config
        check_applies({name: getattr(cfg, name) for name in _OPTIONAL_NUMBERS},
                      bundle.critic_kind, getattr(bundle, 'name', '?'))
        self.rule = critic_rule(bundle.critic_kind, dict(bundle.critic_config), cfg,
                                getattr(bundle, 'name', '?'))
        self.obs_dim, self.act_dim = int(bundle.obs_dim), int(bundle.act_dim)
        self.low = np.asarray(bundle.action_low, dtype=np.float32)
        self.high = np.asarray(bundle.action_high, dtype=np.float32)
        safe_action = cfg.safe_action
        if safe_action is not None and len(safe_action) == 1:
            safe_action = list(safe_action) * self.act_dim   # one value for every dimension
        safe = np.zeros(self.act_dim, np.float32) if safe_action is None else \
            _finite_vector(safe_action, self.act_dim)
        if safe is None:
            raise MonitorConfigError(
                f'safe_action is {list(cfg.safe_action)!r}; it must hold {self.act_dim} finite '
                'numbers (one per action dimension), e.g. all zeros = stop')
        if np.any(safe < self.low) or np.any(safe > self.high):
            # Refused, not clipped: a stop command the robot cannot execute as written is a
            # configuration error the user must see, not one to be silently rewritten.
            raise MonitorConfigError(
                f'safe_action {safe.tolist()} is outside the action bounds [{self.low.tolist()}, '
                f'{self.high.tolist()}] of bundle {getattr(bundle, "name", "?")!r}; give values '
                'inside them (all zeros = stop)')
        self.safe_action = safe
        self.use_bundle_fallback = cfg.fallback == 'bundle' and bundle.has_fallback
        self.rng = noise_rng(cfg.seed, 'monitor')
        self.counters = MonitorCounters()
        self.hold_until = -math.inf     # stamp until which the fallback keeps control
        self.latest_stamp = -math.inf   # newest observation stamp decided (clock-jump check)
        self.last: Optional[Verdict] = None

    @property
    def kind(self) -> str:
        """Return the critic kind of the monitor bundle ('feasibility', 'cost', 'cost_ucb')."""
        return self.rule.kind

    # -- the rule ------------------------------------------------------------------------------

    def decide(self, observation, proposed, obs_stamp: float, proposal_stamp: float,
               now: float,
               fallback: Union[FallbackChoice, Callable[[], Optional[FallbackChoice]],
                               None] = None,
               fallback_noise: Optional[np.ndarray] = None) -> Verdict:
        """
        Return the verdict for one proposal (steps 1-5 of the rule).

        ``obs_stamp`` is the observation's stamp, ``proposal_stamp`` the stamp the proposal
        carries (that of the observation it answers), ``now`` the current time on the same clock.
        ``fallback`` is the fallback choice for this observation if the caller computed it in
        advance (:meth:`fallback_for`, while the controller was still busy), or a function that
        returns it (e.g. the result of a computation still running in another thread), called
        only when the rule needs the fallback; else it is computed here when the rule needs it,
        with ``fallback_noise`` if given (:meth:`fallback_noise`, drawn when the observation
        arrived: then every way gives the same actions).
        """
        obs = _finite_vector(observation, self.obs_dim)
        if obs is None:
            return self._stop(MonitorState.FAULT, obs_stamp, proposed, _describe(
                'observation', observation, self.obs_dim))
        act = _finite_vector(proposed, self.act_dim)
        if act is None:
            return self._stop(MonitorState.FAULT, obs_stamp, proposed, _describe(
                'proposed action', proposed, self.act_dim))
        for what, stamp in (('observation', obs_stamp), ('proposal', proposal_stamp)):
            ahead = self.stamp_ahead(what, stamp, now)
            if ahead:
                return self._stop(MonitorState.FAULT, obs_stamp, act, ahead)
        age = now - obs_stamp
        if age > self.config.observation_timeout:
            return self._stop(MonitorState.STALE, obs_stamp, act,
                              f'observation is {age * 1e3:.0f} ms old (timeout '
                              f'{self.config.observation_timeout * 1e3:.0f} ms)')
        lag = now - proposal_stamp
        if lag > self.config.proposal_timeout or proposal_stamp < obs_stamp:
            return self._stop(MonitorState.STALE, obs_stamp, act,
                              f'proposal answers an observation {lag * 1e3:.0f} ms old (timeout '
                              f'{self.config.proposal_timeout * 1e3:.0f} ms)' if
                              proposal_stamp >= obs_stamp else
                              'proposal answers an older observation than the latest one')
        act = np.clip(act, self.low, self.high)
        values = self._critic(obs, act)
        if not all(math.isfinite(v) for v in values.values()):
            return self._stop(MonitorState.FAULT, obs_stamp, act, f'critic returned {values}',
                              values)
        if obs_stamp < self.latest_stamp:
            # Stamps went backwards (simulation restarted, clock jump): a hold computed on the
            # old time line means nothing on the new one.
            self.hold_until = -math.inf
        self.latest_stamp = obs_stamp
        rule = self.rule
        risk = values[rule.risk_key]
        state_ok = rule.state_ok(values)            # step 3 (feasibility) or True (cost)
        action_ok = rule.action_ok(risk)            # step 3's Q_h test or step 5's budget
        holding = obs_stamp < self.hold_until
        if state_ok and action_ok and not holding:
            return self._record(Verdict(MonitorState.NOMINAL, act, act, obs_stamp, 'feasible',
                                        risk_final=risk, **values), started=False)
        if fallback is None:
            fallback = self.fallback_for(obs, noise=fallback_noise)
        elif callable(fallback):
            fallback = fallback()
        if fallback is None:
            return self._stop(MonitorState.FAULT, obs_stamp, act,
                              'fallback policy or critic returned NaN/Inf', values)
        state_ok = rule.state_ok_given_fallback(state_ok, action_ok, fallback.risk)
        state = MonitorState.INTERVENING if state_ok else MonitorState.RECOVERY
        if state_ok and action_ok:
            reason = 'holding the fallback (min_hold)'
        elif not state_ok:
            reason = rule.state_reason(values)
        else:
            reason = rule.action_reason(risk)
        # Only a different, strictly safer action replaces the proposal. A candidate equal to the
        # proposal (both clipped to the same corner of the action box) can score a hair lower
        # from batch numerics alone; that is no replacement.
        replaced = fallback.risk < risk and not np.array_equal(fallback.action, act)
        if replaced:
            action, risk_final = fallback.action, fallback.risk
        else:
            action, risk_final = act, risk
            reason += (f'; proposal kept: the safest fallback found is no safer '
                       f'({rule.risk_key}={fallback.risk:.3g} >= {risk:.3g})')
        started = replaced and not (self.last is not None and self.last.replaced)
        if replaced and (not holding or not (state_ok and action_ok)):
            self.hold_until = obs_stamp + self.config.min_hold
        return self._record(Verdict(state, action, act, obs_stamp, reason, risk_final=risk_final,
                                    replaced=replaced, **values), started=started)

    def watchdog(self, last_obs_stamp: Optional[float], last_decided_stamp: Optional[float],
                 now: float) -> Optional[Verdict]:
        """
        Return a STALE stop if the inputs went silent, else None.

        Called periodically by the node: no observation for ``observation_timeout``, or an
        observation left unanswered by the controller for ``proposal_timeout``. The node never
        passes a stamp refused by :meth:`stamp_ahead`; one that is ahead anyway (a caller that
        did not check) gives FAULT, since silence measured from it would be negative.
        """
        if last_obs_stamp is None:
            return None  # nothing seen yet: the node publishes INACTIVE/safe until then
        ahead = self.stamp_ahead('newest observation', last_obs_stamp, now)
        if ahead:
            return self._stop(MonitorState.FAULT, last_obs_stamp, None, ahead)
        if now - last_obs_stamp > self.config.observation_timeout:
            return self._stop(MonitorState.STALE, last_obs_stamp, None,
                              f'no observation for {(now - last_obs_stamp) * 1e3:.0f} ms')
        unanswered = last_decided_stamp is None or last_decided_stamp < last_obs_stamp
        if unanswered and now - last_obs_stamp > self.config.proposal_timeout:
            return self._stop(MonitorState.STALE, last_obs_stamp, None,
                              f'controller silent: no proposal for the observation of '
                              f'{(now - last_obs_stamp) * 1e3:.0f} ms ago')
        return None

    def stamp_ahead(self, what: str, stamp: float, now: float) -> str:
        """
        Return why ``stamp`` is refused as lying in the future, or '' if it is not.

        A stamp more than ``future_tolerance`` ahead of ``now`` (the monitor's clock) has a
        negative age: it would pass every freshness test and hold the watchdog off until the
        clock caught up. The node refuses such an observation (FAULT) and never lets its stamp
        count as the newest one.
        """
        ahead = stamp - now
        if ahead > self.config.future_tolerance:
            return (f'{what} stamp is {ahead:.3f} s in the future (future_tolerance '
                    f"{self.config.future_tolerance:g} s): the sender's clock is ahead of the "
                    "monitor's; synchronise the clocks")
        return ''

    def clock_waiting(self, stamp: float, now: float, sim_time: bool) -> str:
        """
        Return why an observation must wait for the simulation clock, or '' if it need not.

        Under ``use_sim_time`` the monitor's clock reads 0 until the first /clock message. An
        observation stamped ahead of that (past ``future_tolerance``) says nothing about the
        sender's clock: it is ignored (STALE, safe action), and it never becomes the newest
        observation, so silence is measured on the simulation clock once it runs. A stamp
        within the tolerance (a lock-step simulation starts at 0) is judged as usual.
        """
        if not sim_time or now > 0.0 or not self.stamp_ahead('observation', stamp, now):
            return ''
        return (f'observation stamped {stamp:.3f} s arrived before the first /clock message '
                '(use_sim_time): ignored until the simulation clock runs')

    def clock_jumped(self, delta: Optional[float], why: str = '') -> str:
        """
        Forget the old time line after the clock jumped; return the reason to log and report.

        ``delta``: the jump [s] (negative: back, e.g. a simulation reset its /clock), None when
        the clock source changed (``why`` says how). The fallback's hold and the newest stamp
        decided belong to the old time line; the node forgets its stamps too, so silence is
        measured afresh from the next observation (until then the watchdog waits, as before the
        first one).
        """
        self.hold_until = -math.inf
        self.latest_stamp = -math.inf
        what = why or (f'clock jumped back by {-delta:.3f} s' if delta is not None and delta < 0
                       else f'clock jumped by {delta:+.3f} s' if delta is not None
                       else 'clock changed')
        return f'{what}: stamps of the old time line forgotten; no observation since'

    def stop(self, state: MonitorState, stamp: float, reason: str) -> Verdict:
        """Return (and count) a safe-action verdict, e.g. INACTIVE on deactivate."""
        return self._stop(state, stamp, None, reason)

    # -- helpers -------------------------------------------------------------------------------

    def fallback_noise(self, observation) -> Optional[np.ndarray]:
        """
        Draw the noise of one observation's fallback search from the monitor's stream.

        None (nothing drawn) without a fallback graph or for a non-finite observation, as
        :meth:`fallback_for` draws none then. A node that computes the fallback only when a
        proposal needs it draws this for every observation, so its noise stream, and thus every
        action, is the same as when it computes the fallback for every observation.
        """
        if not self.use_bundle_fallback or _finite_vector(observation, self.obs_dim) is None:
            return None
        return self.bundle.sample_noise(self.config.fallback_samples, self.rng,
                                        graph='fallback')

    def fallback_for(self, observation, noise: Optional[np.ndarray] = None
                     ) -> Optional[FallbackChoice]:
        """
        Return the safest fallback action for one observation and its risk (None if not finite).

        With the bundle's fallback graph, the graph runs ``fallback_samples`` times (one batch,
        the monitor's own noise) and the critic ranks the results; with ``fallback:
        safe_action`` the only candidate is the safe action. The node calls this when the
        observation arrives, so the fallback is ready when the proposal comes and an
        intervention adds no compute to the control path. ``noise``: from
        :meth:`fallback_noise` (drawn now if None).
        """
        obs = _finite_vector(observation, self.obs_dim)
        if obs is None:
            return None
        if self.use_bundle_fallback:
            batch = np.repeat(obs[None], self.config.fallback_samples, axis=0)
            if noise is None:
                noise = self.bundle.sample_noise(len(batch), self.rng, graph='fallback')
            actions = np.asarray(self.bundle.fallback(batch, noise=noise), np.float32)
            actions = np.clip(actions.reshape(len(batch), self.act_dim), self.low, self.high)
        else:
            batch, actions = obs[None], self.safe_action[None]
        risks = np.asarray(self.rule.values(self.bundle.critic(batch, actions))[
            self.rule.risk_key], np.float64).reshape(-1)
        usable = np.isfinite(risks) & np.isfinite(actions).all(axis=1)
        if not usable.any():
            return None
        best = int(np.argmin(np.where(usable, risks, np.inf)))
        return FallbackChoice(actions[best].copy(), float(risks[best]))

    def _critic(self, obs: np.ndarray, act: np.ndarray) -> Dict[str, float]:
        """Return the critic's outputs for one (observation, action) pair as floats."""
        values = self.rule.values(self.bundle.critic(obs[None], act[None]))
        return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in values.items()}

    def _stop(self, state, stamp, proposed, reason, values=None) -> Verdict:
        proposed = _finite_vector(proposed, self.act_dim) if proposed is not None else None
        self.hold_until = -math.inf
        return self._record(Verdict(state, self.safe_action.copy(), proposed, stamp, reason,
                                    **(values or {})), started=False)

    def _record(self, verdict: Verdict, started: bool) -> Verdict:
        self.counters.add(verdict, started)
        self.last = verdict
        return verdict


def _describe(what: str, value, size: int) -> str:
    """Say why an input vector is invalid."""
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return f'{what} is not numeric'
    if array.size != size:
        return f'{what} has {array.size} entries, expected {size}'
    bad = np.flatnonzero(~np.isfinite(array))
    return f'{what} holds NaN/Inf at index {bad.tolist()}'


def state_names() -> List[str]:
    """Return the state names in code order (index = numeric code)."""
    return [s.name for s in sorted(MonitorState)]
