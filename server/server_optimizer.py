"""The server's optimiser: how the cohort's mean update becomes the global step.

Why: plain FedAvg adds the mean client update to the global model, so each round is one
step whose size is whatever the clients' local SGD produced. With a few dozen examples per
client, one local epoch moves the global parameters too little to learn from the federation,
and more local epochs over-fit each client's own few items (client drift). Treating the mean
update as a pseudo-gradient and giving it to Adam on the server (FedAdam, Reddi et al. 2021,
"Adaptive Federated Optimization") takes per-parameter steps of a steady size however small
or noisy the updates are. Measured with ``bench/federation_emulator.py`` on ml-100k (100
rounds of 50 clients, each sending one full-batch gradient step): validation sampled HR@10
rose from 0.697 to 0.730 with FedAdam, while FedAvg with local SGD stayed near where the
pretrained student started.

``avg`` (the default) is FedAvg: ``w += server_lr * mean_update`` (``server_lr`` 1 = plain
averaging). ``adam`` keeps first and second moments of the mean update and steps
``w += server_lr * m_hat / (sqrt(v_hat) + tau)``. The moments are server state: they are
checkpointed with the strategy (:meth:`ServerOptimizer.state_dict`), so a resumed run steps
exactly as an uninterrupted one. A round with no update to apply (every client failed or
declined) takes no step, so Adam's step count counts steps, not rounds; under user-level DP
such a round still releases the mechanism's noise, which is stepped like any mean update.
Everything here is post-processing of the (possibly DP-noised) aggregate, so it changes no
privacy guarantee.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.config import is_int
from shared.errors import ConfigError

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer", "ServerOptimizerSettings"]

SERVER_OPTIMIZERS = ("avg", "adam")
"""Accepted values of ``server-optimizer``."""

Arrays = list[npt.NDArray[np.float64]]


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """``kind`` (``avg`` | ``adam``), ``lr`` and Adam's ``beta1``, ``beta2``, ``tau``."""

    kind: str = "avg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ConfigError(
                f"'server-optimizer' must be one of {', '.join(map(repr, SERVER_OPTIMIZERS))}, "
                f"got {self.kind!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"'server-lr' must be a finite number > 0, got {self.lr!r}")
        for key, beta in (("server-beta1", self.beta1), ("server-beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"'{key}' must be in [0, 1), got {beta!r}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"'server-tau' must be a finite number > 0, got {self.tau!r}")

    @classmethod
    def of(cls, config: Any) -> ServerOptimizerSettings:
        """The settings held by a config's ``server_*`` fields (the server's config, the
        simulation's): ``server_optimizer``, ``server_lr``, ``server_beta1``,
        ``server_beta2``, ``server_tau``."""
        return cls(
            kind=config.server_optimizer,
            lr=config.server_lr,
            beta1=config.server_beta1,
            beta2=config.server_beta2,
            tau=config.server_tau,
        )

    def run_config(self) -> dict[str, str | float]:
        """These settings as the ``server-*`` run-config keys the server's config reads."""
        return {
            "server-optimizer": self.kind,
            "server-lr": self.lr,
            "server-beta1": self.beta1,
            "server-beta2": self.beta2,
            "server-tau": self.tau,
        }


def _encode(array: npt.NDArray[np.float64]) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f8").tobytes()).decode("ascii")


def _decode(text: object, shape: tuple[int, ...], what: str) -> npt.NDArray[np.float64]:
    if not isinstance(text, str):
        raise ConfigError(f"server optimizer state: {what} is not a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ConfigError(f"server optimizer state: {what} is not valid base64 ({exc})") from None
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) != 8 * size:
        raise ConfigError(
            f"server optimizer state: {what} holds {len(raw) // 8} values, the model "
            f"needs {size} (a checkpoint of another model?)"
        )
    return np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(shape)


class ServerOptimizer:
    """Turns each round's mean client update into the step added to the global model."""

    def __init__(self, settings: ServerOptimizerSettings, shapes: Sequence[tuple[int, ...]]):
        self.settings = settings
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.steps = 0
        self._m: Arrays = [np.zeros(s) for s in self.shapes]
        self._v: Arrays = [np.zeros(s) for s in self.shapes]

    def __repr__(self) -> str:
        s = self.settings
        if s.kind == "avg":
            return f"FedAvg(server_lr={s.lr})"
        return f"FedAdam(server_lr={s.lr}, betas=({s.beta1}, {s.beta2}), tau={s.tau})"

    def step(self, mean_update: Sequence[npt.NDArray[np.floating]]) -> Arrays:
        """The step to add to the global parameters for this round's mean update."""
        update = [np.asarray(u, dtype=np.float64) for u in mean_update]
        if [u.shape for u in update] != self.shapes:
            raise ConfigError(
                f"server optimizer: update shapes {[u.shape for u in update]} differ from "
                f"the model's {self.shapes}"
            )
        s = self.settings
        self.steps += 1
        if s.kind == "avg":
            return [s.lr * u for u in update]
        fix1 = 1.0 - s.beta1**self.steps
        fix2 = 1.0 - s.beta2**self.steps
        out: Arrays = []
        for i, u in enumerate(update):
            self._m[i] = s.beta1 * self._m[i] + (1.0 - s.beta1) * u
            self._v[i] = s.beta2 * self._v[i] + (1.0 - s.beta2) * np.square(u)
            out.append(s.lr * (self._m[i] / fix1) / (np.sqrt(self._v[i] / fix2) + s.tau))
        return out

    def snapshot(self) -> tuple[int, Arrays, Arrays]:
        """The state as it is now, for :meth:`restore` (a step replaces the moment arrays,
        never changes them in place, so this copies no array)."""
        return self.steps, list(self._m), list(self._v)

    def restore(self, snapshot: tuple[int, Arrays, Arrays]) -> None:
        """Undo the steps taken since :meth:`snapshot` (a step the server refused)."""
        self.steps, m, v = snapshot
        self._m, self._v = list(m), list(v)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state (Adam's moments as base64 float64, exact on resume)."""
        state: dict[str, Any] = {"kind": self.settings.kind, "steps": self.steps}
        if self.settings.kind == "adam":
            state["m"] = [_encode(m) for m in self._m]
            state["v"] = [_encode(v) for v in self._v]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses the state of another optimiser or model."""
        kind = state.get("kind")
        if kind != self.settings.kind:
            raise ConfigError(
                f"the checkpoint was trained with server-optimizer={kind!r}, the config says "
                f"{self.settings.kind!r}; resume with the same optimiser or start a new run"
            )
        steps = state.get("steps")
        if not is_int(steps) or steps < 0:
            raise ConfigError(f"server optimizer state has a malformed step count {steps!r}")
        if kind == "adam":
            m, v = state.get("m"), state.get("v")
            if not (isinstance(m, list) and isinstance(v, list)):
                raise ConfigError("server optimizer state lacks Adam's moments 'm' and 'v'")
            if len(m) != len(self.shapes) or len(v) != len(self.shapes):
                raise ConfigError(
                    f"server optimizer state has {len(m)} / {len(v)} moment arrays, the model "
                    f"has {len(self.shapes)} parameter arrays"
                )
            pairs = list(enumerate(self.shapes))
            self._m = [_decode(m[i], shape, f"m[{i}]") for i, shape in pairs]
            self._v = [_decode(v[i], shape, f"v[{i}]") for i, shape in pairs]
        self.steps = steps
