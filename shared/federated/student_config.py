"""Where the student task finds its model and keeps per-client state, and its privacy budget.

Torch-free on purpose, like :mod:`shared.federated.local_config`: the CLI builds one flag per
setting from it (``fedrec server start``) without importing the training code.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import ConfigError
from shared.federated.round_caps import MAX_ROUND_EPSILON, MAX_ROUND_STEPS, check_round_caps
from shared.privacy.budget import PrivacyBudget

__all__ = ["StudentTaskConfig", "check_client_counts"]


def check_client_counts(num_threads: int, eval_negatives: int) -> None:
    """The rules of ``num-threads`` and ``eval-negatives`` wherever they are configured (the
    task, the simulation): a client found a bad one only on the devices, after the run had
    started."""
    for key, value in (("num-threads", num_threads), ("eval-negatives", eval_negatives)):
        if value < 1:
            raise ConfigError(f"'{key}' must be >= 1, got {value}")


@dataclass(frozen=True)
class StudentTaskConfig:
    """Where the task finds its model and keeps per-client state, the privacy budget, and
    the caps on one round (``max-round-steps``, ``max-round-epsilon``: a round past either
    is declined; :mod:`shared.federated.round_caps`)."""

    bundle: str = ""
    state_dir: str = ""
    epsilon_budget: float = PrivacyBudget.epsilon
    delta: float = PrivacyBudget.delta
    max_round_steps: int = MAX_ROUND_STEPS
    max_round_epsilon: float = MAX_ROUND_EPSILON
    eval_negatives: int = 99
    eval_seed: int = 42
    num_threads: int = 1
    meta_learning: bool = False
    device: str = "auto"
    # magnitude pruning of each published global model (0 = none; see publish_prune)
    prune_sparsity: float = 0.0
    #: SHA-256 of the server's bundle ("" = unchecked): a node whose own copy differs (same
    #: catalog, other frozen tables) would train and serve another model, silently
    bundle_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ConfigError("the student task needs 'bundle' (path to the pretrained bundle)")
        if not self.state_dir:
            raise ConfigError("the student task needs 'state-dir' (per-client state folder)")
        PrivacyBudget(self.epsilon_budget, self.delta)
        check_round_caps(self.max_round_steps, self.max_round_epsilon)
        check_client_counts(self.num_threads, self.eval_negatives)
        if self.eval_seed < 0:  # NumPy refuses it, on every client's every evaluation
            raise ConfigError(f"'eval-seed' must be an integer >= 0, got {self.eval_seed}")
        from shared.compression.prune import publish_prune  # torch: only when a task is built
        from shared.federated.student_task import resolve_device

        resolve_device(self.device)
        publish_prune(self.prune_sparsity)
