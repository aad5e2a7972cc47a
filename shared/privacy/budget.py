"""What a privacy ledger accounts in: the budget and one mechanism run's spend.

Plain validated values, free of torch and Opacus, so configuration code can take its
defaults from :class:`PrivacyBudget` without importing an accountant
(:mod:`shared.privacy.ledger` does the accounting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.errors import ConfigError

USER_DP_CLIP = 0.1
"""Default bound C on a client's whole update under user-level DP: near the clients' median
update norm, which bounds the noise (``z C / m``) without biting (about 0.1 on ml-100k and
0.07 on the synthetic world; ``bench/federation_emulator.py --user-dp`` reports it)."""


@dataclass(frozen=True)
class PrivacyBudget:
    """The most (epsilon, delta) a client (or the server's user-level ledger) may spend."""

    epsilon: float = 8.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        check_budget(self.epsilon, self.delta)


def check_budget(
    epsilon: float,
    delta: float,
    *,
    names: tuple[str, str] = ("privacy budget epsilon", "privacy budget delta"),
) -> None:
    """The rules of an (epsilon, delta) budget, wherever one is configured; ``names`` are
    what the errors call the two settings (e.g. a device's ``privacy-epsilon``)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"{names[0]} must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"{names[1]} must be in (0, 1), got {delta}")


@dataclass(frozen=True)
class Spend:
    """One mechanism run: ``steps`` noisy steps at ``noise_multiplier`` and ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(
                f"noise_multiplier must be > 0 for DP accounting, got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
