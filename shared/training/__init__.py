"""Training utilities shared by the server (teacher, distillation) and the federated client.

* :mod:`shared.training.trainer`: seeding, example builders, one-epoch loop, early stopping
  on the protocol's validation metric.
* :mod:`shared.training.distill`: the distillation objective and the teacher -> student loop.
"""

from shared.training.distill import distill, distillation_loss, kd_objective, prefix_windows
from shared.training.trainer import (
    CausalWindows,
    EarlyStopping,
    LengthBucketSampler,
    NextItemExamples,
    TrainConfig,
    TrainHistory,
    TrainingDivergedError,
    Validation,
    count_parameters,
    fit_with_early_stopping,
    limited_threads,
    make_causal_windows,
    make_loader,
    make_next_item_examples,
    next_item_loss,
    seeded,
    train_epoch,
    trim_padding,
)

__all__ = [
    "CausalWindows",
    "EarlyStopping",
    "LengthBucketSampler",
    "NextItemExamples",
    "TrainConfig",
    "TrainHistory",
    "TrainingDivergedError",
    "Validation",
    "count_parameters",
    "distill",
    "distillation_loss",
    "fit_with_early_stopping",
    "kd_objective",
    "limited_threads",
    "make_causal_windows",
    "make_loader",
    "make_next_item_examples",
    "next_item_loss",
    "prefix_windows",
    "seeded",
    "train_epoch",
    "trim_padding",
]
