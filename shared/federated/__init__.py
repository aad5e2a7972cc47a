"""Model-agnostic federation layer: the task interface and update validation.

Import-light on purpose (NumPy only, no Flower, no torch): it is loaded by every
simulated client. The Flower glue lives in ``server/`` and ``client/``.
"""

from shared.federated.task import (
    CONFIG_SERVER_ROUND,
    CONFIG_UPDATE_CLIP_NORM,
    METRIC_REASON,
    METRIC_STATUS,
    ArraysKind,
    ClientStateful,
    EvalOutcome,
    FederatedTask,
    FitOutcome,
    FitStatus,
    ToyLinearConfig,
    ToyLinearTask,
    available_tasks,
    get_task,
    register_task,
)
from shared.federated.validation import (
    InvalidUpdateError,
    check_finite,
    check_structure,
    clip_update_l2,
    find_problem,
    l2_norm,
    validate_update,
)

__all__ = [
    "CONFIG_SERVER_ROUND",
    "CONFIG_UPDATE_CLIP_NORM",
    "METRIC_REASON",
    "METRIC_STATUS",
    "ArraysKind",
    "ClientStateful",
    "EvalOutcome",
    "FederatedTask",
    "FitOutcome",
    "FitStatus",
    "InvalidUpdateError",
    "ToyLinearConfig",
    "ToyLinearTask",
    "available_tasks",
    "check_finite",
    "check_structure",
    "clip_update_l2",
    "find_problem",
    "get_task",
    "l2_norm",
    "register_task",
    "validate_update",
]
