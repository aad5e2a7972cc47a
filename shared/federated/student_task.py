"""The recommender's :class:`~shared.federated.task.FederatedTask`: the distilled student's
global parameters travel; each client trains them with Opacus DP-SGD on its own sequence,
keeps its privacy ledger on disk, and declines once its budget is spent.

Run-config keys (kebab-case): ``bundle`` (pretrained bundle path), ``state-dir`` (per-client
ledgers), ``epsilon-budget``, ``delta``, ``max-round-steps``, ``max-round-epsilon`` (a round
past either is declined: :mod:`shared.federated.round_caps`), ``meta-learning``, ``device``,
``eval-negatives``, ``eval-seed``, ``num-threads``, ``prune-sparsity``, plus every
:class:`~shared.federated.local_config.LocalTrainConfig` key.

**The personal adapter is not trained here.** Fit and evaluate see the global model as a
device serves it to a newcomer (the adapter at its initialization). A device fits its own
adapter against the global model it serves, from the initialization, whenever that model or
its history changes (:func:`~shared.federated.local_training.fit_personal`; the daemon's
``DeviceLearner``, and the simulation's evaluation): an adapter carried across rounds was
fitted against an older global model and cost accuracy (``docs/parameters.md``).

**Two modes.** Plain (default): FedAvg (or FedAdam) over the global parameters; the adapter's
initialization is the identity. **Meta-learning** (``meta-learning=true``, Reptile-style;
Nichol et al. 2018, Jiang et al. 2019): the *initialization* of the personal adapter is also a
global parameter. Each client trains it, together with the global parameters, from the shared
value with DP-SGD (its change is released, so it is clipped and noised like the rest), and the
server's average of those changes is the Reptile step. A device's adapter then starts from the
learned initialization instead of the identity, which is what few-shot adaptation benefits
from."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.compression.prune import publish_prune
from shared.config import field_names, from_flat, kebab
from shared.errors import (
    ConfigError,
    DataError,
    PrivacyBudgetExceededError,
    RoundCapExceededError,
)
from shared.eval.metrics import hit_rate_at_k, ndcg_at_k, rank_of_target
from shared.eval.protocol import sample_negatives
from shared.federated.bundle import Bundle, ClientData, check_bundle_digest, load_bundle
from shared.federated.local_config import LocalTrainConfig, noise_shares_clip_problem
from shared.federated.local_training import (
    check_items,
    dp_epoch_steps,
    dp_sample_rate,
    round_steps,
    train_global_dp,
)
from shared.federated.round_caps import check_round_steps
from shared.federated.student_config import StudentTaskConfig
from shared.federated.task import (
    CONFIG_UNDER_SECAGG,
    CONFIG_UPDATE_CLIP_NORM,
    DECLINE_PRIVACY_BUDGET,
    Arrays,
    ConfigValue,
    EvalOutcome,
    FitOutcome,
    RunConfig,
    server_round,
)
from shared.federated.validation import validate_update
from shared.io import exclusive_lock
from shared.models.sequence import module_device, pad_histories
from shared.models.student import StudentModel
from shared.privacy.ledger import PrivacyBudget, PrivacyLedger, Spend
from shared.training.device import check_device_name as check_device_name  # re-exported
from shared.training.device import resolve_device


def global_names(model: StudentModel) -> list[str]:
    """The fixed order of the global parameters on the wire."""
    return sorted(model.named_parameter_groups()["global"])


def adapter_names(model: StudentModel) -> list[str]:
    """The personal adapter's parameters, in wire order (meta-learning mode only)."""
    return sorted(model.named_parameter_groups()["personal"])


def get_global_arrays(model: StudentModel, meta: bool = False) -> Arrays:
    """The arrays on the wire: the global parameters, then with ``meta`` the adapter (which
    then holds the meta-learned initialization)."""
    state = model.global_state_dict()
    out = [state[name].cpu().numpy().astype(np.float32) for name in global_names(model)]
    if meta:
        personal = model.named_parameter_groups()["personal"]
        out += [personal[n].detach().cpu().numpy().astype(np.float32) for n in adapter_names(model)]
    return out


def check_array_count(model: StudentModel, arrays: Arrays, meta: bool = False) -> None:
    """:class:`DataError` unless ``arrays`` has one array per global parameter (plus the
    adapter initialization with ``meta``)."""
    names = global_names(model)
    extra = adapter_names(model) if meta else []
    if len(arrays) != len(names) + len(extra):
        raise DataError(
            f"expected {len(names) + len(extra)} arrays ({len(names)} global"
            f"{f' + {len(extra)} adapter initialization' if meta else ''}), got {len(arrays)}"
        )


def set_global_arrays(model: StudentModel, arrays: Arrays, meta: bool = False) -> None:
    """Inverse of :func:`get_global_arrays`, leaving the model as a newcomer is served it:
    the adapter at its initialization, i.e. the one carried at the end with ``meta``, else the
    identity (a personal adapter is fitted afterwards, against these parameters, by
    :func:`~shared.federated.local_training.fit_personal`)."""
    check_array_count(model, arrays, meta)
    names = global_names(model)
    device = module_device(model)
    model.load_global_state_dict(
        {
            n: torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
            for n, a in zip(names, arrays[: len(names)], strict=True)
        }
    )
    if meta:
        set_adapter_arrays(model, arrays[len(names) :])
    else:
        model.adapter.reset()


def set_adapter_arrays(model: StudentModel, arrays: Arrays) -> None:
    """Set the personal adapter from its wire arrays (:func:`adapter_names` order)."""
    names = adapter_names(model)
    if len(arrays) != len(names):
        raise DataError(f"expected {len(names)} adapter arrays, got {len(arrays)}")
    personal = model.named_parameter_groups()["personal"]
    device = module_device(model)
    with torch.no_grad():
        for n, a in zip(names, arrays, strict=True):
            value = torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)
            if value.shape != personal[n].shape:
                raise DataError(f"{n}: shape {tuple(value.shape)} != {tuple(personal[n].shape)}")
            personal[n].copy_(value)


class ClientState:
    """One client's on-disk state: its persistent privacy ledger.

    Open it under :meth:`StudentTask.client_lock`: a fit that outlived its round (a round
    timeout) may still run in another process when the next round trains the same client,
    and two ledgers read before either was written would keep only one of the two spends."""

    def __init__(self, root: Path, client_id: int, budget: PrivacyBudget) -> None:
        self.dir = root / f"client-{client_id}"
        self.ledger = PrivacyLedger.open(self.dir / "ledger.json", budget)


class StudentTask:
    """FederatedTask over the student. One instance per process serves many clients."""

    def __init__(self, config: StudentTaskConfig, train: LocalTrainConfig) -> None:
        self.config = config
        self.train_config = train
        self._bundle: Bundle | None = None
        self._lock = threading.Lock()
        self._budget = PrivacyBudget(config.epsilon_budget, config.delta)
        self._meta = config.meta_learning
        self._device = resolve_device(config.device)

    @classmethod
    def from_run_config(cls, run_config: RunConfig) -> StudentTask:
        values: dict[str, Any] = dict(run_config)
        own = {
            k: v for k, v in values.items() if k.replace("_", "-") in field_names(StudentTaskConfig)
        }
        local = {
            k: v for k, v in values.items() if k.replace("_", "-") in field_names(LocalTrainConfig)
        }
        return cls(from_flat(StudentTaskConfig, own), from_flat(LocalTrainConfig, local))

    # ------------------------------------------------------------------ helpers
    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:
            check_bundle_digest(self.config.bundle, self.config.bundle_sha256)
            bundle = load_bundle(self.config.bundle)
            bundle.student.to(self._device)
            self._bundle = bundle
        return self._bundle

    @property
    def model(self) -> StudentModel:
        return self.bundle.student

    def clients(self) -> ClientData:
        if self.bundle.clients is None:
            raise DataError("this bundle carries no simulated client data")
        return self.bundle.clients

    def local_sequence(self, client_id: int) -> np.ndarray:
        clients = self.clients()
        if not 0 <= client_id < len(clients):
            raise DataError(f"no local data for client {client_id} (0..{len(clients) - 1})")
        return clients.train[client_id]

    def client_state(self, client_id: int) -> ClientState:
        return ClientState(Path(self.config.state_dir), client_id, self._budget)

    def client_lock(self, client_id: int) -> contextlib.AbstractContextManager[None]:
        """Held from the budget check to the ledger write of a fit (see :class:`ClientState`)."""
        return exclusive_lock(Path(self.config.state_dir) / f"client-{client_id}" / ".lock")

    def check_received(self, parameters: Arrays) -> None:
        """Refuse global parameters that cannot be this model's (count, shapes, dtype, NaN):
        :class:`InvalidUpdateError`, an error reply, before they are trained or kept."""
        check_array_count(self.model, parameters, self._meta)
        validate_update(parameters, self.initial_parameters(), what="global parameters")

    # ------------------------------------------------------------------ FederatedTask
    def initial_parameters(self) -> Arrays:
        """The bundle's global parameters (and in meta mode its adapter as the first
        initialization: the identity, since the pretrained student's adapter is reset)."""
        return get_global_arrays(self.model, self._meta)

    def fit(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> FitOutcome:
        with self._lock, self.client_lock(client_id):
            torch.set_num_threads(self.config.num_threads)
            sequence = self.local_sequence(client_id)
            check_items(sequence, self.model.n_items)
            if len(sequence) < 2:
                raise DataError(f"client {client_id} has {len(sequence)} interactions; needs >= 2")
            train = self._round_config(config, client_id)
            _refuse_split_noise_in_the_clear(train, config)
            self.check_received(parameters)  # before any privacy is spent on them
            # the examples and steps train_global_dp will take (one released gradient per
            # round when the noise is split), held to the owner's caps before any training
            n = min(len(sequence) - 1, train.max_examples)
            steps = round_steps(n, train)
            state = self.client_state(client_id)
            try:
                check_round_steps(
                    steps,
                    self.config.max_round_steps,
                    local_epochs=train.local_epochs,
                    epoch_steps=dp_epoch_steps(n, train.batch_size),
                    batch_size=train.batch_size,
                )
                if train.dp:
                    q = dp_sample_rate(n, train.batch_size)
                    state.ledger.check(
                        Spend(train.noise_multiplier, q, steps),
                        max_round_epsilon=self.config.max_round_epsilon,
                    )
            except PrivacyBudgetExceededError as err:
                # the server is told the kind; the epsilons stay in this client's log
                return FitOutcome.declined(str(err), DECLINE_PRIVACY_BUDGET)
            except RoundCapExceededError as err:
                return FitOutcome.declined(str(err), err.cap)  # the kind names the cap
            # the global model is trained as a newcomer is served it (adapter at its start)
            set_global_arrays(self.model, parameters, self._meta)
            # Reptile in meta mode: the adapter's initialization is trained and sent too
            groups = ("global", "personal") if self._meta else ("global",)
            result = train_global_dp(self.model, sequence, train, groups)
            if train.dp:
                state.ledger.record(train.noise_multiplier, result.sample_rate, result.steps)
            new = get_global_arrays(self.model, self._meta)
            update = [
                n - np.asarray(o, dtype=np.float32) for n, o in zip(new, parameters, strict=True)
            ]
            if train.dp:
                # Only the noised update is covered by DP: the example count (a FedAvg weight,
                # which SecAgg+ also sums in the clear) and the training loss would tell the
                # server whether one record was there. So weight 1 and no loss; the epsilon
                # (which depends on the count only through ceil(n / batch-size)) stays, so the
                # operator can follow the spend.
                dp_metrics: dict[str, float | int | str] = {"epsilon": state.ledger.epsilon()}
                return FitOutcome.with_update(update, 1, dp_metrics)
            metrics: dict[str, float | int | str] = {
                "loss": result.loss if math.isfinite(result.loss) else -1.0,
                "steps": result.steps,
                "epsilon": 0.0,
            }
            return FitOutcome.with_update(update, result.num_examples, metrics)

    def evaluate(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> EvalOutcome:
        with self._lock:
            torch.set_num_threads(self.config.num_threads)
            clients = self.clients()
            if not 0 <= client_id < len(clients):
                raise DataError(f"no local data for client {client_id}")
            target = int(clients.valid[client_id])
            history = clients.train[client_id]
            if target < 0 or len(history) == 0:
                raise DataError(f"client {client_id} has no validation interaction")
            # malformed data is a DataError (an error reply of kind "data"), as in fit; ids
            # outside the catalog were IndexErrors ("internal"), negative ones in the items
            # left out of the full ranking wrapped around silently
            n_items = self.model.n_items
            if target >= n_items:
                raise DataError(
                    f"client {client_id}'s validation item is outside the catalog [0, {n_items})"
                )
            check_items(history, n_items)
            check_items(clients.full[client_id], n_items)
            # as fit: a NaN or a wrong dtype in what the server sent gave NaN scores, whose
            # loss the reply then blamed on this client's data
            self.check_received(parameters)
            set_global_arrays(self.model, parameters, self._meta)
            self.model.eval()
            items, mask = pad_histories([history], self.model.config.max_len)
            with torch.no_grad():
                scores = self.model(items.to(self._device), mask.to(self._device))[0].cpu()
            loss = float(F.cross_entropy(scores[None], torch.tensor([target])))
            s = scores.numpy().astype(np.float64)
            negs = sample_negatives(
                clients.full[client_id],
                self.model.n_items,
                self.config.eval_negatives,
                self.config.eval_seed,
                client_id,
            )
            sampled = rank_of_target(s[target], s[negs])
            excl = np.zeros(len(s), dtype=bool)
            excl[history] = True
            excl[target] = True
            full = rank_of_target(s[target], s[~excl])
            return EvalOutcome(
                loss=loss,
                num_examples=1,
                metrics={
                    "sampled_hr@10": hit_rate_at_k([sampled]),
                    "sampled_ndcg@10": ndcg_at_k([sampled]),
                    "full_hr@10": hit_rate_at_k([full]),
                    "full_ndcg@10": ndcg_at_k([full]),
                },
            )

    def publish_artifact(self, parameters: Arrays, version: int, out_dir: Path) -> Path:
        """Publish global model ``version`` as ``model-v{version}.int8.onnx``: again with the
        same model is a no-op, with another is refused (:func:`publish_student_once`)."""
        from shared.compression.artifact import publish_student_once
        from shared.published import artifact_file_name

        path = Path(out_dir) / artifact_file_name(version)
        with self._lock:
            set_global_arrays(self.model, parameters, self._meta)
            publish_student_once(
                self.model,
                self.bundle.item_ids,
                path,
                version=str(version),
                prune=publish_prune(self.config.prune_sparsity),
                trained_on=self.bundle.trained_on,  # what `fedrec evaluate model` splits by
            )
        return path

    def _round_config(self, config: Mapping[str, ConfigValue], client_id: int) -> LocalTrainConfig:
        """Per-round overrides sent by the server (same keys as the run config)."""
        keys = field_names(LocalTrainConfig)
        # snake_case is the same setting, as in a run config (it trained at the default)
        overrides = {kebab(k): v for k, v in config.items() if kebab(k) in keys}
        base = self.train_config
        if overrides:
            from shared.config import to_flat

            merged = {**to_flat(base), **overrides}
            base = from_flat(LocalTrainConfig, merged)
        round_no = server_round(config)
        from dataclasses import replace

        return replace(base, seed=hash((base.seed, client_id, round_no)) % (2**31))


def _refuse_split_noise_in_the_clear(
    train: LocalTrainConfig, config: Mapping[str, ConfigValue]
) -> None:
    """``noise-shares`` m > 1 adds 1/sqrt(m) of the DP noise, the rest coming from the other
    clients in the SecAgg+ sum. A round that asks for it without SecAgg+ (a misconfigured or
    curious server) would see this update with a fraction of its noise while the ledger
    charges the full amount: refused, on the value this round would train with (however the
    server spelled or typed it). The ClientApp sets :data:`CONFIG_UNDER_SECAGG`; a caller
    that does not (a benchmark, a test) is trusted. A round that also asks to clip the whole
    update (:data:`CONFIG_UPDATE_CLIP_NORM` > 0) is refused too, where only its own override
    splits the noise as well (the ClientApp checks the run config's):
    :func:`~shared.federated.local_config.noise_shares_clip_problem` says why."""
    under_secagg = config.get(CONFIG_UNDER_SECAGG)
    if train.noise_shares > 1 and under_secagg is not None and under_secagg is not True:
        raise ConfigError(
            f"noise-shares {train.noise_shares} splits the DP noise over the SecAgg+ sum, but "
            "this round came without SecAgg+; training it would release this update with a "
            "fraction of its noise. Refusing (run with secagg=true, or noise-shares=1)"
        )
    # the ClientApp refuses the pair from the run config; a round's override is seen here
    clip = config.get(CONFIG_UPDATE_CLIP_NORM, 0.0)
    if train.noise_shares > 1 and isinstance(clip, int | float) and clip > 0:
        raise ConfigError(noise_shares_clip_problem(clip))


def make_task(run_config: RunConfig) -> StudentTask:
    """Factory for the task registry (``"shared.federated.student_task:make_task"``)."""
    return StudentTask.from_run_config(run_config)
