"""User-level differential privacy for federated averaging (DP-FedAvg, server side).

The mechanism of McMahan et al., "Learning Differentially Private Recurrent Language
Models" (ICLR 2018), with Poisson sampling and a fixed denominator:

1. every connected client is in a round's cohort independently with probability
   ``q = m / N`` (:meth:`UserLevelDP.sample_cohort`), ``m`` the configured cohort size
   and ``N`` the population (``population-size``, or the clients connected when the run
   started): a public constant, so no user's presence changes anyone's chance. The
   cohort's size varies around ``q`` times the clients connected (``m`` when all are);
2. every sampled client clips its whole model update to L2 norm ``C`` (the server sends
   ``update-clip-norm = C`` in the round config; ``client/client_app.py`` clips) and
   has weight 1 (not ``num_examples``), so adding or removing one user changes the
   *sum* of the updates by at most ``C``;
3. the server divides the sum by ``m``, the *expected* cohort (not the number sampled or
   the number that replied), and adds ``N(0, (z C / m)^2)`` to every coordinate; a round
   whose cohort was asked but sums nothing (all declined or failed, a secure sum too short
   to unmask or halted) releases that noise alone, never an exactly unchanged model.

Why Poisson sampling at a fixed rate: Opacus' RDP accountant bounds the subsampled
Gaussian for Poisson sampling (add/remove-one neighbours) at a rate that does not depend on
the dataset. A uniform cohort of fixed size, which this server drew before, is a different
mechanism that bound does not cover; so is a rate ``m / connected``, which one user's
presence changes for everyone (about +1% epsilon). Why the fixed ``m``:
the sensitivity of ``sum / m`` is ``C / m`` only with a denominator that does not depend
on who was sampled or replied; dividing by the survivors would shrink the noise below
calibration. The cost is a bias (dropouts shrink the applied update), which FedAvg
tolerates.

A round whose Poisson cohort is too small to aggregate (fewer than the strategy's
least cohort, e.g. SecAgg+'s reconstruction threshold), too large (SecAgg+'s modulus) or
of a size SecAgg+ halts (a fractional share count below an integer threshold) is skipped.
That departs from the mechanism above, with a probability ``p`` (binomial,
:meth:`UserDPSettings.round_risk`) that does not depend on the data. The accountant
charges it as in the "bad event" argument: the released rounds are then
``(epsilon, delta_rdp + (1 + e^epsilon) * sum p)``-DP, and the reported epsilon is the
RDP epsilon at ``delta_rdp = delta - (1 + e^epsilon_hi) * sum p`` (``epsilon_hi``, the
epsilon at ``delta / 2``, bounds it), so the reported ``(epsilon, delta)`` holds as
stated. When the cohorts are so small that the term exceeds ``delta / 2`` the guarantee
is void: the server refuses the round and ends the run (raise ``cohort-size``, or connect
more of the population: the chance is that of the clients connected). At the cohorts of a
real run (50 of 679) ``p`` is below 1e-19 and changes nothing.

Accounting: one Gaussian step per round with noise multiplier ``z`` (under SecAgg+
``z C / (C + s)``: its stochastic rounding moves each of an update's ``d`` values by under
one quantization step, so a user's share of the sum has norm up to ``C + s``, ``s = sqrt(d)
2 clipping_range / quantization_range``, about 0.6% of ``C`` = 0.1 for the student) and
sampling rate ``q = m / N``, composed with Opacus' RDP accountant (through
:class:`shared.privacy.ledger.PrivacyLedger`, whose state is saved in each server
checkpoint, and in a journal written durably the moment a round is charged, before its
instructions leave: a crash after an aggregate was released but before that round's
checkpoint then cannot make a restart forget the spend; see :meth:`UserLevelDP.resume`).
(With the fixed-size cohorts drawn before, ``m / N`` understated the spend whenever fewer
than ``N`` were online, as each of them was then sampled at ``m / connected``; a Poisson
sample at ``m / N`` samples each at exactly that rate, and fewer online only means a
smaller cohort.) A round is charged as soon as its cohort is drawn (conservative: a round
that later aborts is still counted).

What the guarantee covers: the sequence of global models the server publishes. The server
is trusted, and its own records are the operator's, outside the guarantee: the logs,
metrics and checkpoints hold each round's exact cohort size (publishing it with the models
would cost about 1-3.5% more epsilon, measured at cohorts of 300 and 50) and, in plain
mode, un-noised per-round client metrics. State loaded from a version-1 checkpoint was
charged for fixed-size cohorts, which this bound does not strictly cover.

Not charged (README, what the guarantees take for granted), all under SecAgg+: a sampled
cohort whose declines, failures or dropouts leave a sum of fewer than ``max(2,
min-cohort)`` updates, which is never unmasked, and a round SecAgg+ halts because clients
dropped out mid-round (some client left with fewer surviving neighbours than the
reconstruction threshold). Both release the noise alone where, with one user's client more
(or less), the sum of several updates could have gone out: a sensitivity of up to that many
``C``, not one. Charging it outright would mean noise multiplier ``z / k`` for a boundary
of ``k`` clients (at ``z`` 1.4, ``q`` 300/679, 20 rounds: epsilon 21.9 at ``k`` = 2
instead of 6.56); bounding its chance needs a model of the dropouts, which the server has
not. Sizes that halt a round with no dropout at all are skipped and charged (above).

Trust model: the server is trusted to sample and to add the noise (central DP). In plain
mode it re-clips every update to ``C``, so even a client that skips clipping cannot
exceed the sensitivity; under SecAgg+ it only sees the sum and relies on the clients'
clipping (SecAgg+'s own per-coordinate ``clipping_range`` is the only server-side bound
there).

Cohorts come from the OS CSPRNG, and the noise from numpy's PCG64 seeded with 128 fresh
bits of it each round (unless a generator is injected, for tests): a seed nobody else
knows, though PCG64 and its floating-point Gaussian are no cryptographic sampler (the
README's "what the guarantees take for granted"). Neither is part of any checkpoint:
whoever could read the noise state could subtract the noise, and amplification by
sampling assumes nobody outside the server knows who was sampled.

This module imports Opacus (and so torch); import it only when user-level DP is on.
"""

from __future__ import annotations

import math
import random
import secrets
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy.stats import binom

from shared.errors import ConfigError, DataError
from shared.io import read_json, write_json_atomic
from shared.privacy.ledger import RESTORE_FIX, PrivacyBudget, PrivacyLedger, Spend

Arrays = list[npt.NDArray[np.floating]]

#: Version of :meth:`UserLevelDP.state_dict` (2: Poisson cohorts, with the summed chance
#: of skipped rounds, ``round_risk``; version 1 states still load, with none).
USER_DP_STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)

_T = TypeVar("_T")


@dataclass(frozen=True)
class UserDPSettings:
    """Validated parameters of the mechanism and its accountant.

    ``delta`` is the resolved value (the run-config default 0 means ``1 / population``
    and is resolved by :meth:`create`). ``epsilon_budget`` ``None`` means unlimited.
    """

    noise_multiplier: float
    clip_norm: float
    population: int
    delta: float
    epsilon_budget: float | None = None
    #: The most SecAgg+'s stochastic rounding can add to one update's L2 norm
    #: (:meth:`server.secagg.SecAggSettings.rounding_slack`; 0 without SecAgg+): a user's
    #: share of the unmasked sum is its clipped update plus its rounding, so the sensitivity
    #: is ``C`` plus this, and the accountant charges :attr:`charged_noise_multiplier`.
    rounding_slack: float = 0.0

    def __post_init__(self) -> None:
        z, c = self.noise_multiplier, self.clip_norm
        slack = self.rounding_slack
        if not (isinstance(slack, int | float) and slack >= 0 and math.isfinite(slack)):
            raise ValueError(f"rounding slack must be a finite number >= 0, got {slack!r}")
        if not (isinstance(z, int | float) and z > 0 and math.isfinite(z)):
            raise ConfigError(f"'user-dp-noise-multiplier' must be > 0, got {z!r}")
        if not (isinstance(c, int | float) and c > 0 and math.isfinite(c)):
            raise ConfigError(f"'user-dp-clip' must be > 0, got {c!r}")
        if isinstance(self.population, bool) or self.population < 2:
            raise ConfigError(
                f"'population-size' must be >= 2 for user-level DP, got {self.population!r}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"'user-dp-delta' must be in (0, 1), got {self.delta!r}")
        budget = self.epsilon_budget
        if budget is not None and not (budget > 0 and math.isfinite(budget)):
            raise ConfigError(f"'user-dp-epsilon-budget' must be > 0, got {budget!r}")

    @classmethod
    def create(
        cls,
        *,
        noise_multiplier: float,
        clip_norm: float,
        population: int,
        delta: float = 0.0,
        epsilon_budget: float = 0.0,
        rounding_slack: float = 0.0,
    ) -> UserDPSettings:
        """Build from run-config style values: ``delta`` 0 = 1/population, budget 0 = none
        (only 0: a negative or NaN one is refused, not read as the default)."""
        if not 0 <= delta < 1:
            raise ConfigError(f"'user-dp-delta' must be in [0, 1) (0: 1 / population), got {delta}")
        if not 0 <= epsilon_budget < math.inf:
            raise ConfigError(
                f"'user-dp-epsilon-budget' must be a finite number >= 0 (0: no budget), got "
                f"{epsilon_budget}"
            )
        if isinstance(population, bool) or population < 2:
            raise ConfigError(
                f"'population-size' must be >= 2 for user-level DP, got {population!r}"
            )
        return cls(
            noise_multiplier=float(noise_multiplier),
            clip_norm=float(clip_norm),
            population=int(population),
            delta=float(delta) if delta > 0 else 1.0 / population,
            epsilon_budget=float(epsilon_budget) if epsilon_budget > 0 else None,
            rounding_slack=float(rounding_slack),
        )

    @property
    def charged_noise_multiplier(self) -> float:
        """The noise multiplier the accountant charges: the noise's std ``z C`` over the
        sensitivity ``C + rounding_slack`` (``z`` itself without SecAgg+)."""
        if self.rounding_slack == 0:
            return self.noise_multiplier
        c = self.clip_norm
        return self.noise_multiplier * c / (c + self.rounding_slack)

    def noise_std(self, cohort: int) -> float:
        """Per-coordinate noise std of the averaged update: ``z * C / m``."""
        if cohort < 1:
            raise ValueError(f"cohort must be >= 1, got {cohort}")
        return self.noise_multiplier * self.clip_norm / cohort

    def sample_rate(self, cohort: int) -> float:
        """``q = m / N``: each client's chance to be in a round's cohort of expected size
        ``m`` when the whole population is connected."""
        if cohort > self.population:
            raise ConfigError(
                f"cohort of {cohort} clients exceeds the population of {self.population}; "
                "'population-size' must count every client that can be sampled"
            )
        return cohort / self.population

    def round_risk(
        self,
        cohort: int,
        connected: int | None = None,
        least: int = 0,
        most: int | None = None,
        halting: Collection[int] = (),
    ) -> float:
        """The chance that a round's Poisson cohort (rate for ``cohort``, from the clients
        ``connected``, default the population) is skipped: fewer than ``least`` or more
        than ``most`` clients, or a size in ``halting`` (one SecAgg+ halts), with or without
        the user (see the module doc). Bounded for both neighbours of a dataset: without the
        user (``connected - 1`` others) for the lower tail, with one more (``connected +
        1``) for the upper; for ``halting`` the others, ``connected - 1`` or ``connected``
        of them, number a halting size or one less."""
        n = self.population if connected is None else connected
        q = self.sample_rate(cohort)
        low = float(binom.cdf(least - 1, max(n - 1, 0), q)) if least > 0 else 0.0
        high = float(binom.sf(most, n + 1, q)) if most is not None else 0.0
        near = sorted({size for h in halting for size in (h - 1, h)})
        gaps = max(float(np.sum(binom.pmf(near, others, q))) for others in (max(n - 1, 0), n))
        return min(1.0, low + high + gaps)


def _steps(ledger: PrivacyLedger) -> int:
    """How many mechanism steps ``ledger`` has charged (one per user-level round)."""
    return sum(spend.steps for spend in ledger.history)


class _MemoizedLedger(PrivacyLedger):
    """A :class:`PrivacyLedger` that remembers epsilon per (history, extra, delta).

    The RDP -> (epsilon, delta) conversion costs ~0.1-0.3 s for ``q < 1`` and the
    server asks it several times per round (charge, report, checkpoint, budget check)
    for the same history. Accounting is unchanged: the key is the full history. Every round
    spends more, so a history is not asked for again rounds later: only the newest
    :attr:`MEMO_SIZE` results are kept (a server runs many rounds, and restarts rarely).
    """

    #: How many (history, delta) results the memo keeps, the oldest dropped first.
    MEMO_SIZE = 32

    def __init__(self, budget: PrivacyBudget) -> None:
        super().__init__(budget)
        self._memo: dict[tuple[object, ...], float] = {}

    def epsilon(self, extra: Spend | None = None, delta: float | None = None) -> float:
        """Same as :meth:`PrivacyLedger.epsilon`, memoized."""
        spends = [*self.history, *([extra] if extra is not None else [])]
        key = (
            tuple((s.noise_multiplier, s.sample_rate, s.steps) for s in spends),
            self.budget.delta if delta is None else delta,
        )
        if key not in self._memo:
            while len(self._memo) >= self.MEMO_SIZE:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = super().epsilon(extra=extra, delta=delta)
        return self._memo[key]


class UserLevelDP:
    """Server-side DP-FedAvg: noise for the averaged update plus a persistent accountant.

    The strategy calls :meth:`charge_round` when it samples a cohort,
    :meth:`noisy_mean` when it aggregates, and reports :meth:`epsilon_after`. The
    server loop (with the whole population connected) and the strategy (with the clients
    connected) use :meth:`refusal` to end the run before the budget is broken, and the loop
    saves :meth:`state_dict` in every checkpoint.
    """

    def __init__(
        self,
        settings: UserDPSettings,
        *,
        rng: np.random.Generator | None = None,
        journal: str | Path | None = None,
    ) -> None:
        self.settings = settings
        self.journal = Path(journal) if journal is not None else None
        budget = PrivacyBudget(
            epsilon=settings.epsilon_budget
            if settings.epsilon_budget is not None
            else sys.float_info.max,
            delta=settings.delta,
        )
        self.ledger: PrivacyLedger = _MemoizedLedger(budget)
        self._rng = rng
        self._epsilon_by_round: dict[int, float] = {}
        self._cohort_by_round: dict[int, int] = {}
        #: summed chance that a charged round was skipped (:meth:`UserDPSettings.round_risk`)
        self.round_risk = 0.0
        #: the journal's JSON as read (a 1-tuple; ``None``: not read since it was last
        #: written): this accountant is its one writer, so one read serves a whole start
        self._journal_read: tuple[Any] | None = None

    def __repr__(self) -> str:
        """Short description for logs."""
        s = self.settings
        return (
            f"UserLevelDP(z={s.noise_multiplier}, C={s.clip_norm}, N={s.population}, "
            f"delta={s.delta:.3g}, budget={s.epsilon_budget})"
        )

    # ------------------------------------------------------------------ accounting

    def spend(self, cohort: int) -> Spend:
        """The ledger entry of one round of expected ``cohort`` clients
        (:meth:`UserDPSettings.sample_rate`)."""
        rate = self.settings.sample_rate(cohort)
        return Spend(self.settings.charged_noise_multiplier, rate, 1)

    def _epsilon(self, extra: Spend | None, risk: float) -> float:
        """Epsilon at the settings' delta, the skipped rounds' ``risk`` taken out of the
        delta the RDP bound may use (module doc); ``inf`` when that would be more than half
        of it."""
        delta = self.settings.delta
        if risk <= 0:
            return self.ledger.epsilon(extra=extra)
        upper = self.ledger.epsilon(extra=extra, delta=delta / 2)
        slack = (1.0 + math.exp(min(upper, 700.0))) * risk
        if slack > delta / 2:
            return math.inf
        return self.ledger.epsilon(extra=extra, delta=delta - slack)

    def epsilon(self) -> float:
        """User-level epsilon spent so far (at the settings' delta)."""
        return self._epsilon(None, self.round_risk)

    def epsilon_if(self, cohort: int, risk: float = 0.0) -> float:
        """Epsilon after one more round of expected ``cohort`` clients, skipped with chance
        ``risk``."""
        return self._epsilon(self.spend(cohort), self.round_risk + risk)

    def refusal(self, cohort: int, risk: float = 0.0) -> str | None:
        """Why one more round (as for :meth:`epsilon_if`) must not run, or ``None``: it
        would break the budget, or its cohorts are too small for any guarantee."""
        if cohort <= 0:
            return None
        after = self.epsilon_if(cohort, risk)
        if math.isinf(after):
            delta = self.settings.delta
            upper = self.ledger.epsilon(extra=self.spend(cohort), delta=delta / 2)
            return (
                f"cohorts of {cohort} of {self.settings.population} are too small for "
                "user-level DP: rounds skipped for too few (or too many) sampled clients, "
                "or for a number SecAgg+ halts, "
                f"with chance {self.round_risk + risk:.3g} in all, times 1 + e^epsilon "
                f"(epsilon {upper:.4g}), would take more than half of delta {delta:.3g}. "
                "Sample more clients a round (cohort-size, with more clients connected), or "
                "let fewer do (min-cohort 1 without SecAgg+, a smaller "
                "secagg-reconstruction-threshold, a larger secagg-num-shares)"
            )
        budget = self.settings.epsilon_budget
        if budget is not None and after > budget:
            return (
                f"it would take user-level epsilon from {self.epsilon():.4g} to {after:.4g} > "
                f"budget {budget} (delta {self.settings.delta:.3g})"
            )
        return None

    def sample_cohort(
        self, candidates: Sequence[_T], cohort: int, rng: random.Random | None = None
    ) -> list[_T]:
        """A Poisson sample: each of ``candidates`` independently with chance
        ``q = cohort / population``, drawn from the OS CSPRNG unless ``rng`` is given."""
        q = self.settings.sample_rate(cohort)
        draw = rng if rng is not None else random.SystemRandom()
        return [c for c in candidates if draw.random() < q]

    def charge_round(self, server_round: int, cohort: int, risk: float = 0.0) -> float:
        """Record one round's step (``q = cohort / population``) and its chance ``risk`` of
        being skipped (:meth:`UserDPSettings.round_risk`); returns the new epsilon.

        Charging the same round twice (a strategy re-configuring a round) is an error,
        since it would silently double-count.
        """
        if server_round in self._cohort_by_round:
            raise DataError(
                f"round {server_round} was already charged to the privacy ledger; a round is "
                "charged once: resume from the checkpoint of the round before it"
            )
        if cohort <= 0:
            raise ValueError(f"cannot charge a round with {cohort} clients")
        spend = self.spend(cohort)
        self.ledger.record(spend.noise_multiplier, spend.sample_rate, spend.steps)
        self.round_risk += risk
        eps = self.epsilon()
        self._cohort_by_round[server_round] = cohort
        self._epsilon_by_round[server_round] = eps
        if self.journal is not None:  # durable before the round's instructions leave
            self._write_journal()
        return eps

    def epsilon_after(self, server_round: int) -> float | None:
        """Epsilon reported for ``server_round`` (``None`` if that round was not charged)."""
        return self._epsilon_by_round.get(server_round)

    # ------------------------------------------------------------------ mechanism

    def _generator(self) -> np.random.Generator:
        if self._rng is not None:
            return self._rng
        return np.random.default_rng(secrets.randbits(128))

    def noisy_mean(
        self, update_sum: Sequence[npt.NDArray[np.floating]], cohort: int
    ) -> list[npt.NDArray[np.float64]]:
        """``update_sum / m + N(0, (z C / m)^2)`` per coordinate, in float64.

        ``update_sum`` is the sum of the clipped, weight-1 client updates; ``cohort``
        is ``m``, the round's *expected* cohort (``cohort-size``), not the number its
        Poisson draw sampled nor the number that replied (see module doc).
        """
        std = self.settings.noise_std(cohort)
        rng = self._generator()
        return [
            np.asarray(s, dtype=np.float64) / cohort + rng.normal(0.0, std, size=np.shape(s))
            for s in update_sum
        ]

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state for the checkpoint (ledger plus per-round record)."""
        s = self.settings
        return {
            "version": USER_DP_STATE_VERSION,
            "ledger": self.ledger.state_dict(),
            "noise_multiplier": s.noise_multiplier,
            "clip_norm": s.clip_norm,
            "population": s.population,
            "delta": s.delta,
            "round_risk": self.round_risk,
            "rounds": [
                [r, self._cohort_by_round[r], self._epsilon_by_round[r]]
                for r in sorted(self._cohort_by_round)
            ],
        }

    def resume(
        self,
        checkpoint_state: Mapping[str, Any] | None,
        server_round: int,
        source: str = "user-level DP state",
    ) -> int:
        """Restore the accountant for a run resuming after round ``server_round`` (0: from
        the start) from that round's checkpoint state (``source`` names it in errors) and the
        journal; returns how many charged rounds the checkpoint had not recorded (0 without a
        journal).

        The journal is written when a round is charged and the checkpoint only after the
        round, so after a crash in between (or when the newest checkpoint was unusable and
        an older one is resumed) the journal holds rounds past ``server_round``. Their
        spending stays in the ledger, as their aggregates may have been released; only
        their per-round records are dropped, so the rerun rounds are charged again
        (over-counting, the safe direction).
        """
        if checkpoint_state is not None:
            self.load_state_dict(checkpoint_state, source=source)
        journal = self.read_journal()
        if journal is None or self.journal is None:
            return 0
        later = [r for r in journal._cohort_by_round if r > server_round]
        # epsilon is clamped at 0 while little is spent: on a tie the longer history wins,
        # or a crashed round's spend that still read 0 would be forgotten
        if (journal.epsilon(), _steps(journal.ledger)) > (self.epsilon(), _steps(self.ledger)):
            self.ledger.history = list(journal.ledger.history)
        self.round_risk = max(self.round_risk, journal.round_risk)
        self._write_journal()  # the spend stays; the rounds go
        return len(later)

    def run_delta(self, checkpoint_state: Mapping[str, Any] | None) -> float | None:
        """The smallest delta this run's epsilon has been reported at (its journal's and
        checkpoint's), ``None`` for a run that has none recorded yet. Reads only."""
        found = []
        for state in (self._journal_state(), checkpoint_state):
            delta = state.get("delta") if isinstance(state, Mapping) else None
            if isinstance(delta, int | float) and not isinstance(delta, bool) and 0 < delta < 1:
                found.append(float(delta))
        return min(found, default=None)

    def read_journal(self) -> UserLevelDP | None:
        """The journal's accountant (``None`` without a journal); reads only. Raises
        :class:`DataError` naming the file when it is unreadable or malformed."""
        state = self._journal_state()
        if state is None:
            return None
        journal = UserLevelDP(self.settings)
        journal.load_state_dict(state, source=f"user-level DP journal {self.journal}")
        return journal

    def at_delta(self, delta: float) -> UserLevelDP:
        """This mechanism, with nothing loaded yet, at ``delta`` instead (the run's, kept
        across restarts); the journal, if read already, is not read again."""
        other = UserLevelDP(
            replace(self.settings, delta=delta), rng=self._rng, journal=self.journal
        )
        other._journal_read = self._journal_read
        return other

    def _journal_state(self) -> Any:
        """The journal's JSON, ``None`` without one; read once until it is written again."""
        if self.journal is None:
            return None
        if self._journal_read is None:
            state = None
            if self.journal.exists():
                state = read_json(
                    self.journal,
                    what="user-level DP journal",
                    consequence="refusing to resume, as it may hold privacy spent after the "
                    "last checkpoint. Restore it from backup, or remove it deliberately",
                    error=DataError,
                )
            self._journal_read = (state,)
        return self._journal_read[0]

    def _write_journal(self) -> None:
        assert self.journal is not None
        write_json_atomic(self.journal, self.state_dict())
        self._journal_read = None  # what it holds now is this accountant's state

    def load_state_dict(
        self, state: Mapping[str, Any], source: str = "user-level DP state"
    ) -> None:
        """Restore the ledger history from a checkpoint (or the journal: ``source`` names it).

        The spent history always survives (never reset); the settings in force are the
        configured ones. Raises :class:`DataError` for a malformed state, naming ``source``
        and what to do.
        """
        if not isinstance(state, Mapping):
            raise DataError(f"{source} is not a JSON object; {RESTORE_FIX}")
        if state.get("version") not in _READABLE_VERSIONS or "ledger" not in state:
            raise DataError(
                f"{source} has version {state.get('version')!r}; expected one of "
                f"{list(_READABLE_VERSIONS)} with a 'ledger'; {RESTORE_FIX}"
            )
        risk = state.get("round_risk", 0.0)
        if isinstance(risk, bool) or not isinstance(risk, int | float) or not 0 <= risk <= 1:
            raise DataError(
                f"{source}: 'round_risk' must be a number in [0, 1], got {risk!r}; {RESTORE_FIX}"
            )
        self.ledger.load_state_dict(state["ledger"], source=f"the ledger of {source}")
        self.round_risk = float(risk)
        try:
            rounds = [(int(r), int(m), float(e)) for r, m, e in state.get("rounds", [])]
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{source}: malformed 'rounds' ({exc}); {RESTORE_FIX}") from None
        self._cohort_by_round = {r: m for r, m, _ in rounds}
        self._epsilon_by_round = {r: e for r, _, e in rounds}
