"""How a sequential model reads a training history: in time order, or as a set.

Torch-free, so configuration code (``simulation/config.py``) can validate the choice
without importing a model. The training itself is in :mod:`shared.models.teacher`.

* ``'sequence'``: next item after each prefix, in time order (SASRec).
* ``'set'``: each epoch a history is put in a random order and the items already in the
  prefix are excluded from the softmax; the model learns which item completes a set of
  interests. It fits data whose order carries little signal and whose few histories must
  each yield many training contexts.
* ``'auto'``: train both, keep the better one on validation.
"""

from __future__ import annotations

from typing import Literal, get_args

Reading = Literal["sequence", "set"]
"""A concrete way of reading a history (what ``'auto'`` chooses between)."""
Order = Literal["sequence", "set", "auto"]
ORDERS: tuple[Order, ...] = get_args(Order)
DEFAULT_ORDER: Order = "auto"
"""The teacher's and the simulation's default."""
