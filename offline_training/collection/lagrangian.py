"""
Lagrange multiplier for the episode-cost constraint, and the annealed cost budget.

Constrained RL maximises ``J_r(pi)`` subject to ``J_c(pi) <= d``; the Lagrangian relaxation
optimises ``J_r - lambda * J_c`` and moves ``lambda >= 0`` against the constraint violation
``J_c - d`` (dual ascent). DSRL's behaviour agents (FSRL's TRPO-Lagrangian) use the PID form of
Stooke, Achiam and Abbeel (2020), "Responsive Safety in RL by PID Lagrangian Methods", which adds
a proportional and a derivative term to the integral (plain dual ascent is the pure-I case).
"""

from dataclasses import dataclass, field


@dataclass
class PIDLagrangian:
    """
    PID Lagrange multiplier (Stooke et al. 2020, Algorithm 2).

    Defaults are FSRL's gains ``(K_p, K_i, K_d) = (0.05, 0.005, 0.1)`` that DSRL's
    ``train_trpol_expert.py`` uses, with costs measured as undiscounted episode cost.
    ``kp = kd = 0`` gives plain dual (sub)gradient ascent with step ``ki``.
    """

    kp: float = 0.05
    ki: float = 0.005
    kd: float = 0.1
    # Exponential smoothing of the cost used by the P and D terms (Algorithm 2's alpha_p, alpha_d);
    # 0 = no smoothing. The episode-cost estimate of one rollout is noisy.
    ema_p: float = 0.0
    ema_d: float = 0.0
    max_multiplier: float = 1e3
    integral: float = field(default=0.0)
    smoothed_p: float = field(default=0.0)
    smoothed_d: float = field(default=0.0)
    multiplier: float = field(default=0.0)
    _initialised: bool = field(default=False)

    def update(self, episode_cost: float, budget: float) -> float:
        """
        Update with the latest mean episode cost ``J_c`` against budget ``d``; return lambda.

        The integral is clamped at zero (anti-windup), so a long stretch below the budget does
        not store up negative "credit"; the multiplier itself is projected onto ``[0, max]``.
        """
        if not self._initialised:
            self.smoothed_p = self.smoothed_d = float(episode_cost)
            self._initialised = True
        error = float(episode_cost) - float(budget)
        # I term: lambda_I <- max(0, lambda_I + K_i * (J_c - d)).
        self.integral = max(0.0, self.integral + self.ki * error)
        # P term on a smoothed cost: K_p * (J_c_smooth - d).
        self.smoothed_p = self.ema_p * self.smoothed_p + (1.0 - self.ema_p) * episode_cost
        proportional = self.kp * (self.smoothed_p - budget)
        # D term: only a *rising* cost pushes lambda up (max(0, .) as in the paper).
        previous_d = self.smoothed_d
        self.smoothed_d = self.ema_d * self.smoothed_d + (1.0 - self.ema_d) * episode_cost
        derivative = self.kd * max(0.0, self.smoothed_d - previous_d)
        self.multiplier = min(self.max_multiplier,
                              max(0.0, proportional + self.integral + derivative))
        return self.multiplier

    def state_dict(self) -> dict:
        """Return the state needed to resume (all fields)."""
        return {'kp': self.kp, 'ki': self.ki, 'kd': self.kd, 'ema_p': self.ema_p,
                'ema_d': self.ema_d, 'max_multiplier': self.max_multiplier,
                'integral': self.integral, 'smoothed_p': self.smoothed_p,
                'smoothed_d': self.smoothed_d, 'multiplier': self.multiplier,
                '_initialised': self._initialised}

    @classmethod
    def from_state_dict(cls, state: dict) -> 'PIDLagrangian':
        """Rebuild a multiplier saved by :meth:`state_dict`."""
        return cls(**state)


@dataclass(frozen=True)
class BudgetSchedule:
    """
    Cost budget annealed linearly over training, like FSRL's ``cost_limit_scheduler``.

    The budget is ``start`` before ``frac_start`` of training, ``end`` after ``frac_end``, and
    linear in between. DSRL's default Bullet schedule is 5 -> 100 over epochs 100 -> 900 of 1000.
    """

    start: float = 5.0
    end: float = 100.0
    frac_start: float = 0.1
    frac_end: float = 0.9

    def __call__(self, progress: float) -> float:
        """Return the budget at training progress ``progress`` in [0, 1]."""
        if progress <= self.frac_start:
            return self.start
        if progress >= self.frac_end:
            return self.end
        t = (progress - self.frac_start) / (self.frac_end - self.frac_start)
        return self.start + t * (self.end - self.start)
