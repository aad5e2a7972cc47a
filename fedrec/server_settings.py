"""One line of help per setting of a deployment's run, by topic: ``fedrec server start``
lists each as a flag named like its run-config key (``--noise-multiplier`` is
``noise-multiplier``).

The run's settings are read by three apps: the ServerApp
(:class:`~server.server_app.ServerConfig`), the devices' training
(:class:`~shared.federated.local_config.LocalTrainConfig`) and the student task
(:class:`~shared.federated.student_config.StudentTaskConfig`). A test keeps this table equal to
their fields, less the few the command sets itself. A setting that ``fedrec simulate`` has
too takes its help from :data:`simulation.config_help.SETTINGS_HELP`, so the two commands
describe it in the same words.
"""

from __future__ import annotations

from simulation.config_help import SETTINGS_HELP

_SIMULATE = {name: text for topic in SETTINGS_HELP.values() for name, text in topic.items()}


def _same(*names: str) -> dict[str, str]:
    return {name: _SIMULATE[name] for name in names}


#: Fields the command sets itself: from the state directory (``checkpoint-dir``,
#: ``artifact-dir``, ``state-dir``), from ``--bundle`` (``bundle``, its ``bundle-sha256``,
#: and the student ``task``), ``--rounds`` and ``--min-clients``.
NOT_FLAGS = frozenset(
    {
        "task",
        "bundle",
        "bundle_sha256",
        "state_dir",
        "checkpoint_dir",
        "artifact_dir",
        "num_rounds",
        "min_available_clients",
    }
)

#: Defaults a deployment uses where the dataclasses' differ (SecAgg+ is on unless turned off).
DEPLOYMENT_DEFAULTS = {"secagg": True}

START_SETTINGS_HELP: dict[str, dict[str, str]] = {
    "Rounds and cohorts": {
        "cohort_size": "Devices sampled per round (0 = cohort-fraction of those connected).",
        "cohort_fraction": "Share of the connected devices sampled when cohort-size is 0.",
        "min_cohort": "Fewest devices a cohort-fraction cohort samples (at most --min-clients); "
        "under SecAgg+ also the fewest updates whose sum is unmasked.",
        "eval_size": "Devices asked to evaluate per round (0 = eval-fraction of them).",
        "eval_fraction": "Share of the devices asked to evaluate when eval-size is 0.",
        **_same("round_timeout"),
        "availability_timeout": "Seconds between the warnings of a round waiting for --min-clients "
        "devices to connect (it starts once they are); the most an evaluation waits.",
        "update_clip_norm": "L2 bound of a device's update (0 = none fixed).",
        **_same("update_clip_median_multiple"),
        "population_size": "Devices that can be sampled (0 = those connected at the start).",
        "seed": "Seed of the cohort sampling (the devices' DP noise stays secret, and so do "
        "user-level DP's training cohorts).",
    },
    "Secure aggregation (SecAgg+)": {
        **_same(
            "secagg",
            "secagg_num_shares",
            "secagg_reconstruction_threshold",
            "secagg_timeout",
            "secagg_clipping_range",
            "secagg_quantization_range",
            "secagg_modulus_range",
        ),
        "secagg_max_weight": "Largest example count a device may weigh its update by "
        "(without DP: under --dp every device weighs 1, and it is 1).",
    },
    "Server optimiser, checkpoints and published models": {
        **_same("server_optimizer", "server_lr", "server_beta1", "server_beta2", "server_tau"),
        "checkpoint_keep": "How many of the newest round checkpoints to keep.",
        "artifact_keep": "How many of the newest published models to keep in artifacts/ "
        "(0 = all); older ones are removed after each publication, and their versions "
        "stay recorded in artifacts/published.jsonl, never reused.",
        **_same("prune_sparsity"),
    },
    "Device training and record-level DP": {
        **_same(
            "dp",
            "noise_multiplier",
            "max_grad_norm",
            "epsilon_budget",
            "delta",
            "max_round_steps",
            "max_round_epsilon",
            "noise_shares",
            "local_epochs",
            "batch_size",
            "lr",
        ),
        "momentum": "Momentum of the devices' local SGD.",
        "max_examples": "Most recent next-item examples a device trains on.",
        **_same("personal_steps", "personal_lr", "exclude_seen", "meta_learning", "device"),
        "num_threads": "Torch threads a device's training uses.",
    },
    "Federated evaluation": {
        "eval_negatives": "Sampled negatives per evaluated item.",
        "eval_seed": "Seed of those negatives.",
    },
    "User-level DP (server noise)": _same(
        "user_dp",
        "user_dp_noise_multiplier",
        "user_dp_clip",
        "user_dp_delta",
        "user_dp_epsilon_budget",
    ),
}
