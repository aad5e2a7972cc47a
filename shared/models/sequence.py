"""Torch building blocks shared by the teacher, the student and the federated client.

* :func:`pad_histories` turns ragged item histories into fixed-shape tensors: the **last**
  ``max_len`` items, **left**-padded, plus a boolean mask. Left padding puts the most recent
  item at position ``L - 1`` for every row, so "the user's latest item" is a static slice
  (``h[:, -1]``) rather than a data-dependent gather: the scoring graph stays free of
  data-dependent control flow and exports to ONNX with a dynamic sequence length.
* :func:`recency_index` numbers positions by distance from the end of the window (0 = most
  recent). A history right-aligned in a window of *any* length gets the same position ids, so
  a model trained on windows of length 200 scores a 7-item history padded to 7 identically.
* :class:`ItemRepresentation` builds an item's vector from its (frozen) language-model text
  embedding, projected, plus an ID embedding that is either learned (teacher) or frozen
  (student, where it is a compressed copy of the teacher's item table).

Padded positions hold item id ``PAD_ITEM`` (a valid id, 0) and ``mask == False``; every model
must ignore them through the mask, never through the id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from shared.data.dataset import IntArray
from shared.errors import ConfigError
from shared.models.base import check_histories

PAD_ITEM = 0
"""Item id stored at padded positions (always paired with ``mask == False``)."""

IGNORE_TARGET = -100
"""Target id meaning "no next item here"; the default ``ignore_index`` of cross-entropy."""

MASKED_LOGIT = -1e9
"""Finite stand-in for -inf in masked softmaxes: an all-padding row stays finite, not NaN."""


def pad_histories(
    histories: Sequence[IntArray | Sequence[int]],
    max_len: int,
    *,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last ``max_len`` items of each history and left-pad them.

    Returns ``(items, mask)``: ``items`` is ``LongTensor[B, L]`` with ``PAD_ITEM`` at padded
    positions, ``mask`` is ``BoolTensor[B, L]`` (True = real item). ``L`` is the longest
    truncated history (at least 1, so an empty history gives one fully masked position), or
    ``pad_to`` when given (it must be >= that length and <= ``max_len``).
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    trimmed = [np.asarray(h, dtype=np.int64)[-max_len:] for h in histories]
    longest = max((len(h) for h in trimmed), default=0)
    length = max(longest, 1) if pad_to is None else pad_to
    if length < longest or length > max_len:
        raise ConfigError(f"pad_to={pad_to} must be in [{longest}, {max_len}]")
    items = np.full((len(trimmed), length), PAD_ITEM, dtype=np.int64)
    mask = np.zeros((len(trimmed), length), dtype=bool)
    for row, h in enumerate(trimmed):
        if len(h):
            items[row, length - len(h) :] = h
            mask[row, length - len(h) :] = True
    return torch.from_numpy(items), torch.from_numpy(mask)


def recency_index(batch: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """``LongTensor[batch, length]`` with ``length-1 ... 1, 0``: distance from the window end.

    Expanded to the batch (not broadcast) because Opacus computes an ``nn.Embedding``'s
    per-sample gradient from its batch-first input indices.
    """
    idx = torch.arange(length - 1, -1, -1, device=device, dtype=torch.long)
    return idx.unsqueeze(0).expand(batch, length)


def frozen_embedding(matrix: torch.Tensor | npt.NDArray[np.float32]) -> nn.Embedding:
    """An ``nn.Embedding`` holding ``matrix`` with ``requires_grad=False``.

    A frozen *parameter* rather than a buffer so that parameter-group bookkeeping (global /
    personal / frozen) covers it, and so Opacus, which skips modules without trainable
    parameters, never sees a trainable layer with buffers.
    """
    weight = torch.as_tensor(np.asarray(matrix, dtype=np.float32))
    if weight.ndim != 2:
        raise ConfigError(f"frozen embedding must be 2-D, got shape {tuple(weight.shape)}")
    return nn.Embedding.from_pretrained(weight.clone(), freeze=True)


class ItemRepresentation(nn.Module):
    """``rep(i) = text_proj(text[i]) + id_proj(id_embedding[i])``.

    ``text_features`` (items x t) are language-model embeddings of the item text; they are
    always frozen. The ID part is a learned ``nn.Embedding(n_items, d)`` when ``id_features``
    is None (teacher), or a frozen table (items x k) followed by a learned ``Linear(k, d)``
    (student). The text part gives every item, even one with no interactions, a sensible
    vector; the ID part carries the collaborative signal text cannot.

    ``forward(items)`` gathers first and projects second, so every learned layer sees a
    batch-first input (what Opacus' per-sample gradient hooks need). :meth:`table` gives the
    representation of every item at once, for output layers and export.
    """

    def __init__(
        self,
        text_features: torch.Tensor | npt.NDArray[np.float32],
        dim: int,
        id_features: torch.Tensor | npt.NDArray[np.float32] | None = None,
        id_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ConfigError(f"item representation dim must be >= 1, got {dim}")
        self.text = frozen_embedding(text_features)
        n_items, text_dim = self.text.weight.shape
        self.text_proj = nn.Linear(text_dim, dim)
        self.ids: nn.Embedding
        self.id_proj: nn.Linear | None
        if id_features is None:
            self.ids = nn.Embedding(n_items, dim)
            nn.init.normal_(self.ids.weight, std=id_init_std)
            self.id_proj = None
        else:
            self.ids = frozen_embedding(id_features)
            if self.ids.weight.shape[0] != n_items:
                raise ConfigError(
                    f"id features cover {self.ids.weight.shape[0]} items, text {n_items}"
                )
            self.id_proj = nn.Linear(self.ids.weight.shape[1], dim, bias=False)
        self.dim = dim

    @property
    def n_items(self) -> int:
        return int(self.text.weight.shape[0])

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """``items`` of any shape -> representations of shape ``items.shape + (dim,)``."""
        id_part = self.ids(items)
        if self.id_proj is not None:
            id_part = self.id_proj(id_part)
        out: torch.Tensor = self.text_proj(self.text(items)) + id_part
        return out

    def table(self) -> torch.Tensor:
        """Every item's representation, ``(n_items, dim)``."""
        id_part = self.ids.weight
        if self.id_proj is not None:
            id_part = self.id_proj(id_part)
        out: torch.Tensor = self.text_proj(self.text.weight) + id_part
        return out


def next_item_cross_entropy(
    logits: torch.Tensor,
    items: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    *,
    exclude_seen: bool = True,
) -> torch.Tensor:
    """Mean cross-entropy of next-item ``logits [B, n_items]`` for windows ``items``/``mask``
    ``[B, L]`` against ``targets [B]``.

    ``exclude_seen``: the items of a row's window get no probability mass (its target is
    never excluded, should a dataset repeat it). No dataset here repeats an item and the
    protocol never recommends one the user has, so what matters is how the next item ranks
    among the *unseen* ones; a plain softmax also pushes the window's own items (those most
    like the target, in a world of stable tastes) below it, which is not the task. The
    teacher's ``'set'`` reading trains the same way.
    """
    if exclude_seen:
        seen = torch.zeros(logits.shape, dtype=torch.uint8, device=logits.device)
        seen.scatter_reduce_(1, items, mask.to(torch.uint8), reduce="amax")
        seen.scatter_(1, targets.unsqueeze(1), 0)
        logits = logits.masked_fill(seen.bool(), MASKED_LOGIT)
    return nn.functional.cross_entropy(logits, targets)


def causal_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[B, 1, L, L]`` (True = may attend) for causal self-attention.

    Query ``i`` attends to real keys ``j <= i``, and always to itself, so a padded query (all
    of whose earlier keys are padding) still has one key and its softmax is not NaN. Outputs
    at padded positions are meaningless and must be ignored by the caller.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & mask.unsqueeze(1)
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=mask.device).unsqueeze(0)
    return allowed.unsqueeze(1)


def svd_compress(
    matrix: torch.Tensor | npt.NDArray[np.float32], dim: int, *, center: bool = False
) -> npt.NDArray[np.float32]:
    """Best rank-``dim`` coordinates (``U_k S_k``) of ``matrix``'s rows, scaled to unit RMS.

    Used to hand a student a small frozen copy of a big item table: dot products with the
    rows are preserved as well as any ``dim``-dimensional linear map can. ``center`` removes
    the column mean first (plain PCA). If ``dim`` exceeds the rank, zero columns pad the
    result so the shape is always ``(rows, dim)``.
    """
    x = np.asarray(
        matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix,
        dtype=np.float64,
    )
    if x.ndim != 2 or dim < 1:
        raise ConfigError(f"svd_compress needs a 2-D matrix and dim >= 1, got {x.shape}, {dim}")
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(dim, len(s))
    coords = np.zeros((x.shape[0], dim), dtype=np.float64)
    coords[:, :k] = u[:, :k] * s[:k]
    rms = float(np.sqrt(np.mean(coords**2)))
    if rms > 0:
        coords /= rms
    return coords.astype(np.float32)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for one with neither),
    where inputs built on the CPU must go before a forward pass."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def score_histories(
    model: nn.Module,
    histories: Sequence[IntArray],
    max_len: int,
    n_items: int,
    batch_size: int = 256,
) -> npt.NDArray[np.float32]:
    """``model(items, mask) -> [B, n_items]`` over ``histories`` in eval mode, as numpy.

    Each history is cut to its last ``max_len`` items and left-padded to the longest in its
    batch; models that number positions by recency score it exactly as in a longer window.
    The batches go to the device the model's parameters are on (a model on a GPU scores
    there), and the scores come back to the CPU. Ids outside the catalog are refused
    (:func:`~shared.models.base.check_histories`).
    """
    check_histories(histories, n_items)
    device = module_device(model)
    was_training = model.training
    model.eval()
    out = np.empty((len(histories), n_items), dtype=np.float32)
    try:
        with torch.no_grad():
            for start in range(0, len(histories), batch_size):
                items, mask = pad_histories(histories[start : start + batch_size], max_len)
                scores = model(items.to(device), mask.to(device))
                out[start : start + len(items)] = scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out
