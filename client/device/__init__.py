"""The on-device side of fedrec: identity, encrypted local store, sealed models, local API.

``fedrec client init`` creates the identity (:mod:`client.device.identity`), ``fedrec client
start`` runs the :class:`~client.device.daemon.Daemon`: it owns the encrypted SQLite store
(:mod:`client.device.store`), the sealed int8 ONNX models (:mod:`client.device.sealed`) and
serves the local HTTP API (:mod:`client.device.api`) on 127.0.0.1. The Flower SuperNode will
run next to the API as a process the daemon manages (:class:`~client.device.daemon.ProcessSpec`).

Import the submodules directly; this package re-exports nothing so that importing one part
(e.g. the store in the training process) does not pull in FastAPI.
"""
