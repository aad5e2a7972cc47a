"""Code shared by the server, the clients and the simulation.

Importing it turns ONNX Runtime's telemetry off for this process and the processes it
starts (``ORT_DISABLE_TELEMETRY=1``, unless the environment sets the variable itself):
its Linux and macOS wheels (1.32 on) otherwise upload usage events to Microsoft and keep
a persistent device identifier in ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``,
which an on-device recommender that keeps its users' data local must not do, and with
an unwritable home folder it printed "Failed to persist telemetry device ID" on every
command that loads a model. The variable is read when onnxruntime is imported, so it
is set here, before any module of the project imports onnxruntime; its logging, and so
its real errors, are untouched."""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
