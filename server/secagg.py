"""The one module that touches Flower's legacy SecAgg+ / workflow API (Flower 1.42).

Everything that depends on ``flwr.server.workflow`` (``DefaultWorkflow``,
``SecAggPlusWorkflow``), ``LegacyContext`` and ``flwr.client.mod.secaggplus_mod`` is
here, so a future move to a Message-API SecAgg+ touches this file only:

* :class:`SecAggSettings` - validated SecAgg+ parameters.
* :func:`run_rounds` - runs ``num_rounds`` of fit (plain or SecAgg+) + federated
  evaluation on a ``Grid`` with a :class:`~server.strategy.ValidatingFedAvg`, calling a
  hook after each round; rounds may start at ``first_round`` (resume from a
  checkpoint) and a hook may end the run early with
  :class:`~server.strategy.StopTraining`.
* :func:`secaggplus_when_requested_mod` - the client-side mod. Flower's
  ``secaggplus_mod`` raises ``KeyError`` on any train message without its
  ``"secaggplus"`` config record, so it is *not* harmless when the server runs plain
  FedAvg; this wrapper only engages it when the record is present, which lets a single
  ``ClientApp`` serve both modes. It also makes the client report weight 1 when the
  round config asks for uniform weights (user-level DP), and refuses instructions whose
  answer would unmask a single client's update (:func:`_refuse_unsafe_stage`).
* :func:`use_fast_secagg_helpers` - Flower 1.42's Shamir helpers start a thread pool on
  every call (for 2 to 20 chunks of pure-Python work the GIL serializes anyway; in a
  busy server each thread start waits for the GIL) and compute bit by bit: 0.3 s per
  round to recover 50 seeds. The workflow and the client mod use :mod:`server.shamir`'s
  equivalents instead, which share Flower's byte layout. The workflow reads the masked
  vectors with :func:`server.npy.load_npy` (each ``.npy`` header parsed once, not once
  per client and tensor), and the client mod parses its own PEM private key once per
  stage instead of once per neighbour. The workflow's unmasked sum is checked on the way
  (:func:`bounded_factor_extract`): one that no sum of clipped updates gives halts the
  round instead of being applied.
* :func:`full_seed_masks` - Flower 1.42 draws every SecAgg+ mask from
  ``RandomState(seed32)``, the XOR of the seed's 4-byte words: a round's masks are 2**32
  in all, and an honest-but-curious server, which learns each survivor's private seed
  in the unmask stage, could strip the few pairwise masks left on one client's vector by
  enumerating them offline and read that client's update. Where both ends have it (the
  server names it in the collect stage's instruction, the client in its reply) the
  masks are drawn from the whole seed instead.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from logging import ERROR, INFO, WARNING
from typing import cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import NDArrays, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation import ndarrays_arithmetic as _flwr_arithmetic
from flwr.common.secure_aggregation import secaggplus_utils as _flwr_secagg_utils
from flwr.common.secure_aggregation.crypto import shamir as _flwr_shamir
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_STATE as _FLWR_STATE_RECORD,
)
from flwr.compat.common import parameter as _flwr_parameter
from flwr.compat.common.recorddict_compat import (
    arrayrecord_to_parameters,
    parameters_to_arrayrecord,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)
from flwr.server import ClientManager, LegacyContext, SimpleClientManager
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as _flwr_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.primitives import asymmetric as _flwr_asymmetric
from flwr.supercore.run import RunNotRunningException

from server.flower_patch import replace_if_unchanged
from server.grid import DelegatingGrid
from server.npy import load_npy, parameters_to_arrays
from server.shamir import CHUNK, INDEX, combine_shares, create_shares
from server.strategy import (
    CONFIG_UNIFORM_WEIGHT,
    FitRoundStats,
    RoundCallback,
    RoundReport,
    StopTraining,
    ValidatingFedAvg,
    bounded_reason,
    wait_for_clients,
)
from shared.config import is_int
from shared.errors import ConfigError
from shared.federated.task import METRIC_STATUS, FitStatus

#: Name of the config record that marks a train message as a SecAgg+ stage.
SECAGG_RECORD = RECORD_KEY_CONFIGS
# Record names of a legacy FitRes inside a RecordDict (flwr.compat recorddict_compat).
FITRES_METRICS = "fitres.metrics"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITINS_CONFIG = "fitins.config"
# The package re-exports the mod function under its module's name: import the module.
_flwr_client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


_flwr_bytes_to_private_key = _flwr_asymmetric.bytes_to_private_key
_flwr_pseudo_rand_gen = _flwr_secagg_utils.pseudo_rand_gen
_flwr_factor_extract = _flwr_arithmetic.factor_extract

#: Config record, in a collect-stage instruction and its reply, naming the generator of the
#: SecAgg+ masks (:func:`full_seed_masks`); without it both ends use Flower's.
MASKS_RECORD = "fedrec.secagg-masks"
MASKS_KEY = "generator"
MASKS_GENERATOR = "aes256-ctr-sha256-v1"
_FULL_SEED_MASKS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fedrec_full_seed_masks", default=False
)


def full_seed_masks(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Masks uniform in ``[0, num_range)`` of the given shapes, from all of ``seed``.

    The replacement of Flower's ``pseudo_rand_gen`` (same arguments, ``int64`` arrays):
    AES-256 in counter mode keyed with SHA-256 of the seed, so two seeds give unrelated
    masks and a mask is as hard to guess as its seed (Flower's folds the seed to 32 bits).
    ``num_range`` is a power of two <= 2**32 in SecAgg+ (:class:`SecAggSettings`; a client
    refuses any other from the server, :func:`_refuse_unsafe_setup`), so the words stay
    uniform."""
    key = hashlib.sha256(b"fedrec secagg+ mask\0" + seed).digest()
    counts = [math.prod(shape) for shape in dimensions_list]
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    words = stream.update(bytes(4 * sum(counts))) + stream.finalize()
    values = np.frombuffer(words, dtype="<u4").astype(np.int64) % num_range
    masks: list[np.ndarray] = []
    start = 0
    for shape, count in zip(dimensions_list, counts, strict=True):
        masks.append(values[start : start + count].reshape(shape))
        start += count
    return masks


def _mask_generator(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """What Flower's SecAgg+ workflow and client mod call for their masks:
    :func:`full_seed_masks` in a round both ends agreed on it, else Flower's own."""
    if _FULL_SEED_MASKS.get():
        return full_seed_masks(seed, num_range, dimensions_list)
    return cast(list[np.ndarray], _flwr_pseudo_rand_gen(seed, num_range, dimensions_list))


def _masks_installed(module: object) -> bool:
    """Whether ``module`` (Flower's workflow or client mod) draws masks by
    :func:`_mask_generator` (a Flower that reworked its helper keeps its own)."""
    return getattr(module, "pseudo_rand_gen", None) is _mask_generator


#: ``(clients, quantization_range, strategy)`` of the sum the unmask stage now running
#: recovers (set by :meth:`EarlyDropoutTolerantSecAggPlusWorkflow.unmask_stage`; the strategy
#: ``None`` if it is not a :class:`ValidatingFedAvg`), ``None`` outside one.
_SUMMED: contextvars.ContextVar[tuple[int, int, ValidatingFedAvg | None] | None] = (
    contextvars.ContextVar("fedrec_secagg_summed", default=None)
)


class _SumOutOfRange(ValueError):
    """The unmasked sum holds an entry that no sum of the clients' quantized updates has."""


def bounded_factor_extract(
    parameters: list[np.ndarray],
) -> tuple[int, list[np.ndarray]]:
    """Flower's ``factor_extract`` (the summed weight, then the summed update) of the
    unmasked sum, refused (:class:`_SumOutOfRange`) where an entry is not one ``k``
    clipped, quantized updates add up to: each client adds an integer in ``[0,
    quantization_range]`` to every entry (its weight at most 1, capped by
    :func:`_cap_weight`), so the sum of ``k`` lies in ``[0, k * quantization_range]``.
    Any other value is what masks that did not cancel (a vector or share damaged,
    on purpose or not) leave: noise up to the modulus, which Flower dequantized and
    applied (a model entry off by ~35,000 at clipping range 8).

    The strategy is told the summed weight (:attr:`ValidatingFedAvg.unmasked_weight`, in
    client weights of max-weight), which its aggregation reads: the number of updates a
    mean of weight-1 updates is over."""
    summed = _SUMMED.get()
    if summed is not None:
        clients, quantization_range, _ = summed
        bound = clients * quantization_range
        for array in parameters:
            if array.size and not (int(array.min()) >= 0 and int(array.max()) <= bound):
                raise _SumOutOfRange(
                    f"the unmasked sum is no sum of {clients} clipped updates (an entry "
                    f"outside [0, {bound}], {clients} x secagg-quantization-range): a "
                    "client's masked vector or shares were damaged, so no update in it can "
                    "be trusted"
                )
    weight, arrays = _flwr_factor_extract(parameters)
    if summed is not None and summed[2] is not None:
        summed[2].unmasked_weight = float(weight) / summed[1]
    return weight, arrays


#: Largest SecAgg+ modulus whose masks are uniform: :func:`full_seed_masks` draws 32-bit words.
MAX_MODULUS = 2**32


def is_usable_modulus(modulus: int, quantization_range: int) -> bool:
    """Whether SecAgg+'s masks hide an update in ``modulus``: a power of two (the masks'
    words stay uniform modulo it), at most :data:`MAX_MODULUS` and above the quantization
    range (which an update would otherwise wrap). The server's settings and a client's
    check of the server's setup both ask this."""
    return quantization_range < modulus <= MAX_MODULUS and not modulus & (modulus - 1)


@lru_cache(maxsize=4)
def parsed_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Flower's ``bytes_to_private_key``, remembered for the last few keys: the client mod
    parses the same PEM key once per neighbour in two stages (0.25 ms each). The keys
    are a round's throw-away pairs, which the client's state holds anyway."""
    return _flwr_bytes_to_private_key(data)


def use_fast_secagg_helpers() -> None:
    """Make Flower's SecAgg+ workflow and client mod use :func:`create_shares`,
    :func:`combine_shares`, :func:`server.npy.load_npy` (and its
    :func:`~server.npy.parameters_to_arrays`), :func:`parsed_private_key`,
    :func:`_mask_generator` and the workflow :func:`bounded_factor_extract` (idempotent; a
    Flower whose modules no longer hold its own helpers under these names is left
    alone)."""
    for module, name, original, replacement in (
        (_flwr_workflow, "pseudo_rand_gen", _flwr_pseudo_rand_gen, _mask_generator),
        (_flwr_client_mod, "pseudo_rand_gen", _flwr_pseudo_rand_gen, _mask_generator),
        (_flwr_workflow, "combine_shares", _flwr_shamir.combine_shares, combine_shares),
        (_flwr_workflow, "factor_extract", _flwr_factor_extract, bounded_factor_extract),
        (_flwr_workflow, "bytes_to_ndarray", _flwr_parameter.bytes_to_ndarray, load_npy),
        (
            _flwr_client_mod,
            "parameters_to_ndarrays",
            _flwr_parameter.parameters_to_ndarrays,
            parameters_to_arrays,
        ),
        (_flwr_client_mod, "create_shares", _flwr_shamir.create_shares, create_shares),
        (
            _flwr_client_mod,
            "bytes_to_private_key",
            _flwr_bytes_to_private_key,
            parsed_private_key,
        ),
    ):
        replace_if_unchanged(module, name, original, replacement)


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters (see ``flwr.server.workflow.SecAggPlusWorkflow``).

    ``num_shares``/``reconstruction_threshold``: an ``int`` is an absolute count, a
    ``float`` a fraction (of the cohort / of ``num_shares``). Each client's masks are
    shared with ``num_shares - 1`` neighbours; up to ``num_shares - threshold``
    neighbours of any client may drop out and the round still completes. Smaller
    ``num_shares`` makes key exchange cheaper (O(cohort * num_shares) instead of
    O(cohort**2)). ``timeout`` bounds each of the four stages (``None``: wait forever).

    Each client update ``u`` with weight ``r = num_examples / max_weight`` enters the
    sum as ``clip(r * u, -clipping_range, clipping_range)`` quantized to
    ``quantization_range`` levels; the server gets ``sum(clip(r u)) / sum(r)``.
    ``cohort * quantization_range`` must stay below ``modulus_range``, for at least the
    :attr:`least_cohort` a round completes with (else no round could run).
    """

    num_shares: int | float = 5
    reconstruction_threshold: int | float = 3
    timeout: float | None = 30.0
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        def number(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"secagg-{name} must be a number, got {value!r}")

        number("num-shares", self.num_shares)
        number("reconstruction-threshold", self.reconstruction_threshold)
        if isinstance(self.num_shares, int) and self.num_shares < 3:
            raise ConfigError(
                f"secagg-num-shares as an integer must be >= 3, got {self.num_shares}"
            )
        if isinstance(self.num_shares, int) and self.num_shares % 2 == 0:
            # Flower sends the even count to the clients, then gives each num_shares + 1
            # neighbours in any larger cohort: the clients' shares run out in share-keys
            raise ConfigError(
                f"secagg-num-shares as an integer must be odd, got {self.num_shares}: with an "
                "even count Flower gives each client one neighbour more than the shares it "
                "makes, and every round of more clients fails in the key-sharing stage; use "
                f"{self.num_shares + 1} (or a fraction of the cohort, e.g. 1.0 for all)"
            )
        if isinstance(self.num_shares, float) and not 0 < self.num_shares <= 1:
            raise ConfigError(
                f"secagg-num-shares as a fraction must be in (0, 1], got {self.num_shares}"
            )
        t = self.reconstruction_threshold
        if isinstance(t, int):
            if t < 2:
                raise ConfigError(f"secagg-reconstruction-threshold must be >= 2, got {t}")
            if isinstance(self.num_shares, int) and t >= self.num_shares:
                raise ConfigError(
                    f"secagg-reconstruction-threshold ({t}) must be < secagg-num-shares "
                    f"({self.num_shares})"
                )
        elif not 0 < t <= 1:
            raise ConfigError(
                f"secagg-reconstruction-threshold as a fraction must be in (0, 1], got {t}"
            )
        if isinstance(self.num_shares, int) and not self.majority(self.num_shares):
            raise ConfigError(self.minority_problem(self.num_shares))
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(
                f"secagg-timeout must be > 0 seconds (or 0 for none), got {self.timeout}"
            )
        if not 0 < self.clipping_range < math.inf:  # inf: every sum came back NaN
            raise ConfigError(
                f"secagg-clipping-range must be a finite number > 0, got {self.clipping_range}"
            )
        if not 0 < self.max_weight < math.inf:
            raise ConfigError(
                f"secagg-max-weight must be a finite number > 0, got {self.max_weight}"
            )
        q, m = self.quantization_range, self.modulus_range
        if not is_int(q) or q < 2:
            raise ConfigError(f"secagg-quantization-range must be an integer >= 2, got {q!r}")
        if not is_int(m) or not is_usable_modulus(m, q):
            raise ConfigError(
                "secagg-modulus-range must be a power of two, <= 2**32 and > "
                f"secagg-quantization-range ({q}), got {m!r}"
            )
        most, least = self.max_cohort, self.least_cohort
        if most < least:  # every round would be capped below what SecAgg+ completes with
            raise ConfigError(
                "SecAgg+ cannot complete a round: the modulus holds the quantized updates "
                f"of at most {most} client(s) (secagg-modulus-range {m} / "
                f"secagg-quantization-range {q}) and a round "
                f"needs at least {least} (secagg-num-shares {self.num_shares}, "
                f"secagg-reconstruction-threshold {t}). Raise secagg-modulus-range "
                "(<= 2**32) or lower secagg-quantization-range"
            )

    @property
    def max_cohort(self) -> int:
        """Largest cohort whose quantized sum cannot wrap around the modulus."""
        return (self.modulus_range - 1) // self.quantization_range

    def rounding_slack(self, scalars: int) -> float:
        """The most Flower's stochastic rounding adds to the L2 norm of one client's update
        of ``scalars`` values: under one quantization step, ``2 clipping_range /
        quantization_range``, per coordinate (the per-coordinate clip only shrinks it)."""
        return math.sqrt(scalars) * 2 * self.clipping_range / self.quantization_range

    @property
    def least_cohort(self) -> int:
        """Fewest sampled clients a round can complete with: Flower halts a round whose
        clients have fewer neighbours than the reconstruction threshold
        (:meth:`neighbours_and_threshold`); ``max_cohort + 1`` if no cohort the modulus
        holds has enough. (With a fractional ``num_shares`` and an integer threshold some
        larger cohorts may fall short too: their share count shrinks to a fraction.)"""
        for cohort in range(2, self.max_cohort + 1):
            if self.completes(cohort):
                return cohort
        return self.max_cohort + 1

    def completes(self, cohort: int) -> bool:
        """Whether SecAgg+ can complete a round of ``cohort`` sampled clients when none
        drops out: at least 2 clients, no more than :attr:`max_cohort`, and each with at
        least the reconstruction threshold of neighbours (:meth:`neighbours_and_threshold`)."""
        if not 2 <= cohort <= self.max_cohort:
            return False
        neighbours, threshold = self.neighbours_and_threshold(cohort)
        return neighbours >= threshold

    @property
    def halting_cohorts(self) -> tuple[int, ...]:
        """The cohort sizes above :attr:`least_cohort` (and within :attr:`max_cohort`) that
        SecAgg+ still halts. Only a fractional ``num_shares`` with an integer threshold has
        any: the share count ``round(num_shares * cohort)`` falls below the threshold again
        (0.1 shares at threshold 4: 15 to 34 clients have 3 neighbours each). Past
        ``(threshold + 1) / num_shares`` clients the shares reach the threshold for good
        (and past about ``2 * threshold / num_shares`` outgrow a strict majority,
        :attr:`minority_cohorts`)."""
        t = self.reconstruction_threshold
        if not isinstance(self.num_shares, float) or not isinstance(t, int):
            return ()
        last = min(self.max_cohort, math.ceil((t + 1) / self.num_shares))
        return tuple(c for c in range(self.least_cohort, last + 1) if not self.completes(c))

    def majority(self, cohort: int) -> bool:
        """Whether the reconstruction threshold of a round of ``cohort`` sampled clients is a
        strict majority of each client's shares: ``2 * threshold > num_shares``, counting
        the share count the setup stage sends (Flower's ``num_shares``, which includes the
        client itself: it keeps one share of its own) and the neighbours that hold them.

        At or below half, a dishonest server can list a client as active to some of its
        neighbours and as dropped to others (no one client sees both lists) and collect
        ``threshold`` shares of its mask seed and as many of its mask key, i.e. its update
        (Bonawitz et al. 2017; Bell et al. 2020). With a strict majority the two sets of
        answering neighbours must overlap, and a client answers one unmask request a round
        (:func:`_refuse_unsafe_unmask` refuses one that names a node both ways)."""
        shares, threshold = self.shares_and_threshold(cohort)
        neighbours, _ = self.neighbours_and_threshold(cohort)
        return 2 * threshold > max(shares, neighbours)

    def minority_problem(self, cohort: int) -> str:
        """Why these settings are refused for a round of ``cohort`` clients: their threshold
        is no strict majority of the shares (:meth:`majority`)."""
        shares, threshold = self.shares_and_threshold(cohort)
        n, t = self.num_shares, self.reconstruction_threshold
        where = f" in a cohort of {cohort} clients" if isinstance(n, float) else ""
        n_text = f"{n}: {shares}{where}" if isinstance(n, float) else f"{n}"
        t_text = f"{t}: {threshold}" if isinstance(t, float) else f"{t}"
        return (
            f"secagg-reconstruction-threshold ({t_text}) must be a strict majority of "
            f"secagg-num-shares ({n_text}; each client's share count, the client itself "
            "included): 2 * threshold > num-shares. With at most half, a dishonest server "
            "can tell some of a client's neighbours it dropped out and others it is active, "
            "and collect both its mask seed and its mask key, i.e. its update. Raise "
            f"secagg-reconstruction-threshold to at least {shares // 2 + 1}{where} (or lower "
            "secagg-num-shares)"
        )

    @property
    def minority_cohorts(self) -> tuple[int, ...]:
        """The cohort sizes SecAgg+ completes (:meth:`completes`) whose threshold is no
        strict majority of the shares (:meth:`majority`). Only a fractional ``num_shares``
        can have any (an integer one is refused outright): with an integer threshold, every
        cohort past about ``2 * threshold / num_shares`` clients."""
        if not isinstance(self.num_shares, float):
            return ()
        return tuple(
            c
            for c in range(self.least_cohort, self.max_cohort + 1)
            if self.completes(c) and not self.majority(c)
        )

    def shares_and_threshold(self, cohort: int) -> tuple[int, int]:
        """The share count and the reconstruction threshold Flower 1.42's setup stage sends
        each client in a round of ``cohort`` sampled clients: a fractional ``num_shares`` is
        a fraction of the cohort (made odd, and the whole cohort if 2 or fewer), a
        fractional threshold a fraction of the share count (at least 2)."""
        if isinstance(self.num_shares, float):
            shares = round(self.num_shares * cohort)
            if shares < cohort and shares & 1 == 0:
                shares += 1
            if shares <= 2:
                shares = cohort
        else:
            shares = self.num_shares
        t = self.reconstruction_threshold
        return shares, t if isinstance(t, int) else max(round(t * shares), 2)

    def neighbours_and_threshold(self, cohort: int) -> tuple[int, int]:
        """Each client's neighbours (itself included) and the reconstruction threshold in a
        round of ``cohort`` sampled clients, as Flower 1.42's setup stage computes them
        (:meth:`shares_and_threshold`)."""
        shares, threshold = self.shares_and_threshold(cohort)
        if cohort != shares and shares & 1 == 0:  # made odd after the threshold is set
            shares += 1
        return min(cohort, 2 * (shares >> 1) + 1), threshold

    def workflow(self) -> SecAggPlusWorkflow:
        """The Flower fit workflow implementing SecAgg+ with these settings."""
        use_fast_secagg_helpers()
        return EarlyDropoutTolerantSecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=self.timeout,
        )


class EarlyDropoutTolerantSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that survives dropouts before the masked-vector stage.

    Flower 1.42 treats a client that drops in the *setup* or *share-keys* stage as
    "dead" in the unmask stage and asks its neighbours for shares of its key, which
    they never received (it never sent them): every survivor fails with ``KeyError``
    and the round halts. Such a client contributed no masks, so it is simply not a
    participant: after each of these two stages it is removed from the sampled set
    and from every neighbour set, and the threshold is re-checked without it. Clients
    dropping later (collect/unmask) are handled by Flower's own mask recovery.
    """

    @staticmethod
    def _forget_dropouts(state: WorkflowState, grid: Grid) -> None:
        dropped = state.sampled_node_ids - state.active_node_ids
        if not dropped:
            return
        causes = grid.outcomes if isinstance(grid, _WellFormedRepliesGrid) else {}
        log(
            WARNING,
            "SecAgg+: %s client(s) dropped before sending masks: %s",
            len(dropped),
            "; ".join(f"node {n} ({causes.get(n, 'no reply')})" for n in sorted(dropped)),
        )
        state.sampled_node_ids = state.sampled_node_ids - dropped
        for node_id in dropped:
            state.nid_to_neighbours.pop(node_id, None)
        for neighbours in state.nid_to_neighbours.values():
            neighbours.difference_update(dropped)

    halted_because: str | None = None
    """Why the last round's secure aggregation halted, where it was not for too few
    surviving clients (``None``: it was, or it did not halt)."""

    def __call__(self, grid: Grid, context: Context) -> None:
        """Flower's protocol, unmasking with :func:`full_seed_masks` where installed (the
        collect stage asks the clients for them)."""
        token = _FULL_SEED_MASKS.set(_masks_installed(_flwr_workflow))
        try:
            super().__call__(grid, context)
        finally:
            _FULL_SEED_MASKS.reset(token)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage, then forget clients that did not send public keys."""
        self.halted_because = None
        if not super().setup_stage(grid, context, state) and not state.nid_to_neighbours:
            return False  # nothing sampled / configuration error: nothing to repair
        self._forget_dropouts(state, grid)
        return len(state.active_node_ids) >= 2 and self._check_threshold(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's share-keys stage, then forget clients that did not share keys."""
        super().share_keys_stage(grid, context, state)
        self._forget_dropouts(state, grid)
        return len(state.active_node_ids) >= 2 and self._check_threshold(state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        """Flower's stage, then stop before the unmask stage when too few clients sent an
        update (the others declined, in the clear): Flower unmasks the sum first and asks
        the strategy after, so a sum the strategy then discards had already been seen, with
        less DP noise than its contributors' ledgers were charged for under noise-shares.
        The strategy records the round (declines, the reason) and keeps the model.

        The instructions name the mask generator the server unmasks with (a reply that
        does not name it back is malformed: :func:`_reply_problem`)."""
        if _FULL_SEED_MASKS.get():
            for content in state.nid_to_fitins.values():
                content.config_records[MASKS_RECORD] = ConfigRecord({MASKS_KEY: MASKS_GENERATOR})
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        strategy = context.strategy
        if not isinstance(strategy, ValidatingFedAvg):
            return True
        short = strategy.short_secure_aggregate(state.legacy_results)
        if short is None:
            return True
        log(WARNING, "SecAgg+: %s", short)
        parameters, _ = strategy.aggregate_fit(
            _current_round(context),
            list(state.legacy_results),
            [f for f in state.failures if isinstance(f, BaseException)],
        )
        if parameters is not None:  # under user-level DP: the noise alone, never the sum
            _set_global_parameters(context, parameters_to_arrays(parameters))
        return False

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's unmask stage without numpy's divide-by-zero warning: when every client of
        the round declined (unit weights of 0), Flower divides by the zero total weight; the
        strategy then finds no trained client and keeps the model, as it should.

        Shares that do not give back a secret Flower can use (of different lengths, a
        repeated index, not all of one secret: a client damaged the one it sent) raised out
        of the workflow and ended the run; they halt the round instead (nothing is
        verifiable about which share was damaged, so no sum can be unmasked). So does an
        unmasked sum that the summed clients' clipped updates cannot add up to
        (:func:`bounded_factor_extract`)."""
        strategy = context.strategy
        ours = strategy if isinstance(strategy, ValidatingFedAvg) else None
        summed = _SUMMED.set((len(state.active_node_ids), state.quantization_range, ours))
        with np.errstate(divide="ignore", invalid="ignore"):
            try:
                return bool(super().unmask_stage(grid, context, state))
            except Exception as exc:
                if not _raised_removing_masks(exc):
                    raise
                self.halted_because = (
                    str(exc)
                    if isinstance(exc, _SumOutOfRange)
                    else f"the masks could not be removed ({type(exc).__name__}: {exc}): a "
                    "client sent a damaged share"
                )
                log(ERROR, "SecAgg+: %s; the round is halted", self.halted_because)
                return False
            finally:
                _SUMMED.reset(summed)
                if ours is not None:  # this sum's only, read or not
                    ours.unmasked_weight = None


#: Functions the unmask stage calls whose own failures are not the masks' (Flower's grid,
#: the strategy's aggregation): those propagate.
_NOT_REMOVING_MASKS = frozenset({"send_and_receive", "aggregate_fit"})


def _raised_removing_masks(exc: BaseException) -> bool:
    """Whether ``exc`` came from the unmask stage's work on its replies (recovering the
    secrets from the shares, removing the masks), not from the grid or the strategy."""
    names: set[str] = set()
    trace = exc.__traceback__
    while trace is not None:
        names.add(trace.tb_frame.f_code.co_name)
        trace = trace.tb_next
    return not names & _NOT_REMOVING_MASKS


class _DefaultTimeoutGrid(DelegatingGrid):
    """Delegating ``Grid``: a default timeout for ``send_and_receive``, and a stop switch.

    Flower 1.42's ``default_fit_workflow`` / ``default_evaluate_workflow`` call
    ``grid.send_and_receive(...)`` without a timeout, so one silent client would stall
    the run forever. Explicit timeouts (SecAgg+ stages) are passed through unchanged.
    ``timeout=None`` keeps waiting for all replies.

    Once ``stopped`` is set, ``get_node_ids`` raises ``RunNotRunningException``: that is
    how ``DefaultWorkflow``'s node-updater thread learns to exit when the run ends early
    (a hook raised), since the workflow itself only stops it on normal completion.
    """

    def __init__(
        self, inner: Grid, timeout: float | None, stopped: threading.Event | None = None
    ) -> None:
        super().__init__(inner)
        self._timeout = timeout
        self._stopped = stopped if stopped is not None else threading.Event()

    def get_node_ids(self) -> Iterable[int]:
        if self._stopped.is_set():
            raise RunNotRunningException("the run has ended")
        return self._inner.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._inner.send_and_receive(
            messages, timeout=self._timeout if timeout is None else timeout
        )


class _WellFormedRepliesGrid(DelegatingGrid):
    """Delegating ``Grid`` whose replies Flower's workflows could not read become error
    replies, so that one malformed client (buggy, outdated or hostile) counts as a dropout
    instead of crashing the run: a SecAgg+ masked vector of other arrays than the model's
    (Flower sums it with the others: a shape error; as a dropout its masks are recovered),
    a reply to a SecAgg+ stage without the fields that stage reads, or with lists of
    different lengths, an unreadable public key, a share for a node it was not asked
    about (a ``KeyError`` or ``ValueError``), or a fit or evaluate reply without its
    records (a ``KeyError``). What a reply must hold is judged by the message it answers;
    public keys also by the other replies of the setup stage (each neighbour refuses a
    key it was sent twice, so a repeated one is unusable whoever sent it)."""

    def __init__(self, inner: Grid, shapes: list[tuple[int, ...]] | None) -> None:
        super().__init__(inner)
        self._shapes = shapes
        self.outcomes: dict[int, str] = {}
        """Why each node of the last exchange sent no usable reply (by node id): the error
        it replied with (cut short: :func:`~server.strategy.bounded_reason`), or that none
        came in time; what a dropout is logged with."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        asked = {m.metadata.dst_node_id: m.content for m in sent if m.has_content()}
        replies = _refuse_repeated_keys(
            [
                self._checked(reply, asked.get(reply.metadata.src_node_id))
                for reply in self._inner.send_and_receive(sent, timeout=timeout)
            ],
            asked,
        )
        waited = "no reply" if timeout is None else f"no reply within {timeout:g} s"
        self.outcomes = {m.metadata.dst_node_id: waited for m in sent}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.outcomes[node] = f"error: {bounded_reason(str(reply.error.reason))}"
            else:
                self.outcomes.pop(node, None)
        return replies

    def _checked(self, reply: Message, request: RecordDict | None) -> Message:
        if reply.has_error() or not reply.has_content():
            return reply
        node = reply.metadata.src_node_id
        problem = _reply_problem(reply.content, self._shapes, request, node)
        return reply if problem is None else _malformed(reply, problem)


def _malformed(reply: Message, problem: str) -> Message:
    """The error reply ``reply`` counts as (logged with ``problem``): a dropout."""
    node = reply.metadata.src_node_id
    log(WARNING, "node %s sent a malformed reply, counted as a dropout: %s", node, problem)
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"malformed reply: {problem}")
    # Flower's own form of a reply built from metadata: it keeps the sender's node id
    return Message(error=error, metadata=reply.metadata)  # type: ignore[call-overload]


def _refuse_repeated_keys(replies: list[Message], asked: dict[int, RecordDict]) -> list[Message]:
    """``replies``, where those to the SecAgg+ setup stage that send a public key another
    one sends too (or send one key as both of theirs) become malformed: every neighbour
    of theirs refuses repeated keys in the share-keys stage ("Some public keys are
    identical") and drops out, so one such client halted the round."""
    keys: dict[int, list[bytes]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        request = asked.get(node)
        configs = request.config_records.get(RECORD_KEY_CONFIGS) if request is not None else None
        if configs is None or configs.get(Key.STAGE) != Stage.SETUP or not reply.has_content():
            continue
        sent = reply.content.config_records[RECORD_KEY_CONFIGS]  # checked: both keys, bytes
        keys[node] = [cast(bytes, sent[Key.PUBLIC_KEY_1]), cast(bytes, sent[Key.PUBLIC_KEY_2])]
    senders: dict[bytes, int] = {}
    for pair in keys.values():
        for key in set(pair):
            senders[key] = senders.get(key, 0) + 1

    def problem(pair: list[bytes]) -> str | None:
        if pair[0] == pair[1]:
            return "its two SecAgg+ public keys are one key"
        if any(senders[key] > 1 for key in pair):
            return "a SecAgg+ public key also sent by another client"
        return None

    checked: list[Message] = []
    for reply in replies:
        sent_keys = keys.get(reply.metadata.src_node_id)
        why = None if sent_keys is None else problem(sent_keys)
        checked.append(reply if why is None else _malformed(reply, why))
    return checked


def _reply_problem(
    content: RecordDict,
    shapes: list[tuple[int, ...]] | None,
    request: RecordDict | None,
    node: int,
) -> str | None:
    """Why Flower could not read this reply of ``node`` to ``request`` (``None``: it can)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    asked = request.config_records.get(RECORD_KEY_CONFIGS) if request is not None else None
    if asked is not None:
        stage = str(asked.get(Key.STAGE))
        if configs is None:
            return f"no '{RECORD_KEY_CONFIGS}' record in a reply to SecAgg+ stage '{stage}'"
        problem = _stage_reply_problem(stage, configs, asked, node)
        if problem is not None:
            return problem
        wanted_masks = request.config_records.get(MASKS_RECORD) if request is not None else None
        if wanted_masks is not None:
            named = content.config_records.get(MASKS_RECORD)
            if named is None or named.get(MASKS_KEY) != wanted_masks.get(MASKS_KEY):
                return (
                    "masked vector not drawn from the generator the server unmasks with "
                    f"({MASKS_GENERATOR}): a client app without it"
                )
    if shapes is not None and configs is not None and Key.MASKED_PARAMETERS in configs:
        try:
            raw = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
            masked = [load_npy(b) for b in raw]  # the decoder the workflow sums with
        except Exception as exc:  # any decoding failure: the reply is unusable
            return f"undecodable masked vector ({type(exc).__name__}: {exc})"
        got, expected = [a.shape for a in masked], [(1,), *shapes]  # the weight, then the model
        # integers int64 holds (the workflow adds them to int64 masks): numpy adds uint64
        # and int64 as float64, which the workflow's modulo then fails on
        if got != expected or any(
            a.dtype.kind not in "iu" or not np.can_cast(a.dtype, np.int64) for a in masked
        ):
            return (
                f"masked vector of shapes {got} and types {sorted({str(a.dtype) for a in masked})}"
                f", expected integers within int64 of shapes {expected}"
            )
    names = {*content.config_records, *content.metric_records, *content.array_records}
    # the results a fit / evaluate instruction is answered with (Flower reads them all)
    wanted = set() if request is None else {*request.config_records, *request.array_records}
    readers: tuple[tuple[str, str, Callable[[RecordDict], object]], ...] = (
        ("fitins.", "fitres.", lambda records: recorddict_to_fitres(records, True)),
        ("evaluateins.", "evaluateres.", recorddict_to_evaluateres),
    )
    for instruction, prefix, read in readers:
        if any(name.startswith(prefix) for name in names) or any(
            name.startswith(instruction) for name in wanted
        ):
            try:
                read(content)
            except Exception as exc:  # what Flower's conversion would raise mid-round
                return f"unreadable {prefix.rstrip('.')} ({type(exc).__name__}: {exc})"
    return None


def _stage_reply_problem(
    stage: str, configs: ConfigRecord, asked: ConfigRecord, node: int
) -> str | None:
    """Why Flower's SecAgg+ workflow could not read this reply of ``node`` to ``stage``
    (``None``: it can): the fields it reads, lists of equal length where it zips them,
    public keys it can parse (its neighbours would fail on them), in the share-keys stage
    one share for each neighbour it was sent the keys of, in the unmask stage only shares
    (of a share's layout) of the nodes the client was asked about."""

    def listed(key: str, kind: type) -> list[object] | None:
        value = configs.get(key)
        if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value
        ):
            return None
        return cast(list[object], value)

    if stage == Stage.SETUP:
        for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):
            value = configs.get(key)
            if not isinstance(value, bytes):
                return f"no public key '{key}' in its SecAgg+ setup reply"
            try:
                public_key = _flwr_asymmetric.bytes_to_public_key(value)
            except Exception as exc:  # what the neighbours' parse would raise
                return f"unreadable public key '{key}' ({type(exc).__name__})"
            # another kind of key (RSA) or curve parses, yet every neighbour's ECDH fails
            curve = _key_curve()
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
                public_key.curve, type(curve)
            ):
                return f"public key '{key}' not on the curve of SecAgg+'s keys ({curve.name})"
    elif stage == Stage.SHARE_KEYS:
        destinations = listed(Key.DESTINATION_LIST, int)
        ciphertexts = listed(Key.CIPHERTEXT_LIST, bytes)
        if destinations is None or ciphertexts is None or len(destinations) != len(ciphertexts):
            return "SecAgg+ share-keys reply without equally long lists of destinations and keys"
        # the neighbours whose keys it was sent (itself among them): a neighbour that got
        # its shares twice masks with its key twice, one that got none never does, and
        # either way the pairwise masks no longer cancel (the unmasked sum is noise)
        neighbours = sorted(int(key) for key in asked if key.isdecimal() and int(key) != node)
        if sorted(cast(list[int], destinations)) != neighbours:
            return "SecAgg+ share-keys reply whose destinations are not its neighbours, each once"
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        if listed(Key.MASKED_PARAMETERS, bytes) is None:
            return "no masked vector in its SecAgg+ reply"
    elif stage == Stage.UNMASK:
        nodes, shares = listed(Key.NODE_ID_LIST, int), listed(Key.SHARE_LIST, bytes)
        if nodes is None or shares is None or len(nodes) != len(shares):
            return "SecAgg+ unmask reply without equally long lists of nodes and shares"
        allowed = {
            *cast(list[int], asked.get(Key.ACTIVE_NODE_ID_LIST, [])),
            *cast(list[int], asked.get(Key.DEAD_NODE_ID_LIST, [])),
        }
        if len(set(nodes)) != len(nodes) or not set(nodes) <= allowed:
            return "SecAgg+ unmask reply with shares of nodes it was not asked about"
        if any(
            len(s) < INDEX + CHUNK or (len(s) - INDEX) % CHUNK for s in cast(list[bytes], shares)
        ):
            return "SecAgg+ unmask reply with a share of the wrong length"
    return None


@lru_cache(maxsize=1)
def _key_curve() -> ec.EllipticCurve:
    """The curve of the key pairs Flower's client mod makes (its ECDH needs both on it)."""
    return _flwr_asymmetric.generate_key_pairs()[1].curve


def _current_round(context: LegacyContext) -> int:
    value = context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]
    if not isinstance(value, int):
        raise TypeError(f"workflow round counter is {value!r}, expected an int")
    return value


def _global_parameters(context: LegacyContext) -> NDArrays:
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    return parameters_to_arrays(arrayrecord_to_parameters(record, keep_input=True))


def _set_global_parameters(context: LegacyContext, arrays: NDArrays) -> None:
    """Make ``arrays`` the global model, as Flower's workflows do with an aggregate."""
    context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), True
    )


def run_rounds(
    grid: Grid,
    context: Context,
    *,
    strategy: ValidatingFedAvg,
    num_rounds: int,
    secagg: SecAggSettings | None = None,
    round_timeout: float | None = None,
    on_round_end: RoundCallback | None = None,
    first_round: int = 1,
) -> int:
    """Run ``num_rounds`` rounds of fit + federated evaluation with ``strategy``.

    Fit uses ``SecAggPlusWorkflow`` when ``secagg`` is given, else Flower's default
    fit workflow; ``round_timeout`` (seconds) bounds every plain send/receive, not the
    SecAgg+ stages, which wait ``secagg.timeout`` (``None``: for all replies). After
    each round (fit, then evaluation) ``on_round_end`` gets a :class:`RoundReport`; an
    exception raised there stops the run (so a failing checkpoint is never silent),
    except :class:`~server.strategy.StopTraining`, which ends it cleanly.

    Rounds are numbered ``first_round .. first_round + num_rounds - 1`` (a run resumed
    from the checkpoint of round ``k`` passes ``first_round=k + 1``); the numbers reach
    the strategy, the clients' round config and the reports. Returns the number of
    rounds completed.
    """
    if first_round < 1:
        raise ConfigError(f"first_round must be >= 1, got {first_round}")
    stopped = threading.Event()
    # SecAgg+ stages wait for their own secagg timeout (None: no limit), never round_timeout
    secure_grid = _DefaultTimeoutGrid(grid, None, stopped)
    grid = _DefaultTimeoutGrid(grid, round_timeout, stopped)
    completed: list[int] = []
    legacy = LegacyContext(
        context=context,
        config=LegacyServerConfig(num_rounds=num_rounds, round_timeout=round_timeout),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    inner_fit = secagg.workflow() if secagg is not None else default_fit_workflow
    timing: dict[str, float] = {}

    def fit_workflow(grid: Grid, ctx: Context) -> None:
        assert isinstance(ctx, LegacyContext)
        # DefaultWorkflow counts 1..num_rounds and writes the counter before each
        # round; shift it so that every later reader sees the continued numbering.
        cfg = ctx.state.config_records[MAIN_CONFIGS_RECORD]
        cfg[WorkflowKey.CURRENT_ROUND] = _current_round(ctx) + first_round - 1
        _wait_for_cohort(ctx.client_manager, strategy, _current_round(ctx))
        timing["start"] = time.perf_counter()
        shapes = [a.shape for a in _global_parameters(ctx)]
        inner_fit(_WellFormedRepliesGrid(secure_grid if secagg is not None else grid, shapes), ctx)
        timing["fit_end"] = time.perf_counter()
        server_round = _current_round(ctx)
        halted = getattr(inner_fit, "halted_because", None)
        if server_round not in strategy.fit_stats:
            # SecAgg+ halts without calling aggregate_fit when too many clients drop; under
            # user-level DP the round, charged and sent, still releases the noise alone
            new, norm = strategy.release_noise_only(server_round)
            if new is not None:
                _set_global_parameters(ctx, new)
            log(
                ERROR,
                "round %s: fit aborted, %s",
                server_round,
                "global model unchanged" if new is None else "only the user-level DP noise applied",
            )
            sampled = strategy.sampled_in_round(server_round)
            strategy.fit_stats[server_round] = FitRoundStats(
                server_round=server_round,
                sampled=sampled,
                failed=sampled,
                secure_aggregation=secagg is not None,
                updated=new is not None,
                failures=(f"secure aggregation halted: {halted or 'not enough surviving clients'}",)
                if secagg is not None
                else ("no results",),
                update_norm=norm,
            )

    def evaluate_workflow(grid: Grid, ctx: Context) -> None:
        assert isinstance(ctx, LegacyContext)
        default_evaluate_workflow(_WellFormedRepliesGrid(grid, None), ctx)
        server_round = _current_round(ctx)
        completed.append(server_round)
        if on_round_end is None:
            return
        now = time.perf_counter()
        on_round_end(
            RoundReport(
                server_round=server_round,
                parameters=_global_parameters(ctx),
                fit=strategy.fit_stats[server_round],
                evaluate=strategy.eval_stats.get(server_round),
                fit_seconds=timing["fit_end"] - timing["start"],
                round_seconds=now - timing["start"],
            )
        )

    try:
        DefaultWorkflow(fit_workflow=fit_workflow, evaluate_workflow=evaluate_workflow)(
            grid, legacy
        )
    except StopTraining as stop:  # the last round done here, or by the run this resumes
        last = completed[-1] if completed else first_round - 1
        log(INFO, "run stopped %s: %s", f"after round {last}" if last else "before round 1", stop)
    finally:
        stopped.set()  # lets the node-updater thread exit if the workflow did not stop it
    return len(completed)


def _wait_for_cohort(
    client_manager: ClientManager, strategy: ValidatingFedAvg, server_round: int
) -> None:
    """Hold the round until the clients it needs are connected (``min-available-clients``,
    and at least the fewest a SecAgg+ round completes with: :meth:`clients_needed`).

    A round that started with fewer sampled nobody, yet was checkpointed, published and
    counted: a server started before its devices (or left with too few, e.g. after a
    revocation) used up all its rounds training nothing. Waiting keeps the round for when
    the devices are there; a warning every ``availability-timeout`` says what it waits for.
    """
    minimum = strategy.clients_needed()
    started = time.monotonic()
    poll_s = 0.05
    while True:
        available = wait_for_clients(
            client_manager, minimum, strategy.availability_timeout, poll_s=poll_s
        )
        if available >= minimum:
            return
        poll_s = 1.0  # a long wait: each poll asks the SuperLink for its nodes
        log(
            WARNING,
            "round %s waits for clients: %s of the %s it needs (min-available-clients, and "
            "the fewest a SecAgg+ round completes with) are connected after %.0f s; it "
            "starts once they are",
            server_round,
            available,
            minimum,
            time.monotonic() - started,
        )


_UNDER_SECAGG: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fedrec_under_secagg", default=False
)


def under_secagg() -> bool:
    """Whether the train handler now running was called by SecAgg+ (its update will only be
    seen inside the secure sum), for a client that must not release otherwise."""
    return _UNDER_SECAGG.get()


def secaggplus_when_requested_mod(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Client mod: run Flower's ``secaggplus_mod`` only for SecAgg+ train messages.

    Also turns any failure inside the protocol (bad stage order, too few neighbours,
    or the wrapped train handler replying with an error) into an error *reply*, so the
    server counts this client as dropped instead of the ClientApp crashing. The reply
    names the stage and the kind of failure only (:func:`client.client_app.error_kind`);
    the exception's text is logged on this client.
    """
    if msg.metadata.message_type != MessageType.TRAIN or not (
        msg.has_content() and SECAGG_RECORD in msg.content.config_records
    ):
        return call_next(msg, ctxt)
    stage = str(msg.content.config_records[SECAGG_RECORD].get(Key.STAGE, "?"))
    use_fast_secagg_helpers()
    inner_errors: list[Message] = []
    asked = msg.content.config_records.get(MASKS_RECORD)
    # masks from the whole seed where the server unmasks with them and this Flower has them
    full_seed = (
        asked is not None
        and asked.get(MASKS_KEY) == MASKS_GENERATOR
        and _masks_installed(_flwr_client_mod)
    )

    def guarded_next(inner_msg: Message, inner_ctxt: Context) -> Message:
        token = _UNDER_SECAGG.set(True)
        try:
            reply = call_next(inner_msg, inner_ctxt)
        finally:
            _UNDER_SECAGG.reset(token)
        if reply.has_error():
            inner_errors.append(reply)
            raise _HandlerReplied
        if _uniform_weight_requested(inner_msg.content) and reply.has_content():
            _report_unit_weight(reply.content)
        elif reply.has_content():
            _cap_weight(reply.content, inner_ctxt)
        return reply

    masks_token = _FULL_SEED_MASKS.set(full_seed)
    try:
        _refuse_unsafe_stage(stage, msg.content.config_records[SECAGG_RECORD], msg)
        reply = secaggplus_mod(msg, ctxt, guarded_next)
    except _HandlerReplied:
        return inner_errors[0]
    except Exception as exc:
        from client.client_app import error_kind  # client_app imports this module

        # as the ClientApp's own error replies: the server gets the kind of failure, this
        # client's log (the SuperNode's on a device) the exception, whose text can name
        # device details (its paths, its state) the server has no business with
        kind, text = error_kind(exc)
        log(
            WARNING,
            "SecAgg+ stage '%s' failed on this client (%s): %s: %s",
            stage,
            kind,
            type(exc).__name__,
            exc,
        )
        reason = f"secagg+ stage '{stage}' failed: {kind}: {text} (details in the client's log)"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )
    finally:
        _FULL_SEED_MASKS.reset(masks_token)
    if stage == Stage.COLLECT_MASKED_VECTORS and reply.has_content():
        _scrub_fit_reply(reply.content)
        if full_seed:
            reply.content.config_records[MASKS_RECORD] = ConfigRecord({MASKS_KEY: MASKS_GENERATOR})
    return reply


def _refuse_unsafe_stage(stage: str, configs: ConfigRecord, msg: Message) -> None:
    """Refuse (:class:`ConfigError`) a SecAgg+ instruction whose answer would let the server
    read this client's update or a neighbour's: Flower's client mod checks the types of the
    server's values, not what they reveal (:func:`_refuse_unsafe_setup`,
    :func:`_refuse_unsafe_unmask`). Each refusal is one no honest server (the project's
    :class:`SecAggSettings`, Flower's workflow) sends."""
    if stage == Stage.SETUP:
        _refuse_unsafe_setup(configs)
    elif stage == Stage.UNMASK:
        _refuse_unsafe_unmask(configs, msg.metadata.dst_node_id)


def _refuse_unsafe_setup(configs: ConfigRecord) -> None:
    """Refuse a setup whose reconstruction threshold is below 2 (with 1, every Shamir share
    is the secret itself: one neighbour's answer to an unmask request reveals this client's
    mask seed or key) or no strict majority of its share count (``2 * threshold >
    num_shares``; Flower's ``num_shares`` counts the share this client keeps: at or below
    half, a server that lists this client as active to some neighbours and as dropped to
    others collects both its seed and key shares, :meth:`SecAggSettings.majority`), or whose
    modulus the masks do not cover uniformly (a power of two, at
    most 2**32 (:func:`full_seed_masks` draws 32-bit words; under 2**40 its masks covered a
    sliver of the range and the masked vector still correlated with the update) and above
    the quantization range, which the update would otherwise wrap). Values of the wrong
    type are left to Flower's own check."""
    threshold, shares = configs.get(Key.THRESHOLD), configs.get(Key.SHARE_NUMBER)
    if is_int(threshold) and threshold < 2:
        raise ConfigError(
            f"SecAgg+ reconstruction threshold {threshold} < 2 (at 1 every share is the "
            "secret itself); refusing (a faulty or hostile server)"
        )
    if is_int(threshold) and is_int(shares) and not 2 * threshold > shares:
        raise ConfigError(
            f"SecAgg+ reconstruction threshold {threshold} is no strict majority of the "
            f"{shares} shares (2 * threshold > num_shares, this client's own share included): "
            "the server could tell some neighbours this client dropped out and others it is "
            "active, and unmask its update; refusing (a faulty or hostile server)"
        )
    modulus, levels = configs.get(Key.MOD_RANGE), configs.get(Key.TARGET_RANGE)
    if is_int(modulus) and is_int(levels) and not is_usable_modulus(modulus, levels):
        raise ConfigError(
            f"SecAgg+ modulus {modulus} is no power of two in (quantization range {levels}, "
            "2**32]: the masks would not hide the update in it; refusing (a faulty or "
            "hostile server)"
        )


def _refuse_unsafe_unmask(configs: ConfigRecord, own_id: int) -> None:
    """Refuse an unmask request that

    * lists a node both as active (asking for the share of its private mask seed) and as
      dead (the share of its mask key): with both a server strips every mask off that
      node's own vector and reads its update. Flower's client mod sends both (Bonawitz et
      al. 2017 require the sets disjoint);
    * lists a node twice: Flower checks the active list's *length* against the threshold,
      so ``[target] * threshold`` as active and every other neighbour as dead passed, and
      ``threshold`` such answers gave the target's seed and every other node's key, which
      is the target's update;
    * lists this client as dead: it is answering, and the share of its own mask key is
      what no honest request asks for.
    """
    active = cast(list[int], configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    dead = cast(list[int], configs.get(Key.DEAD_NODE_ID_LIST, []))
    both = sorted(set(active) & set(dead))
    if both:
        raise ConfigError(
            f"the unmask request lists node(s) {both[:5]} as both active and dropped: both "
            "shares would unmask that node's own update; refusing (a faulty or hostile server)"
        )
    for name, nodes in (("active", active), ("dropped", dead)):
        if len(set(nodes)) != len(nodes):
            raise ConfigError(
                f"the unmask request lists a node more than once as {name}: repeated ids "
                "pass the threshold with fewer nodes; refusing (a faulty or hostile server)"
            )
    if own_id in dead:
        raise ConfigError(
            "the unmask request lists this client as dropped, asking for the share of its "
            "own mask key; refusing (a faulty or hostile server)"
        )


def _uniform_weight_requested(content: RecordDict) -> bool:
    """Whether the fit instruction's config asks for weight 1 (user-level DP)."""
    config = content.config_records.get(FITINS_CONFIG)
    return config is not None and config.get(CONFIG_UNIFORM_WEIGHT) is True


def _report_unit_weight(content: RecordDict) -> None:
    """Replace a positive ``num_examples`` with 1 before ``secaggplus_mod`` masks it.

    SecAgg+ sums ``r * update`` with ``r = num_examples / max_weight`` and divides by
    the summed ``r``; with every ``r`` equal the result is the plain mean of the
    contributors, which is what user-level DP needs (sensitivity ``C`` per client).
    Declined clients keep weight 0.
    """
    record = content.metric_records.get(FITRES_NUM_EXAMPLES)
    if record is None:
        return
    value = record.get("num_examples", 0)
    if isinstance(value, int | float) and value > 0:
        content.metric_records[FITRES_NUM_EXAMPLES] = MetricRecord({"num_examples": 1})


def _cap_weight(content: RecordDict, ctxt: Context) -> None:
    """Cap ``num_examples`` at the round's ``max_weight`` before ``secaggplus_mod`` masks it.

    The modulus holds a cohort of ``max_cohort`` weights of at most 1 (``num_examples /
    max_weight``); Flower only warns about a larger one, whose weighted update then wraps
    the sum or shrinks the clipping bound to ``clipping_range / r``. Capped, no client that
    runs this mod moves the aggregate by more than the clipping range allows (the server
    cannot check: the weight is masked). A weight that is not a finite number >= 0 is 0.
    """
    record = content.metric_records.get(FITRES_NUM_EXAMPLES)
    state = ctxt.state.config_records.get(_FLWR_STATE_RECORD)
    if record is None or state is None:
        return
    value, limit = record.get("num_examples", 0), state.get("max_weight", 0.0)
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        capped: float = 0
    elif isinstance(limit, int | float) and 0 < limit < value:
        log(WARNING, "weight %s capped at the round's secagg-max-weight %s", value, limit)
        capped = int(limit) if float(limit).is_integer() else limit
    else:
        return
    content.metric_records[FITRES_NUM_EXAMPLES] = MetricRecord({"num_examples": capped})


def _scrub_fit_reply(content: RecordDict) -> None:
    """Under SecAgg+, reveal no per-client statistics next to the masked vector.

    Flower's ``secaggplus_mod`` masks the weighted update (and the weight), but leaves
    the ``FitRes`` metrics and ``num_examples`` in clear text. Keep only the
    ok/declined status (needed to count declines; participation is visible anyway)
    and report ``num_examples`` as 0.
    """
    metrics = content.config_records.get(FITRES_METRICS)
    status = metrics.get(METRIC_STATUS, FitStatus.OK.value) if metrics is not None else "ok"
    content.config_records[FITRES_METRICS] = ConfigRecord({METRIC_STATUS: status})
    if FITRES_NUM_EXAMPLES in content.metric_records:
        content.metric_records[FITRES_NUM_EXAMPLES] = MetricRecord({"num_examples": 0})


class _HandlerReplied(Exception):
    """Internal: the wrapped train handler already replied with an error."""
