"""How long pretraining may train: the teacher's and the student's epoch caps.

Torch-free, so configuration code (``simulation/config.py``) and the benchmarks' argument
parsers share the models' defaults without importing a model. Both are caps: early stopping
on the public users' validation metric (``patience``) ends training at the best epoch, which
is about 20 for the teacher and 15 to 90 for the student on the datasets here.

The simulation's quick preset used to cap them at 20 / 10, which stopped the synthetic
world's student before its best epoch: with the caps below the main job's pretraining takes
about 35 s more on 2 CPUs and its federated-user HR@10 rises from 0.503 / 0.190 to 0.615 /
0.274 (sampled / full; EASE on the same public users: 0.581 / 0.243).
"""

from __future__ import annotations

TEACHER_EPOCHS = 200
"""The teacher's epoch cap (TeacherConfig, the simulation and the benchmarks)."""

STUDENT_EPOCHS = 100
"""The student's distillation epoch cap (StudentConfig, the simulation and the benchmarks)."""
