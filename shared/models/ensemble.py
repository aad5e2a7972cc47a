"""How many independently seeded teachers vote: the ensemble size.

Torch-free, so configuration code (``simulation/config.py``) can validate it without
importing a model. The ensemble itself is :class:`shared.models.teacher.SASRecEnsemble`:
members of one architecture, each early-stopped on its own, whose next-item
log-probabilities are averaged. A teacher fitted to a few hundred public users carries
seed-specific noise that does not transfer to new users; averaging seeds removes part of it,
at the price of pretraining time only (the teacher never leaves the server).
"""

from __future__ import annotations

DEFAULT_MEMBERS = 1
"""The teacher's and the simulation's default."""
