"""Defaults of the teacher's item-item prior (EASE scores added to its log-probabilities).

Torch-free, so configuration code (``simulation/config.py``) shares the teacher's default
without importing a model. The prior itself is :class:`shared.models.teacher.ItemItemPrior`;
why it is off by default is in :class:`shared.models.teacher.TeacherConfig`.
"""

from __future__ import annotations

DEFAULT_PRIOR = False
"""The teacher's and the simulation's default (``teacher-prior``)."""

PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
"""The weights that validation chooses from (0: no term)."""

PRIOR_MAX_ITEMS = 10_000
"""Largest catalog that gets the prior: its table is ``n x n`` floats (400 MB here)."""
