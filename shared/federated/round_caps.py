"""A client owner's caps on one round: the most DP-SGD (optimizer) steps it takes and the most
record-level epsilon it spends in a round, whatever the server's round config asks.

Each setting that sizes a round (``local-epochs``, ``batch-size``, ``max-examples``) is bounded
on its own (:data:`~shared.federated.local_config.MAX_LOCAL_EPOCHS` and the others), but
their product is not: within those bounds a server could ask one device for about 500,000
DP-SGD steps a round, or, within the budget, for its whole remaining epsilon in one round.
A client checks both caps before it trains (the student task's ``fit``,
:class:`~shared.federated.student_task.StudentTask`): the steps as its training would take them
(:func:`~shared.federated.local_training.round_steps`), the epsilon as its ledger predicts
the round would spend (:meth:`~shared.privacy.ledger.PrivacyLedger.check`, the prediction
its budget check makes). Past either cap it declines the round (the reply's kind names the
cap; the ledger spends nothing).

Torch-free, like :mod:`shared.federated.local_config`: the simulation's config, the
device's CLI and the ClientApp's node-config reader take the defaults and the check from
here.
"""

from __future__ import annotations

import math

from shared.config import is_int
from shared.errors import ConfigError, RoundCapExceededError

__all__ = [
    "MAX_ROUND_EPSILON",
    "MAX_ROUND_STEPS",
    "ROUND_EPSILON_KEY",
    "ROUND_STEPS_KEY",
    "check_round_caps",
    "check_round_steps",
]

ROUND_STEPS_KEY = "max-round-steps"
"""The setting (run config, simulation) of the steps cap, and the kind of its decline."""
ROUND_EPSILON_KEY = "max-round-epsilon"
"""The setting (run config, simulation) of the epsilon cap, and the kind of its decline."""

MAX_ROUND_STEPS = 1_000
"""Default: the most optimizer steps a client takes in a round. The defaults take at most
16 (``max-examples`` 256 in batches of 16, one epoch), every simulation preset, benchmark
and test at most 16 as well (split noise: 1): 62x below, where the settings' own bounds
allowed 1,000 x 100,000."""
MAX_ROUND_EPSILON = 6.0
"""Default: the most record-level epsilon a client spends in one round (ledger's epsilon
after the round minus before, at the budget's delta). Below the default budget of 8, so no
round a server asks for spends a fresh device's whole budget. A round at the defaults
(noise-multiplier 1.5, batch-size 16) spends at most 3.05 (a client of 17 to 32 examples:
two steps at rate 1/2), a split-noise round at noise-multiplier 2 or 3 at most 2.17 or
1.39; the tests' costliest round (noise 1.0, 11 examples in batches of 4) 5.21."""


def check_round_caps(
    max_round_steps: int,
    max_round_epsilon: float,
    *,
    names: tuple[str, str] = (ROUND_STEPS_KEY, ROUND_EPSILON_KEY),
) -> None:
    """The rules of the two caps, wherever they are configured: the steps an integer >= 1,
    the epsilon a finite number > 0 (``names``: what the errors call the two settings, e.g.
    a device's ``--max-round-steps``). A NaN cap compared below no epsilon (no cap at all),
    and 0 steps would decline every round without saying why."""
    if not is_int(max_round_steps) or max_round_steps < 1:
        raise ConfigError(
            f"{names[0]} must be an integer >= 1 (the most DP-SGD steps a round may take), "
            f"got {max_round_steps!r}; the default is {MAX_ROUND_STEPS:,}"
        )
    if isinstance(max_round_epsilon, bool) or not 0 < max_round_epsilon < math.inf:
        raise ConfigError(
            f"{names[1]} must be a finite number > 0 (the most epsilon a round may spend), "
            f"got {max_round_epsilon!r}; the default is {MAX_ROUND_EPSILON:g}"
        )


def check_round_steps(
    steps: int, cap: int, *, local_epochs: int, epoch_steps: int, batch_size: int
) -> None:
    """Raise :class:`~shared.errors.RoundCapExceededError` (``max-round-steps``) when a round
    of ``steps`` (``local_epochs`` x ``epoch_steps`` batches of ``batch_size``) exceeds
    ``cap``. The text names the settings that multiply up to it and both fixes; it stays in
    the client's log (the server is told the kind only)."""
    if steps <= cap:
        return
    raise RoundCapExceededError(
        f"this round would take {steps:,} DP-SGD steps ({local_epochs:,} local-epochs x "
        f"{epoch_steps:,} batches of batch-size {batch_size:,}), more than this client's "
        f"{ROUND_STEPS_KEY} {cap:,}; it declines to train. Ask for fewer steps a round on the "
        "server (fewer 'local-epochs', a larger 'batch-size' or a smaller 'max-examples'), or "
        f"raise the cap ('{ROUND_STEPS_KEY}' in a simulation's run config, "
        "`fedrec client start --max-round-steps` on a device)",
        ROUND_STEPS_KEY,
    )
