"""How one client trains per round: the one place for the client-training defaults.

Torch-free on purpose: the simulation's config, the device daemon's learner config and the
CLI take their defaults from :class:`LocalTrainConfig` without importing the training code.
``[tool.flwr.app.config]`` in ``pyproject.toml`` declares the same keys for ``flwr run``;
a test keeps its values equal to these defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.errors import ConfigError

__all__ = ["LocalTrainConfig", "check_noise_shares", "noise_shares_clip_problem"]


def noise_shares_clip_problem(clip_norm: float) -> str:
    """Why ``noise-shares`` > 1 and a clip of the whole update (``update-clip-norm``, or
    ``user-dp-clip`` under user-level DP) are refused together: each update carries only
    1/m of the round's noise, and clipping it before the secure sum (once the clip bites)
    makes that sum something other than "clipped gradients plus the full noise", which is
    what the clients' ledgers are charged for."""
    return (
        f"noise-shares > 1 cannot be combined with clipping each whole update (to "
        f"{clip_norm:g}: update-clip-norm, or user-dp-clip with user-dp): an update carries "
        "only 1/m of the DP noise, and clipping it before the secure sum breaks the noise "
        "argument the ledgers are charged for; set noise-shares=1, or leave update-clip-norm "
        "0 and user-dp off (max-grad-norm already bounds each example)"
    )


def check_noise_shares(
    noise_shares: int, *, secure_aggregation: bool | None = None, cohort_size: int = 0
) -> None:
    """The rules of ``noise-shares``, wherever it is configured (client, server, simulation):
    at least 1; above 1 only where the server sees nothing but the secure sum (checked when
    ``secure_aggregation`` is known) and never above the clients of a round (checked when
    ``cohort_size`` is a count, > 0), or every aggregate would be discarded."""
    if noise_shares < 1:
        raise ConfigError(f"noise-shares must be >= 1, got {noise_shares}")
    if noise_shares == 1:
        return
    if secure_aggregation is False:
        raise ConfigError(
            f"'noise-shares' {noise_shares} splits the record-level DP noise over the clients, "
            "which only holds when the server sees nothing but their sum: set secagg=true, "
            "or noise-shares=1"
        )
    if 0 < cohort_size < noise_shares:
        raise ConfigError(
            f"'noise-shares' ({noise_shares}) exceeds 'cohort-size' ({cohort_size}); every "
            "round's aggregate would be discarded"
        )


MAX_LOCAL_EPOCHS = 1_000
"""The most passes over its examples a client makes a round (the default is 1; every run
and benchmark here uses 1)."""
MAX_BATCH_SIZE = 65_536
"""The largest DP-SGD batch (the default is 16; the largest used, in ``bench/``, 512)."""
MAX_PERSONAL_STEPS = 10_000
"""The most Adam steps of a personal adapter's fit (the default is 20; a device daemon takes
at most :data:`client.device.config.MAX_FEDERATION_PERSONAL_STEPS` from the federation)."""
MAX_EXAMPLES = 100_000
"""The most training windows a client builds from its history (the default is 256)."""

#: The settings that set how much a client computes or holds per round, with their bounds:
#: a server's run or round config reaches every device, and one misconfigured or hostile
#: value (``local-epochs=10**9``) would keep each training for ever, or allocating.
_WORK_BOUNDS = {
    "local-epochs": MAX_LOCAL_EPOCHS,
    "batch-size": MAX_BATCH_SIZE,
    "personal-steps": MAX_PERSONAL_STEPS,
    "max-examples": MAX_EXAMPLES,
}

MIN_NOISE_MULTIPLIER = 1e-3
"""Below it DP-SGD is DP in name only, and the accountant's arithmetic breaks down."""
MAX_NOISE_MULTIPLIER = 1e6
"""Above it the accountant's sigma**2 overflows; the gradient is noise anyway."""


@dataclass(frozen=True)
class LocalTrainConfig:
    """Local training of one client per round.

    ``noise_multiplier`` / ``max_grad_norm``: Opacus DP-SGD on the global parameters.
    ``dp=False`` (the no-DP comparison) trains them without noise and clips the *batch*
    gradient to ``max_grad_norm`` instead of every example's: plain SGD on a client's few
    hundred examples otherwise diverges within a few rounds.
    ``personal_steps`` / ``personal_lr``: full-batch Adam steps that fit a device's personal
    adapter, from its initialization, against the global model the device serves
    (:func:`~shared.federated.local_training.fit_personal`; the adapter never leaves the
    device, so it needs no DP). Both are measured, not arbitrary. The rate: on ml-100k (200
    federated users, validation item) 5 steps at 0.05 cut sampled HR@10 from 0.70 to 0.65, at
    0.01 to 0.695, at 0.001 they left it at 0.70; next-item likelihood on a user's own history
    over-fits the items that are then excluded from their recommendations. The steps: 20 was
    the best on ml-100k validation without a full-ranking loss, within noise of 5 and 35
    (``bench/personal_steps.py``; ``docs/parameters.md``, "Personal parameters").

    ``exclude_seen``: the items of a training window are left out of its next-item softmax
    (:func:`~shared.models.sequence.next_item_cross_entropy`), in the clients' DP-SGD and in
    the personal and few-shot fits, as the teacher's set reading does. With the plain softmax
    the main job's federation *cost* the synthetic world's student full-ranking HR@10
    (federated users, paired against the pretrained student, three runs: -0.033, -0.032,
    -0.019, each 95% interval excluding 0); with the exclusion -0.006, -0.008, -0.007, -0.001,
    -0.001, -0.017 (within noise) and -0.019. The personal adapter gained +0.019, +0.017,
    +0.019, +0.022 (intervals above 0) and +0.006 sampled HR@10 over the federated model
    where it had gained +0.013 and +0.006. The device daemon's refits
    (``client/device/training.py``) follow it too: it comes with each global model. On
    ml-100k it changes nothing measurable: the split-noise recipe in
    ``bench/federation_emulator.py`` (100 rounds) gives 0.682 / 0.178 against 0.688 / 0.181
    sampled / full, and 20 adapter steps ``bench/personal_steps.py`` +0.015 against +0.018
    sampled (ad hoc, both on an earlier run's directory; the committed
    ``personal-steps-ml-100k.json`` is another run).

    ``noise_shares`` m > 1: distributed DP over secure aggregation. The server sees only the
    SecAgg+ sum of at least m contributions (it discards a smaller aggregate), so each client
    adds only its share ``N(0, (noise_multiplier * max_grad_norm)^2 / m)`` and the sum carries
    the full noise: for the same epsilon a record's gradient is drowned in sqrt(m) times less
    noise than when every client adds all of it (``noise_shares=1``, which protects a client's
    records even from a server that could see its single update). For the argument to hold the
    client releases one noisy gradient per round: exactly one Poisson batch at rate ``1 / ceil(n
    / batch_size)`` (:func:`~shared.federated.local_training.dp_sample_rate`), summed
    per-example-clipped gradients plus the share, divided by the fixed ``batch_size`` (not by
    the client's own batch, so one record moves the uniform-weight mean by at most
    ``max_grad_norm / batch_size`` whichever client holds it; every DP step divides by it,
    with ``noise_shares=1`` too, since a normaliser that moves with n shows in the noise's
    size). The ledger charges that step at
    ``noise_multiplier``. Hence ``local_epochs`` must be 1; pair it with a server optimiser
    (``server-optimizer=adam``) that turns those gradients into steps. Caveat: the shares are
    continuous Gaussians quantized by SecAgg+ (steps of about 4e-6 against a noise of about
    1e-2); a formal guarantee for the quantized sum needs the discrete Gaussian of Kairouz et
    al. 2021, which is not implemented.

    The settings that set how much a client computes or holds a round (``local_epochs``,
    ``batch_size``, ``personal_steps``, ``max_examples``) are bounded above as well as below
    (:data:`MAX_LOCAL_EPOCHS` and the others, each far above its default and any value used
    here): they come from the server, and a device refuses a round past them (an error reply
    of kind ``config``) rather than training for ever. Their product, a round's DP-SGD steps,
    and the epsilon a round spends are held to the client's own caps (``max-round-steps``,
    ``max-round-epsilon``: :mod:`shared.federated.round_caps`); past them it declines.
    """

    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    dp: bool = True
    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    personal_steps: int = 20
    personal_lr: float = 0.001
    max_examples: int = 256
    exclude_seen: bool = True
    noise_shares: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ConfigError(f"local-epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf or not 0 < self.personal_lr < math.inf:
            raise ConfigError("lr and personal-lr must be finite numbers > 0")
        if not 0.0 <= self.momentum < 1.0:  # NaN fails this too
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.dp and not MIN_NOISE_MULTIPLIER <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"noise-multiplier must be in [{MIN_NOISE_MULTIPLIER}, {MAX_NOISE_MULTIPLIER}] "
                f"with DP on (got {self.noise_multiplier}); set dp=false to train without DP"
            )
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.dp and not math.isfinite(self.max_grad_norm):
            raise ConfigError(
                "max-grad-norm must be finite with DP on: the noise is noise-multiplier times "
                "it; an unbounded clip (inf) only makes sense with dp=false"
            )
        check_noise_shares(self.noise_shares)
        if self.noise_shares > 1 and not self.dp:
            raise ConfigError("noise-shares > 1 splits DP noise; it needs dp=true")
        if self.noise_shares > 1 and self.local_epochs != 1:
            raise ConfigError(
                f"noise-shares > 1 releases one noisy gradient per round, so local-epochs "
                f"must be 1 (got {self.local_epochs})"
            )
        if self.personal_steps < 0 or self.max_examples < 1:
            raise ConfigError("personal-steps must be >= 0 and max-examples >= 1")
        for key, high in _WORK_BOUNDS.items():
            value = getattr(self, key.replace("-", "_"))
            if value > high:
                raise ConfigError(
                    f"{key} must be <= {high:,}, got {value}: it sets how much every client "
                    f"computes or holds a round, and more would keep a device busy for hours; "
                    f"set {key} to at most {high:,}"
                )
