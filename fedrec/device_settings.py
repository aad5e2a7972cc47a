"""One line of help per setting of the device daemon, by topic: ``fedrec client start`` and
``fedrec client serve-api`` list each as a flag named like its ``--config`` key
(``--candidate-pool`` is ``candidate-pool``, ``--bandit-policy`` is ``bandit-policy``).

The settings are the fields of :class:`~client.device.config.DaemonConfig` and, prefixed
``bandit-``, of its exploration policy (:class:`~shared.bandits.policies.BanditConfig`). A
test keeps this table equal to them, less ``host`` and ``port`` (flags of their own).
"""

from __future__ import annotations

#: Settings the commands declare themselves.
NOT_FLAGS = frozenset({"host", "port", "exploration"})

DAEMON_SETTINGS_HELP: dict[str, dict[str, str]] = {
    "Local API": {
        "allow_remote": "Let --host be a non-loopback address (put TLS in front of it).",
        "max_batch": "Most events or feedback entries per request (413 beyond).",
        "max_body_bytes": "Largest request body in bytes (413 beyond).",
        "log_level": "The API server's log level: critical, error, warning, info, debug, trace.",
    },
    "Serving and storage": {
        "candidate_pool": "Model candidates the exploration policy re-ranks.",
        "keep_models": "Sealed model versions kept on disk (and the newest global one while a "
        "personal model serves).",
        "max_impressions": "Recommended items remembered for feedback checks.",
    },
    "Privacy": {
        "privacy_epsilon": "The record-level epsilon budget /status reports (and, if smaller "
        "than --max-epsilon, the one training spends by).",
        "privacy_delta": "The largest record-level delta training uses (caps the server's delta), "
        "and the one /status reports epsilon at until the first round's ledger.",
    },
    "Processes": {
        "shutdown_grace_s": "Seconds the managed processes get to stop before they are killed.",
        "monitor_interval_s": "Seconds between checks of the managed processes.",
        "max_log_bytes": "Most bytes logs/supernode.log holds; beyond, its oldest lines are "
        "dropped (the newest half kept).",
    },
    "Exploration (re-ranking policy)": {
        "bandit_policy": "greedy, epsilon_greedy, linucb or thompson.",
        "bandit_epsilon": "epsilon-greedy: chance a slate slot is a random candidate.",
        "bandit_alpha": "LinUCB: width of the upper confidence bound.",
        "bandit_thompson_scale": "Thompson: scale of the posterior sample.",
        "bandit_prior_variance": "Prior variance of every weight (larger trusts clicks sooner).",
        "bandit_score_prior": "Prior weight of the model score (an untrained policy ranks "
        "like the model).",
        "bandit_mmr_lambda": "Diversity trade-off: 1 = off, 0 = pure diversity.",
        "bandit_top_n": "The policy re-ranks the model's top N candidates.",
        "bandit_slate_size": "Items per slate: what GET /recommendations serves without k.",
        "bandit_feature_dim": "Item features per candidate.",
        "bandit_max_feature_norm": "Context vectors longer than this are scaled down to it.",
        "bandit_reward_min": "Rewards below are clipped up.",
        "bandit_reward_max": "Rewards above are clipped down.",
        "bandit_max_pending": "Impressions kept waiting for feedback (>= 100, the largest slate).",
        "bandit_refresh_every": "Recompute the posterior by Cholesky after this many updates.",
        "bandit_seed": "Seed of the policy's own generator (benchmarks; a device explores with "
        "fresh randomness).",
    },
}
