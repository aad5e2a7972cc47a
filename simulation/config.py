"""The simulation's one typed config: every knob, its default, and its validation.

Every key is a ``fedrec simulate`` flag (``--adapt-lr``; help by topic in
:mod:`simulation.config_help`) and a ``--run-config "key=value"`` entry (kebab-case). The
defaults are the quick preset: the embedded synthetic world, finishing in a few minutes on
2 CPUs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

from server.server_app import ServerConfig, check_client_resources
from server.server_optimizer import ServerOptimizerSettings
from shared.config import check_rounds, kebab, to_flat
from shared.data.provenance import DataProvenance
from shared.data.registry import check_no_data_dir, dataset_key
from shared.data.synthetic import check_world_size
from shared.errors import ConfigError
from shared.eval.protocol import DEFAULT_SHOTS
from shared.eval.splits import SplitConfig
from shared.federated.local_config import LocalTrainConfig, check_noise_shares
from shared.federated.round_caps import (
    MAX_ROUND_EPSILON,
    MAX_ROUND_STEPS,
    check_round_caps,
)
from shared.federated.student_config import StudentTaskConfig, check_client_counts
from shared.federated.task import STUDENT_TASK, RunConfigValue
from shared.io import check_file_name, home_path
from shared.models.ensemble import DEFAULT_MEMBERS
from shared.models.epochs import STUDENT_EPOCHS, TEACHER_EPOCHS
from shared.models.history_order import DEFAULT_ORDER, ORDERS
from shared.models.item_factors import DEFAULT_ID_INIT, ID_INITS, MAX_DENSE_ITEMS
from shared.models.item_prior import DEFAULT_PRIOR
from shared.privacy.budget import USER_DP_CLIP, PrivacyBudget
from shared.text.encoder import resolve_model_dir

RAY_ONLY = ("num-cpus-per-client", "num-gpus-per-client", "ray-address")
"""The settings only Flower's simulation engine (``backend=ray``) reads."""

RECS_MODELS = (
    "student-int8",
    "student-personal",
    "student-adapted",
    "student-federated",
    "student-pretrained",
    "teacher",
    "ease-all",
    "ease-public",
    "pop",
)
"""The models whose top 100 a run can export (``export-recs``): ``recs.csv`` for the device
model (``student-int8``), ``recs-<model>.csv`` for each other one; a model with few-shot
figures (``student-adapted``, ``student-federated`` unadapted, ``ease-all`` fold-in, ``pop``)
also gets ``recs[-<model>]-fewshot-k<K>.csv`` per K (``student-adapted`` has few-shot figures
only, so only those)."""

APP_KEYS_SET_BY_SIMULATION: dict[str, str] = {
    "task": "always the distilled student (STUDENT_TASK)",
    "num-rounds": "the simulation's rounds",
    "bundle": "the run's own bundle.pt, written after pretraining",
    "bundle-sha256": "unchecked: the virtual clients load the bundle this run wrote",
    "state-dir": "the run directory's clients/ folder",
    "checkpoint-dir": "the run directory's checkpoints/ folder",
    "artifact-dir": "the run directory's models/ folder with publish-each-round, else none",
    "artifact-keep": "0: a run directory keeps every model it published",
    "population-size": "the federated clients of the split (known only after it)",
    "min-available-clients": "every federated client: the virtual clients are all there",
    "availability-timeout": "unused: every virtual client is connected before round 1, so "
    "no round waits for clients to connect",
    "cohort-fraction": "unused: cohort-size is always a count (>= 1, capped at the clients), "
    "so the server never falls back to a share of them",
    "eval-fraction": "follows eval-size (0 turns federated evaluation off)",
    "eval-seed": "the run's seed, as the final evaluation's negatives",
}
"""The keys the Flower apps read (:class:`~server.server_app.ServerConfig`,
:class:`~shared.federated.local_config.LocalTrainConfig`,
:class:`~shared.federated.student_config.StudentTaskConfig`) that are not settings of the
simulation, and why: the simulation sets them itself (:meth:`SimulationConfig.server_run_config`,
the pipeline's run files). Every other key the apps read is a setting (a test keeps it so)."""

RESUMABLE_KEYS = frozenset(
    {
        "rounds",  # a rerun with more rounds continues the run
        "eval-size",
        "eval-negatives",  # the per-round federated evaluation only
        "round-timeout",
        "num-threads",
        "shots",
        "adapt-steps",
        "adapt-lr",
        "secagg-timeout",
        "backend",
        "num-cpus-per-client",
        "num-gpus-per-client",
        "ray-address",
        "device",
        "run-dir",
        "name",
        "cache-dir",
        "publish-each-round",
        "checkpoint-keep",
        "progress",
        "export-recs",
        # gates a client checks before each round, not how it trains: the fix a decline
        # names is to raise them for the rest of the run
        "max-round-steps",
        "max-round-epsilon",
    }
)
"""Keys a rerun of a run directory may change: how far it trains, how it is evaluated, and
where and how it runs. Any other change would resume the checkpoints and privacy ledgers
under settings they were not produced with (:meth:`simulation.run_dir.RunDirectory.claim`)."""


MAX_SYNTHETIC_USERS = 100_000
"""The most users a synthetic world may have. The world is generated and held in memory
(about 30 KB and 2 ms a user of the default 600 items: some 3 GB and minutes at this
bound; users x items is bounded too, by
:data:`shared.data.synthetic.MAX_WORLD_PAIRS`), and each of its users is
a virtual client; ten times MovieLens-1M's users is far past what the simulation needs, and a
typo such as ``1e10`` is refused at once instead of allocating until the machine gives out."""

MAX_SYNTHETIC_ITEMS = MAX_DENSE_ITEMS
"""The most items a synthetic world may have: the EASE baseline and the teacher's
co-occurrence start build dense ``items x items`` matrices (3.2 GB each at this bound)."""


def data_dir_key(data_dir: str) -> str:
    """The absolute form of a folder setting (``data-dir``, ``text-model``; ``~`` expanded),
    or "" for none: ``x/``, ``./x`` and ``$PWD/x`` are one folder, and a relative path read
    from another working directory is another one."""
    return str(home_path(data_dir).resolve()) if data_dir else ""


@dataclass(frozen=True)
class SimulationConfig:
    """Data, pretraining, federation, privacy, runtime and output of one simulation run."""

    # data and split
    dataset: str = "synthetic"
    data_dir: str = ""
    seed: int = 42
    synthetic_users: int = 1000
    synthetic_items: int = 600
    cold_user_fraction: float = 0.1
    public_fraction: float = 0.2
    # pretraining (server side; cached)
    # caps; early stopping on the public users' validation ends pretraining at the best epoch
    teacher_epochs: int = TEACHER_EPOCHS
    student_epochs: int = STUDENT_EPOCHS
    teacher_id_init: str = DEFAULT_ID_INIT
    teacher_order: str = DEFAULT_ORDER
    teacher_members: int = DEFAULT_MEMBERS
    # add EASE's item-item term to the teacher, its weight chosen on validation (0 allowed)
    teacher_prior: bool = DEFAULT_PRIOR
    # local Hugging Face model directory encoding the item text ("" = the bundled MiniLM)
    text_model: str = ""
    # federation
    rounds: int = 10
    cohort_size: int = 50
    min_cohort: int = ServerConfig.min_cohort  # capped at the cohort
    eval_size: int = 50
    secagg: bool = True
    secagg_num_shares: int | float = 3  # a count, or a fraction of the cohort (as the server's)
    secagg_reconstruction_threshold: int | float = 2
    secagg_clipping_range: float = 8.0
    secagg_timeout: float = 300.0  # 0 = no timeout
    # the server's (defaults: ServerConfig, the one place for them)
    secagg_quantization_range: int = ServerConfig.secagg_quantization_range
    secagg_modulus_range: int = ServerConfig.secagg_modulus_range
    secagg_max_weight: float = ServerConfig.secagg_max_weight
    round_timeout: float = ServerConfig.round_timeout  # 0 = wait for every reply
    update_clip_norm: float = ServerConfig.update_clip_norm  # 0 = none fixed
    # without SecAgg+ and user-dp, and update-clip-norm 0: clip to this x the round's median norm
    update_clip_median_multiple: float = ServerConfig.update_clip_median_multiple
    # client training and record-level DP (defaults: LocalTrainConfig, the one place for them)
    dp: bool = LocalTrainConfig.dp
    noise_multiplier: float = LocalTrainConfig.noise_multiplier
    max_grad_norm: float = LocalTrainConfig.max_grad_norm
    epsilon_budget: float = PrivacyBudget.epsilon
    delta: float = PrivacyBudget.delta
    # each client's caps on one round (defaults: shared.federated.round_caps)
    max_round_steps: int = MAX_ROUND_STEPS
    max_round_epsilon: float = MAX_ROUND_EPSILON
    # user-level DP (server noise on the clipped, weight-1 updates; delta 0 = 1 / clients)
    user_dp: bool = False
    user_dp_noise_multiplier: float = 1.0
    user_dp_clip: float = USER_DP_CLIP
    user_dp_delta: float = 0.0
    user_dp_epsilon_budget: float = PrivacyBudget.epsilon
    local_epochs: int = LocalTrainConfig.local_epochs
    batch_size: int = LocalTrainConfig.batch_size
    lr: float = LocalTrainConfig.lr
    momentum: float = LocalTrainConfig.momentum
    max_examples: int = LocalTrainConfig.max_examples
    personal_steps: int = LocalTrainConfig.personal_steps
    personal_lr: float = LocalTrainConfig.personal_lr
    # > 1: distributed record-level DP (each client adds 1/m of the noise; needs SecAgg+)
    noise_shares: int = LocalTrainConfig.noise_shares
    # the window's own items out of the next-item softmax (clients, personal and few-shot fits)
    exclude_seen: bool = LocalTrainConfig.exclude_seen
    meta_learning: bool = False
    # the clients' per-round evaluation and threads (defaults: StudentTaskConfig)
    eval_negatives: int = StudentTaskConfig.eval_negatives
    num_threads: int = StudentTaskConfig.num_threads
    # the server's optimiser (server/server_optimizer.py): FedAvg or FedAdam
    server_optimizer: str = ServerOptimizerSettings.kind
    server_lr: float = ServerOptimizerSettings.lr
    server_beta1: float = ServerOptimizerSettings.beta1
    server_beta2: float = ServerOptimizerSettings.beta2
    server_tau: float = ServerOptimizerSettings.tau
    # few-shot
    shots: tuple[int, ...] = DEFAULT_SHOTS
    adapt_steps: int = 10
    adapt_lr: float = 0.001
    # runtime
    backend: str = "ray"
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_address: str = ""
    device: str = "auto"
    # output
    run_dir: str = "runs"
    name: str = ""
    cache_dir: str = ""
    publish_each_round: bool = False
    # magnitude pruning of every published model (0 = none; see publish_prune)
    prune_sparsity: float = 0.0
    checkpoint_keep: int = 3  # the newest checkpoints kept in checkpoints/ (server default)
    progress: bool = True
    export_recs: tuple[str, ...] = ("student-int8",)

    def recs_exports(self) -> tuple[str, ...]:
        """The models ``export-recs`` names, ``all`` expanded, each once, in
        :data:`RECS_MODELS` order; ``none`` (alone) or an empty list: none."""
        if "none" in self.export_recs:
            return ()
        wanted = set(RECS_MODELS) if "all" in self.export_recs else set(self.export_recs)
        return tuple(m for m in RECS_MODELS if m in wanted)

    def __post_init__(self) -> None:
        check_rounds(self.rounds, "rounds")
        if self.cohort_size < 1:
            raise ConfigError(f"cohort-size must be >= 1, got {self.cohort_size}")
        if self.eval_size < 0:
            raise ConfigError(f"eval-size must be >= 0, got {self.eval_size}")
        if self.secagg and self.cohort_size < 2:
            raise ConfigError("SecAgg+ needs cohort-size >= 2 (or set secagg=false)")
        if self.backend not in ("ray", "inprocess"):
            raise ConfigError(f"backend must be 'ray' or 'inprocess', got {self.backend!r}")
        if self.backend == "ray":  # before pretraining: Ray would wait forever on them
            check_client_resources(
                self.num_cpus_per_client, self.num_gpus_per_client, attach=bool(self.ray_address)
            )
        else:
            self._check_no_ray_settings()
        if self.teacher_epochs < 1 or self.student_epochs < 1:
            raise ConfigError("teacher-epochs and student-epochs must be >= 1")
        if self.teacher_order not in ORDERS:
            raise ConfigError(
                f"teacher-order must be one of {', '.join(map(repr, ORDERS))}, "
                f"got {self.teacher_order!r}"
            )
        if self.teacher_members < 1:
            raise ConfigError(f"teacher-members must be >= 1, got {self.teacher_members}")
        if self.teacher_id_init not in ID_INITS:
            raise ConfigError(
                f"teacher-id-init must be {' or '.join(map(repr, ID_INITS))}, "
                f"got {self.teacher_id_init!r}"
            )
        self.local_train_config()  # the client-training knobs, checked where they are defined
        check_round_caps(self.max_round_steps, self.max_round_epsilon)
        check_client_counts(self.num_threads, self.eval_negatives)
        self.server_optimizer_settings()
        check_noise_shares(
            self.noise_shares, secure_aggregation=self.secagg, cohort_size=self.cohort_size
        )
        # one spelling everywhere (the pipeline tells the synthetic world by its name)
        object.__setattr__(self, "dataset", dataset_key(self.dataset))
        check_no_data_dir(self.dataset, self.data_dir)
        if self.text_model:  # one spelling, as data-dir's: a resumed run compares it
            model_dir = resolve_model_dir(self.text_model, setting="text-model")
            object.__setattr__(self, "text_model", str(model_dir))
        self.split_config()  # the split's fractions, checked where they are defined
        if not 1 <= self.synthetic_users <= MAX_SYNTHETIC_USERS:
            raise ConfigError(
                f"synthetic-users must be between 1 and {MAX_SYNTHETIC_USERS:,}, got "
                f"{self.synthetic_users}: the world is generated in memory (about 30 KB a "
                "user); give fewer users, or a MovieLens dataset (--dataset) for a larger one"
            )
        if not 2 <= self.synthetic_items <= MAX_SYNTHETIC_ITEMS:
            raise ConfigError(
                f"synthetic-items must be between 2 and {MAX_SYNTHETIC_ITEMS:,}, got "
                f"{self.synthetic_items}: the EASE baseline and the teacher's start build "
                "dense items x items matrices; give fewer items"
            )
        check_world_size(
            self.synthetic_users, self.synthetic_items, "synthetic-users x synthetic-items"
        )
        for key in ("run_dir", "cache_dir"):  # `~` in a --run-config value too
            if getattr(self, key):  # "" stays "" (refused, or the default), not "."
                object.__setattr__(self, key, str(home_path(getattr(self, key))))
        # one spelling of the data's folder (a resumed run compares it: `x/` and `./x` are x)
        object.__setattr__(self, "data_dir", data_dir_key(self.data_dir))
        if not self.run_dir.strip():
            raise ConfigError("run-dir must not be empty; give the folder that holds the runs")
        for key, value in (("cache-dir", self.cache_dir), ("name", self.name)):
            if value and not value.strip():  # a folder named by blanks, in the current one
                raise ConfigError(f"{key} must not be blank; omit it for the default")
        check_file_name(self.name, "name (a folder inside run-dir)")
        if not self.shots:
            raise ConfigError("shots must list at least one K (e.g. shots=[1,3,5,10])")
        if any(k < 1 for k in self.shots):
            raise ConfigError(f"shots must be positive, got {self.shots}")
        if len(set(self.shots)) != len(self.shots):  # each K is reported once
            raise ConfigError(f"shots must be distinct, got {self.shots}")
        if self.adapt_steps < 0:
            raise ConfigError(
                f"adapt-steps must be >= 0 (0: no adaptation), got {self.adapt_steps}"
            )
        if not (math.isfinite(self.adapt_lr) and self.adapt_lr > 0):
            raise ConfigError(f"adapt-lr must be a positive number, got {self.adapt_lr}")
        unknown = [m for m in self.export_recs if m not in (*RECS_MODELS, "all", "none")]
        if unknown:
            raise ConfigError(
                f"export-recs: unknown model {unknown[0]!r}; choose among "
                f"{', '.join(RECS_MODELS)}, 'all' or 'none'"
            )
        if "none" in self.export_recs and len(set(self.export_recs)) > 1:
            raise ConfigError(
                f"export-recs: 'none' cannot be given with models, got {list(self.export_recs)}"
            )
        from shared.compression.prune import publish_prune  # here: it imports torch

        publish_prune(self.prune_sparsity)  # before pretraining, not when the first model ships
        if self.ray_address and not re.fullmatch(
            r"auto|(ray://)?(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", self.ray_address
        ):
            raise ConfigError(
                f"ray-address must be HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT or auto, "
                f"got {self.ray_address!r}"
            )
        # under Ray the form only: whether that GPU exists is checked where the clients train
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.backend == "ray":
            self._check_device_under_ray()
        else:
            self._check_device_in_process()
        self._check_apps_accept()

    def _check_no_ray_settings(self) -> None:
        """Refuse Ray's settings under ``backend=inprocess``: its clients are threads of this
        process, so they would be recorded in the run's config.json and have no effect."""
        given = [
            kebab(f.name)
            for f in fields(self)
            if kebab(f.name) in RAY_ONLY and getattr(self, f.name) != f.default
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} only apply to backend=ray (Flower's simulation engine); "
                "backend=inprocess runs the clients as threads of this process: drop "
                f"{'it' if len(given) == 1 else 'them'} or use --backend ray"
            )

    def _check_device_under_ray(self) -> None:
        """Refuse a CUDA device the Ray clients could not see. Ray hides every GPU from an
        actor that reserves none, and shows one that reserves a share only the GPU it was
        given, as ``cuda:0``; the clients would otherwise all fail in their first round."""
        if not self.device.startswith("cuda"):
            return
        if self.num_gpus_per_client == 0:
            raise ConfigError(
                f"device={self.device} needs a GPU share per client: Ray hides the GPUs from "
                "clients that reserve none. Add --num-gpus-per-client (e.g. 0.25: four "
                "clients share one GPU), or use device=auto"
            )
        if self.device not in ("cuda", "cuda:0"):
            raise ConfigError(
                f"device={self.device}: under Ray each client sees only the GPU Ray gave it, "
                "as cuda:0; use device=cuda (Ray spreads the clients over the GPUs)"
            )

    def _check_device_in_process(self) -> None:
        """Refuse a GPU this machine lacks under ``backend=inprocess``: the clients train in
        this process, so each would refuse it in every round (after pretraining), and the run
        would end "successfully" with the pretrained model reported as the federated one."""
        from shared.federated.student_task import resolve_device  # torch, as the clients'

        resolve_device(self.device)

    def server_run_config(self, n_clients: int) -> dict[str, RunConfigValue]:
        """The ServerApp's and ClientApp's run config over ``n_clients`` virtual clients,
        without the run's files (bundle, checkpoint, artifact and state directories: empty,
        i.e. off, until the pipeline sets them)."""
        cohort = min(self.cohort_size, n_clients)
        return {
            "task": STUDENT_TASK,
            "num-rounds": self.rounds,
            "cohort-size": cohort,
            "min-cohort": min(self.min_cohort, cohort),
            "min-available-clients": n_clients,
            "eval-size": min(self.eval_size, n_clients),
            "eval-fraction": 1.0 if self.eval_size else 0.0,
            "seed": self.seed,
            # the per-round federated evaluation's negatives: seeded like the final one's, but
            # per client index, not per user, so they are not the same draws (it only tracks
            # progress; the final evaluation and model selection use the protocol's)
            "eval-seed": self.seed,
            "secagg": self.secagg,
            "secagg-num-shares": self.secagg_num_shares,
            "secagg-reconstruction-threshold": self.secagg_reconstruction_threshold,
            "secagg-clipping-range": self.secagg_clipping_range,
            "secagg-timeout": self.secagg_timeout,
            "secagg-quantization-range": self.secagg_quantization_range,
            "secagg-modulus-range": self.secagg_modulus_range,
            # the ServerApp uses 1 under DP, where every client weighs 1 (ServerConfig)
            "secagg-max-weight": self.secagg_max_weight,
            "round-timeout": self.round_timeout,
            "update-clip-norm": self.update_clip_norm,
            "update-clip-median-multiple": self.update_clip_median_multiple,
            "bundle": "",
            "checkpoint-dir": "",
            "checkpoint-keep": self.checkpoint_keep,
            "artifact-dir": "",
            "artifact-keep": 0,  # a run directory keeps every model it published
            "state-dir": "",
            "epsilon-budget": self.epsilon_budget,
            "delta": self.delta,
            "max-round-steps": self.max_round_steps,
            "max-round-epsilon": self.max_round_epsilon,
            # every client-training knob, from the one object that defines them (each client
            # re-seeds its own rounds, so the base seed is not sent)
            **{k: v for k, v in to_flat(self.local_train_config()).items() if k != "seed"},
            "meta-learning": self.meta_learning,
            "eval-negatives": self.eval_negatives,
            "num-threads": self.num_threads,
            "device": self.device,
            "prune-sparsity": self.prune_sparsity,
            **self.server_optimizer_settings().run_config(),
            "user-dp": self.user_dp,
            "user-dp-noise-multiplier": self.user_dp_noise_multiplier,
            "user-dp-clip": self.user_dp_clip,
            "user-dp-delta": self.user_dp_delta,
            "user-dp-epsilon-budget": self.user_dp_epsilon_budget,
            "population-size": n_clients,
        }

    def _check_apps_accept(self) -> None:
        """Build the server's and the clients' typed configs from this run config now, so
        a bad privacy or SecAgg+ setting stops the command before data, text encoding and
        pretraining rather than after them. The population is not known yet: the smallest
        that fits the cohort stands in (the pipeline caps the cohort at the population)."""
        PrivacyBudget(self.epsilon_budget, self.delta)
        ServerConfig.from_run_config(self.server_run_config(max(self.cohort_size, 2)))

    def unrecorded_defaults(self) -> dict[str, Any]:
        """What a run directory ran with for each setting its ``config.json`` does not record
        (written before the setting existed), to compare this rerun's settings with
        (:meth:`simulation.run_dir.RunDirectory.check_settings`): today's default, except
        for a setting added with a default that changes what the code did before it.

        ``update-clip-median-multiple``: before it, the server clipped no update to a
        multiple of its round's median norm, which is 0 where that clipping applies (plain
        FedAvg without user-level DP or a fixed ``update-clip-norm``); compared with its
        default of 5, a resumed run switched the clipping on half way and recorded 5 for
        all of it. Elsewhere it clips nothing, so any value is what the run ran with.

        (``max-round-steps`` and ``max-round-epsilon``, added with it, are
        :data:`RESUMABLE_KEYS`: a rerun may set them, so what a run ran with is not
        compared.)"""
        defaults = to_flat(SimulationConfig())
        median_clipping = not self.secagg and not self.user_dp and self.update_clip_norm == 0
        defaults["update-clip-median-multiple"] = (
            0.0 if median_clipping else self.update_clip_median_multiple
        )
        return defaults

    def split_config(self) -> SplitConfig:
        """The protocol split of this simulation (validated by :class:`SplitConfig`)."""
        return SplitConfig(
            seed=self.seed,
            cold_user_fraction=self.cold_user_fraction,
            public_fraction=self.public_fraction,
        )

    def data_provenance(self, data_fingerprint: str | None = None) -> DataProvenance:
        """The data and split this simulation pretrains with, as its bundles and published
        models record them (``fedrec evaluate model`` splits a model's data by them), with
        the content fingerprint of the data read, ``data_fingerprint``, when given."""
        return DataProvenance(
            data_fingerprint=data_fingerprint,
            dataset=dataset_key(self.dataset),
            seed=self.seed,
            cold_user_fraction=self.cold_user_fraction,
            public_fraction=self.public_fraction,
            **(
                {"synthetic_users": self.synthetic_users, "synthetic_items": self.synthetic_items}
                if dataset_key(self.dataset) == "synthetic"
                else {}
            ),
        )

    def server_optimizer_settings(self) -> ServerOptimizerSettings:
        """The server's optimiser in this simulation (validated where it is defined)."""
        return ServerOptimizerSettings.of(self)

    def local_train_config(self) -> LocalTrainConfig:
        """How a client trains in this simulation (validated by :class:`LocalTrainConfig`)."""
        return LocalTrainConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            dp=self.dp,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            personal_steps=self.personal_steps,
            personal_lr=self.personal_lr,
            max_examples=self.max_examples,
            noise_shares=self.noise_shares,
            exclude_seen=self.exclude_seen,
        )
