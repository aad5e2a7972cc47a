"""How the device daemon runs (:class:`DaemonConfig`), apart from the daemon itself.

Light on purpose, like :mod:`shared.federated.local_config`: the CLI builds one flag per
setting from it without importing the daemon (ONNX Runtime, the store, the API).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.bandits.policies import BanditConfig
from shared.config import from_flat, kebab
from shared.errors import ConfigError
from shared.io import MIN_LOG_BYTES
from shared.privacy.budget import PrivacyBudget, check_budget

#: The most adapter refit steps a device takes because the federation's run config asks
#: (100x the default 20): a server asking for 10**9 would keep the device refitting for
#: hours, its new events and models waiting (an erase or a stop ends a refit at its next
#: step). The device's owner sets any number with ``--personal-steps``.
MAX_FEDERATION_PERSONAL_STEPS = 2000

__all__ = [
    "MAX_FEDERATION_PERSONAL_STEPS",
    "MAX_K",
    "MAX_WAIT_S",
    "MIN_BODY_BYTES",
    "MIN_LOG_BYTES",
    "DaemonConfig",
]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_WAIT_S = 3600.0
"""The longest shutdown grace or monitor interval a daemon accepts (an hour)."""


#: The most items one request for recommendations returns (the API's ``k``).
MAX_K = 100

#: The smallest request body limit (bytes) the local API takes: below it even a one-event
#: batch with its JSON framing may be refused.
MIN_BODY_BYTES = 1024


@dataclass(frozen=True)
class DaemonConfig:
    """How the daemon runs. Kebab-case keys work with :func:`shared.config.from_flat`.

    ``host`` must be a loopback address unless ``allow_remote`` (the API serves one user's
    data; exposing it to the network is a deliberate choice). ``max_batch`` bounds events or
    feedback per request (413 beyond it) and ``max_body_bytes`` the request body (413).
    ``candidate_pool``: how many model candidates the exploration policy re-ranks.
    ``keep_models``: sealed versions kept on disk (for rollback; the newest global one is also
    kept while a personal model serves, so an erase can serve it again). ``max_impressions``:
    how many recommended items are remembered for feedback checks. ``privacy_*``: the budget
    reported by ``/status`` (the ledger file holds what was spent) and, under ``fedrec
    client start``, caps on the server's ``epsilon-budget`` and ``delta``. ``exploration``:
    the re-ranking policy (:class:`~shared.bandits.policies.BanditConfig`; flat keys
    ``bandit-<key>`` in :meth:`from_values`); its ``top_n`` must fit in ``candidate_pool``.
    ``max_log_bytes``: the most a managed process's log (``logs/supernode.log``) holds; a
    daemon runs for months and its SuperNode logs every round and every retry, so beyond
    it the oldest lines are dropped, keeping the newest half (at least
    :data:`MIN_LOG_BYTES`).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    allow_remote: bool = False
    max_batch: int = 1000
    max_body_bytes: int = 1_048_576
    candidate_pool: int = 200
    keep_models: int = 3
    max_impressions: int = 10_000
    privacy_epsilon: float = PrivacyBudget.epsilon
    privacy_delta: float = PrivacyBudget.delta
    shutdown_grace_s: float = 10.0
    monitor_interval_s: float = 0.5
    log_level: str = "warning"
    max_log_bytes: int = 10 * 1024 * 1024
    exploration: BanditConfig = field(default_factory=BanditConfig)

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> DaemonConfig:
        """Build from flat kebab-case keys; ``bandit-<key>`` keys configure ``exploration``
        (e.g. ``bandit-policy=thompson bandit-mmr-lambda=0.6``)."""
        own: dict[str, object] = {}
        bandit: dict[str, object] = {}
        own_keys = {kebab(f.name) for f in dataclasses.fields(cls) if f.init} - {"exploration"}
        bandit_keys = {kebab(f.name) for f in dataclasses.fields(BanditConfig) if f.init}
        for key, value in values.items():
            name = kebab(key)
            # a bandit- key the policy does not have is refused here, by the name typed:
            # refused by BanditConfig it was named without its prefix ('polcy'), and so
            # were the keys suggested, which this method does not take
            if name.startswith("bandit-") and name.removeprefix("bandit-") in bandit_keys:
                bandit[name.removeprefix("bandit-")] = value
            elif name == "exploration":
                raise ConfigError("set the exploration policy with bandit-<key>=value keys")
            elif name not in own_keys:
                every = [*sorted(own_keys), *(f"bandit-{k}" for k in sorted(bandit_keys))]
                close = (
                    [f"bandit-{name}"]
                    if name in bandit_keys
                    else difflib.get_close_matches(name, every, n=3)
                )
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                valid = ", ".join(every)
                raise ConfigError(f"unknown device config key {key!r}{hint} (valid: {valid})")
            else:
                own[name] = value
        # one validation with the policy in place: checked against the default policy
        # first, a smaller candidate-pool was refused even with a smaller bandit-top-n
        return from_flat(cls, own, built={"exploration": from_flat(BanditConfig, bandit)})

    def __post_init__(self) -> None:
        if not self.allow_remote and not _is_loopback(self.host):
            raise ConfigError(
                f"host {self.host!r} is not a loopback address; the local API serves this "
                f"user's data, so it binds to 127.0.0.1 by default. Add --config "
                f"allow-remote=true only if it must be reachable from the network (and put TLS "
                f"in front of it)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535] (0 = any free port), got {self.port}")
        for name in (
            "max_batch",
            "candidate_pool",
            "keep_models",
            "max_impressions",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        # checked here, not only by the API's own config: that one is built when the API
        # starts, after the store (and the SuperNode) already did
        if self.max_body_bytes < MIN_BODY_BYTES:
            raise ConfigError(
                f"max-body-bytes must be >= {MIN_BODY_BYTES} (the local API refuses request "
                f"bodies over it), got {self.max_body_bytes}"
            )
        if not isinstance(self.exploration, BanditConfig):
            raise ConfigError(
                f"exploration must be a BanditConfig, got {type(self.exploration).__name__}"
            )
        if self.exploration.slate_size > MAX_K:
            raise ConfigError(
                f"bandit-slate-size ({self.exploration.slate_size}) is above the largest slate "
                f"the API serves (k <= {MAX_K}); use at most {MAX_K}"
            )
        if self.exploration.max_pending < MAX_K:
            raise ConfigError(
                f"bandit-max-pending ({self.exploration.max_pending}) is below the largest "
                f"slate the API serves (k <= {MAX_K}): a slate that large would expire its own "
                f"impressions before their feedback; use at least {MAX_K}"
            )
        least = max(MAX_K, self.exploration.max_pending)
        if self.max_impressions < least:
            raise ConfigError(
                f"max-impressions ({self.max_impressions}) is below {least}, the largest slate "
                f"(k <= {MAX_K}) or the impressions the exploration policy keeps waiting "
                f"(bandit-max-pending {self.exploration.max_pending}): the store would expire "
                "impressions whose feedback is still valid and refuse it; use at least "
                f"{least}"
            )
        if self.exploration.top_n > self.candidate_pool:
            raise ConfigError(
                f"bandit-top-n ({self.exploration.top_n}) exceeds candidate-pool "
                f"({self.candidate_pool}): the policy re-ranks the daemon's candidates; raise "
                f"candidate-pool or lower bandit-top-n"
            )
        check_budget(
            self.privacy_epsilon, self.privacy_delta, names=("privacy-epsilon", "privacy-delta")
        )
        # NaN passes a plain comparison: a NaN wait returns at once (a busy loop)
        if not 0 <= self.shutdown_grace_s <= MAX_WAIT_S:
            raise ConfigError(
                f"shutdown-grace-s must be in [0, {MAX_WAIT_S:g}] seconds, "
                f"got {self.shutdown_grace_s}"
            )
        if not 0 < self.monitor_interval_s <= MAX_WAIT_S:
            raise ConfigError(
                f"monitor-interval-s must be in (0, {MAX_WAIT_S:g}] seconds, "
                f"got {self.monitor_interval_s}"
            )
        if self.max_log_bytes < MIN_LOG_BYTES:
            raise ConfigError(
                f"max-log-bytes must be >= {MIN_LOG_BYTES} (a trimmed log keeps half of it, "
                f"where the daemon reads why its SuperNode ended), got {self.max_log_bytes}"
            )
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise ConfigError(
                f"log-level must be one of {', '.join(levels)}, got {self.log_level!r}"
            )
