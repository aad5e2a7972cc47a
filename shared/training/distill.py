"""Knowledge distillation from the teacher into the student (server side, public users).

Objective (Hinton et al. 2015), per next-item example::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
      + (1 - alpha) * CE(student, true next item)

The ``T^2`` keeps the KL gradients on the same scale as the cross-entropy's whatever the
temperature. Both distributions are over the whole catalog.

Batches are built so the (expensive) teacher runs once per window: a batch holds teacher
windows (:func:`shared.training.trainer.make_causal_windows`), one causal teacher pass gives
its logits at *every* position, and :func:`prefix_windows` cuts the student's input for each
position (the last ``student max_len`` items up to it) out of the same window. One window of
``L`` items thus yields up to ``L`` student examples without ``L`` teacher passes. (Those
logits are the window's, its positions numbered from its end: within 0.3% of top-10 overlap
of scoring each prefix alone, see :mod:`shared.models.teacher`.)

About a fifth of the teacher's probability sits on items already in the prefix, which are
never recommended (``exclude-seen``). Masking them out of both distributions, so the KL
covers only what can be ranked, was tried and left out: the distilled student did not move
(ml-100k split 42, federated users, fp32 sampled / full HR@10 0.666 / 0.162 against
0.667 / 0.163; ad hoc, same teacher).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shared.data.dataset import IntArray
from shared.errors import ConfigError, DataError
from shared.models.base import Scorer, check_histories
from shared.models.sequence import IGNORE_TARGET, PAD_ITEM, module_device
from shared.training.device import to_device
from shared.training.trainer import (
    Batch,
    LossFn,
    TrainHistory,
    Validation,
    fit_with_early_stopping,
    limited_threads,
    make_causal_windows,
    make_loader,
    seeded,
    train_epoch,
    trim_padding,
)

if TYPE_CHECKING:
    from shared.models.student import StudentConfig, StudentModel
    from shared.models.teacher import TeacherNet


def check_temperature(temperature: float) -> None:
    """Refuse (:class:`ConfigError`) a distillation temperature that is not a finite number
    > 0: an infinite one flattened both distributions to uniform and made every loss NaN
    (``inf * 0``), which training reported as a learning rate to lower."""
    if not 0 < temperature < math.inf:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` with both softened by ``T``, batch mean.

    Exactly 0 when the logits are equal (up to a per-row constant), positive otherwise.
    """
    check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * distillation_loss + (1 - alpha) * cross_entropy(student, targets)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    loss = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
    if alpha > 0:
        loss = loss + alpha * distillation_loss(student_logits, teacher_logits, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


def prefix_windows(
    items: torch.Tensor, mask: torch.Tensor, select: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every selected position ``(b, j)``, the last ``max_len`` items of ``items[b, :j+1]``.

    ``items``/``mask``/``select`` are ``[B, L]``; returns left-padded ``items``/``mask``
    ``[N, max_len]`` in row-major order of ``select`` (the order of ``x[select]``).
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    padded = F.pad(items, (max_len - 1, 0), value=PAD_ITEM)
    padded_mask = F.pad(mask, (max_len - 1, 0), value=False)
    windows = padded.unfold(1, max_len, 1)  # [B, L, max_len]
    window_masks = padded_mask.unfold(1, max_len, 1)
    return windows[select], window_masks[select]


def kd_batch_loss(teacher: TeacherNet, config: StudentConfig) -> LossFn:
    """The distillation loss of one batch of teacher windows ``(items, mask, targets)``
    (:func:`kd_objective` over every position with a target).

    The batch stays on the CPU, where the loader made it, for what only picks positions
    (trimming the padding, the positions with a target, the student's prefix windows): no
    device round trip for a shape. Only the model inputs move: the teacher's window to the
    teacher's device, the student's prefixes to the student's; the teacher's logits at the
    chosen positions go to the student's device.
    """

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        device, teacher_device = module_device(model), module_device(teacher)
        items, mask, targets = trim_padding(*batch)
        select = targets != IGNORE_TARGET
        positions = select.flatten().nonzero().squeeze(1)  # the order of x[select]
        with torch.no_grad():
            window = to_device((items, mask, positions), teacher_device)
            logits = teacher.all_logits(window[0], window[1])
            teacher_logits = logits.flatten(0, 1).index_select(0, window[2]).to(device)
        student_items, student_mask = prefix_windows(items, mask, select, config.max_len)
        student_items, student_mask = trim_padding(student_items, student_mask)
        student_logits = model(
            *to_device((student_items, student_mask), device), gather_first=False
        )
        return kd_objective(
            student_logits,
            teacher_logits,
            targets[select].to(device),
            config.temperature,
            config.alpha,
        )

    return loss


def distill(
    student: StudentModel,
    teacher: TeacherNet,
    sequences: Sequence[IntArray],
    config: StudentConfig,
    *,
    teacher_max_len: int,
    validation: Validation | None = None,
    scorer: Scorer | None = None,
    progress: bool = False,
    num_threads: int | None = None,
) -> TrainHistory:
    """Train ``student``'s trainable parameters to mimic ``teacher`` on ``sequences``.

    Only parameters with ``requires_grad`` are optimised (call
    ``student.set_trainable(['global'])`` first). The teacher is frozen and run in eval
    mode. With ``validation`` and ``scorer`` (a :class:`Scorer` wrapping ``student``), early
    stopping selects the best epoch on ``config.metric``; otherwise all epochs run.

    Training runs where ``student`` is (move it before calling: its dropout draws from that
    device's generator, seeded here); the teacher's logits are computed where the teacher
    is and brought over. Batches are made and shuffled on the CPU (:func:`kd_batch_loss`).
    """
    check_histories(sequences, student.n_items, "distillation sequence")
    windows = make_causal_windows(sequences, teacher_max_len)
    if len(windows) == 0:
        raise DataError("no distillation sequence has two or more items")
    if validation is not None and scorer is None:
        raise ConfigError("validation needs a scorer that wraps the student")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the student has no trainable parameters; call set_trainable first")
    teacher.eval()
    train_config = config.train_config(progress, num_threads)
    loss_fn = kd_batch_loss(teacher, config)

    with limited_threads(num_threads), seeded(config.seed + 1) as gen:
        loader = make_loader(windows.dataset(), config.batch_size, gen, lengths=windows.mask.sum(1))
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

        def run_epoch(epoch: int) -> float:
            return train_epoch(student, loader, optimizer, loss_fn, config.grad_clip)

        def validate() -> float:
            assert validation is not None and scorer is not None
            return validation.metric(scorer, config.metric)

        return fit_with_early_stopping(
            student,
            run_epoch,
            validate if validation is not None else None,
            train_config,
            desc="distill",
        )
