"""The recommender's :class:`~shared.federated.task.FederatedTask`: the distilled student's
global parameters travel; each client trains them with Opacus DP-SGD on its own sequence,
keeps its personal adapter and its privacy ledger on disk, and declines once its budget is
spent.

Run-config keys (kebab-case): ``bundle`` (pretrained bundle path), ``state-dir`` (per-client
ledgers and personal parameters), ``epsilon-budget``, ``delta``, plus every
:class:`~shared.federated.local_training.LocalTrainConfig` key.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import field_names, from_flat
from shared.errors import ConfigError, DataError, PrivacyBudgetExceededError
from shared.eval.metrics import rank_of_target
from shared.eval.protocol import sample_negatives
from shared.federated.bundle import Bundle, ClientData, load_bundle
from shared.federated.local_training import (
    LocalTrainConfig,
    adapt_personal,
    check_items,
    train_global_dp,
)
from shared.federated.task import Arrays, ConfigValue, EvalOutcome, FitOutcome, RunConfig
from shared.io import write_bytes_atomic
from shared.models.sequence import pad_histories
from shared.models.student import StudentModel
from shared.privacy.ledger import PrivacyBudget, PrivacyLedger, Spend


@dataclass(frozen=True)
class StudentTaskConfig:
    """Where the task finds its model and keeps per-client state, and the privacy budget."""

    bundle: str = ""
    state_dir: str = ""
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    eval_negatives: int = 99
    eval_seed: int = 42
    num_threads: int = 1

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ConfigError("the student task needs 'bundle' (path to the pretrained bundle)")
        if not self.state_dir:
            raise ConfigError("the student task needs 'state-dir' (per-client state folder)")
        PrivacyBudget(self.epsilon_budget, self.delta)


def global_names(model: StudentModel) -> list[str]:
    """The fixed order of the global parameters on the wire."""
    return sorted(model.named_parameter_groups()["global"])


def get_global_arrays(model: StudentModel) -> Arrays:
    state = model.global_state_dict()
    return [state[name].numpy().astype(np.float32) for name in global_names(model)]


def set_global_arrays(model: StudentModel, arrays: Arrays) -> None:
    names = global_names(model)
    if len(arrays) != len(names):
        raise DataError(f"expected {len(names)} global arrays, got {len(arrays)}")
    model.load_global_state_dict(
        {
            n: torch.as_tensor(np.asarray(a, dtype=np.float32))
            for n, a in zip(names, arrays, strict=True)
        }
    )


class ClientState:
    """One client's on-disk state: the privacy ledger and the personal adapter."""

    def __init__(self, root: Path, client_id: int, budget: PrivacyBudget) -> None:
        self.dir = root / f"client-{client_id}"
        self.ledger = PrivacyLedger.open(self.dir / "ledger.json", budget)
        self.personal_path = self.dir / "personal.pt"

    def load_personal(self, model: StudentModel) -> None:
        """Load this client's adapter, or reset to the identity for a first-time client."""
        if self.personal_path.exists():
            state = torch.load(self.personal_path, map_location="cpu", weights_only=True)
            model.adapter.load_state_dict(state)
        else:
            model.adapter.reset()

    def save_personal(self, model: StudentModel) -> None:
        buf = io.BytesIO()
        torch.save(model.adapter.state_dict(), buf)
        write_bytes_atomic(self.personal_path, buf.getvalue())


class StudentTask:
    """FederatedTask over the student. One instance per process serves many clients."""

    def __init__(self, config: StudentTaskConfig, train: LocalTrainConfig) -> None:
        self.config = config
        self.train_config = train
        self._bundle: Bundle | None = None
        self._lock = threading.Lock()
        self._budget = PrivacyBudget(config.epsilon_budget, config.delta)

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
            self._bundle = load_bundle(self.config.bundle)
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

    # ------------------------------------------------------------------ FederatedTask
    def initial_parameters(self) -> Arrays:
        return get_global_arrays(self.model)

    def fit(
        self, client_id: int, parameters: Arrays, config: Mapping[str, ConfigValue]
    ) -> FitOutcome:
        with self._lock:
            torch.set_num_threads(self.config.num_threads)
            sequence = self.local_sequence(client_id)
            check_items(sequence, self.model.n_items)
            if len(sequence) < 2:
                raise DataError(f"client {client_id} has {len(sequence)} interactions; needs >= 2")
            state = self.client_state(client_id)
            train = self._round_config(config, client_id)
            if train.dp:
                n = min(len(sequence) - 1, train.max_examples)
                q = min(train.batch_size, n) / n
                steps = train.local_epochs * math.ceil(1 / q)
                try:
                    state.ledger.check(Spend(train.noise_multiplier, q, steps))
                except PrivacyBudgetExceededError as err:
                    return FitOutcome.declined(str(err))
            set_global_arrays(self.model, parameters)
            state.load_personal(self.model)
            result = train_global_dp(self.model, sequence, train)
            if train.dp:
                state.ledger.record(train.noise_multiplier, result.sample_rate, result.steps)
            if train.personal_steps:
                adapt_personal(self.model, sequence, train.personal_steps, train.personal_lr)
                state.save_personal(self.model)
            new = get_global_arrays(self.model)
            update = [
                n - np.asarray(o, dtype=np.float32) for n, o in zip(new, parameters, strict=True)
            ]
            metrics: dict[str, float | int | str] = {
                "loss": result.loss if math.isfinite(result.loss) else -1.0,
                "steps": result.steps,
                "epsilon": state.ledger.epsilon() if train.dp else 0.0,
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
            set_global_arrays(self.model, parameters)
            self.client_state(client_id).load_personal(self.model)
            self.model.eval()
            items, mask = pad_histories([history], self.model.config.max_len)
            with torch.no_grad():
                scores = self.model(items, mask)[0]
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
                    "sampled_hr@10": float(sampled < 10),
                    "sampled_ndcg@10": 1 / math.log2(sampled + 2) if sampled < 10 else 0.0,
                    "full_hr@10": float(full < 10),
                    "full_ndcg@10": 1 / math.log2(full + 2) if full < 10 else 0.0,
                },
            )

    def publish_artifact(self, parameters: Arrays, version: int, out_dir: Path) -> Path:
        """Publish global model ``version`` as ``model-v{version}.int8.onnx`` (idempotent)."""
        from shared.compression.artifact import publish_student

        path = Path(out_dir) / f"model-v{version}.int8.onnx"
        with self._lock:
            set_global_arrays(self.model, parameters)
            publish_student(self.model, self.bundle.item_ids, path, version=str(version))
        return path

    def _round_config(self, config: Mapping[str, ConfigValue], client_id: int) -> LocalTrainConfig:
        """Per-round overrides sent by the server (same keys as the run config)."""
        keys = field_names(LocalTrainConfig)
        overrides = {k: v for k, v in config.items() if k in keys}
        base = self.train_config
        if overrides:
            from shared.config import to_flat

            merged = {**to_flat(base), **overrides}
            base = from_flat(LocalTrainConfig, merged)
        round_no = int(config.get("server-round", 0) or 0)
        from dataclasses import replace

        return replace(base, seed=hash((base.seed, client_id, round_no)) % (2**31))


def make_task(run_config: RunConfig) -> StudentTask:
    """Factory for the task registry (``"shared.federated.student_task:make_task"``)."""
    return StudentTask.from_run_config(run_config)
