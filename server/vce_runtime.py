"""Two fixes to Flower's simulation engine (the "VCE" runtime behind
``flwr.simulation.run_simulation``) that make each message cheaper to deliver.

Flower 1.42 delivers every instruction of a round in three hops: a dispatcher thread
moves it from the LinkState to a queue, a worker thread takes it from the queue and
runs it on a Ray actor, waits for the reply and stores it. Both hops cost more than the
work of a small client:

* **Dispatch.** ``vce_api.add_messages_to_queue`` asks the LinkState, every 0.1 s, for
  the next message of *each registered node*; the in-memory LinkState answers each
  request by scanning every stored message. A sweep is O(nodes x messages in flight)
  under the state's lock (12 ms for 50 nodes with a 50-client stage in flight; it grows
  with the square of the population), and each stage of a round waits 50 ms on average
  for the next sweep. :func:`add_pending_messages_to_queue` does the same job from one
  scan: only the nodes that have an undelivered instruction are asked, through the
  state's own ``get_message_ins`` (its expiry checks, its delivered mark), every
  ``DISPATCH_INTERVAL_S``. What reaches the workers, and in which order per node, is
  unchanged. A state without an in-memory store is left to Flower's loop.
* **Round trips.** The Ray backend keeps one job per actor: while the driver
  serializes the next message and stores the last reply (3.5 ms per message on 2 CPUs)
  the actor idles. A SecAgg+ round sends four messages per client, a plain round one,
  so this idle time is most of what SecAgg+ adds. :class:`PipelinedRayBackend` gives
  each actor ``JOBS_PER_ACTOR`` slots, so the next job is already queued at the actor
  when one finishes. A Ray actor still runs one job at a time, in order. An actor whose
  process died is replaced (:func:`replace_dead_actors`): Flower kept it in the pool.

A third change is about results, not speed. Flower registers the simulated nodes under
random ids, drawn anew in every process, while the server samples its cohorts from the
sorted node ids with a seeded generator (:class:`server.strategy.ValidatingFedAvg`): the same
seed then picked other clients in every run, and a resumed run other clients than an
uninterrupted one. :func:`register_nodes_in_partition_order` registers node ``i`` (the
client of partition ``i``) as ``SIMULATED_NODE_ID_BASE + i``, as the in-process backend
does, so a seed fixes the cohorts.

:func:`tune_simulation_runtime` puts all three into Flower's modules (idempotent; a Flower
whose modules no longer hold its own objects under these names is left alone);
:func:`server.server_app.run_simulation` calls it before every simulation.
"""

from __future__ import annotations

import importlib
import signal
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from queue import Queue
from typing import Any

from flwr.clientapp import ClientApp
from ray.exceptions import ActorDiedError

from server.flower_patch import replace_if_unchanged
from server.server_app import SIMULATED_NODE_ID_BASE

__all__ = [
    "DISPATCH_INTERVAL_S",
    "JOBS_PER_ACTOR",
    "TERMINATE_WAIT_S",
    "PipelinedRayBackend",
    "add_pending_messages_to_queue",
    "pending_node_ids",
    "register_nodes_in_partition_order",
    "replace_dead_actors",
    "tune_simulation_runtime",
]

DISPATCH_INTERVAL_S = 0.005
JOBS_PER_ACTOR = 2
TERMINATE_WAIT_S = 15.0

_vce_api = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")
_linkstate = importlib.import_module("flwr.server.superlink.linkstate.in_memory_linkstate")
_flower_register: Callable[..., dict[int, int]] = _vce_api._register_nodes
_registration = threading.Lock()
_DRAW = "generate_rand_int_from_bytes"  # how the in-memory LinkState picks a node id
_ray_backend = importlib.import_module("flwr.server.superlink.fleet.vce.backend.raybackend")
_flower_dispatch: Callable[..., None] = _vce_api.add_messages_to_queue
_FlowerRayBackend: type = _ray_backend.RayBackend
_GPU_OVERRIDE_TIP = "Tip: In future versions of Ray, Ray will no longer override accelerator"


def register_nodes_in_partition_order(num_nodes: int, state_factory: Any) -> dict[int, int]:
    """Drop-in for ``vce_api._register_nodes``: the same registration, with node ``i``
    registered as ``SIMULATED_NODE_ID_BASE + i`` instead of a random id (the in-memory
    LinkState draws its ids from ``generate_rand_int_from_bytes``, replaced meanwhile)."""
    ids = iter(range(SIMULATED_NODE_ID_BASE, SIMULATED_NODE_ID_BASE + num_nodes))
    draw = getattr(_linkstate, _DRAW)
    with _registration:
        setattr(_linkstate, _DRAW, lambda *args, **kwargs: next(ids))
        try:
            mapping = _flower_register(num_nodes, state_factory)
        finally:
            setattr(_linkstate, _DRAW, draw)
    if sorted(mapping) != [SIMULATED_NODE_ID_BASE + i for i in sorted(mapping.values())]:
        raise RuntimeError(  # a Flower whose LinkState draws ids elsewhere: say so, loudly
            "simulated nodes were not registered in partition order; Flower's LinkState "
            "changed (see server/vce_runtime.py)"
        )
    return mapping


def pending_node_ids(state: Any) -> list[int] | None:
    """Destination nodes of the stored, undelivered instructions, in storage order, each
    once; ``None`` when ``state`` does not expose an in-memory message store."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        messages = list(store.values())
    pending = (m.metadata.dst_node_id for m in messages if m.metadata.delivered_at == "")
    return list(dict.fromkeys(pending))


def add_pending_messages_to_queue(
    state: Any,
    queue: Queue[Any],
    nodes_mapping: Mapping[int, int],
    f_stop: threading.Event,
) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue``: until ``f_stop`` is set, put each
    node's next undelivered instruction on ``queue``, asking only nodes that have one."""
    if pending_node_ids(state) is None:
        _flower_dispatch(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for node_id in pending_node_ids(state) or ():
            if node_id in nodes_mapping:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
        f_stop.wait(DISPATCH_INTERVAL_S)


class PipelinedRayBackend(_FlowerRayBackend):
    """Flower's ``RayBackend`` with ``JOBS_PER_ACTOR`` jobs in flight per actor.

    The runtime starts one worker thread per pool slot (``num_workers``), so each actor
    gets ``JOBS_PER_ACTOR`` threads feeding it. Termination stops each actor once.

    Starting Ray also keeps the process's own SIGTERM handler: ``ray.init`` replaces it
    (Ray's core worker installs a C++ handler that aborts with a stack dump), so a program
    that handles SIGTERM, like ``fedrec simulate`` stopping with a resume hint, lost it as
    soon as the engine started. A handler that is not a Python function (the default) is
    left to Ray. Ray's warning that it will stop hiding the GPUs from clients without a GPU
    share is dropped: :func:`server.server_app.run_simulation` asks it to hide them.

    Termination waits (up to ``TERMINATE_WAIT_S``) for the messages being processed and
    refuses new ones before Ray shuts down: after an interrupt the runtime's worker threads
    can still be waiting on an actor, and a thread that calls into Ray after
    ``ray.shutdown()`` makes Ray's core worker end the whole process (exit status 1, no
    resume hint).
    """

    def __init__(self, backend_config: Any) -> None:
        self.track_messages()
        super().__init__(backend_config)

    def track_messages(self) -> None:
        """Start counting the messages being processed (none yet, none refused)."""
        self._in_flight = 0
        self._closing = False
        self._quiet = threading.Condition()

    def process_message(self, message: Any, context: Any) -> Any:
        with self._quiet:
            if self._closing:
                raise RuntimeError("the simulation engine is shutting down")
            self._in_flight += 1
        try:
            return super().process_message(message, context)
        finally:
            with self._quiet:
                self._in_flight -= 1
                self._quiet.notify_all()

    def init_ray(self, backend_config: Any) -> None:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        with warnings.catch_warnings():  # Ray's tip to stop hiding GPUs: they are hidden on
            warnings.filterwarnings("ignore", _GPU_OVERRIDE_TIP, FutureWarning)  # purpose
            super().init_ray(backend_config)
        if callable(previous):  # reinstalled also when Python still names it: Ray's C++
            signal.signal(signal.SIGTERM, previous)  # handler took the signal underneath

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        super().build(app_fn)
        pool = self.pool
        if isinstance(getattr(pool, "pool", None), list):  # Flower 1.42's BasicActorPool
            pool.pool = [actor for _ in range(JOBS_PER_ACTOR) for actor in pool.pool]
            pool.num_actors = len(pool.pool)
            lock = threading.Lock()  # the idle slots change under both
            submit_to_least_loaded(pool, lock)
            replace_dead_actors(pool, lock)

    def terminate(self) -> None:
        with self._quiet:
            self._closing = True
            self._quiet.wait_for(lambda: self._in_flight == 0, timeout=TERMINATE_WAIT_S)
        if isinstance(getattr(self.pool, "pool", None), list):
            in_flight = getattr(self.pool, "_future_to_actor", {}).values()
            self.pool.pool = list(dict.fromkeys([*self.pool.pool, *in_flight]))
        super().terminate()


def submit_to_least_loaded(pool: Any, lock: threading.Lock | None = None) -> None:
    """Make ``pool.submit`` give each job a slot of the actor running the fewest jobs.

    Flower's pool pops its last idle slot and puts finished ones back at the end, so with two
    slots per actor two jobs could land on one actor (which runs them one after the other)
    while another actor sat idle: a stage of few messages took up to twice Flower's time. The
    choice and Flower's pop happen under one lock (several worker threads submit)."""
    submit, lock = pool.submit, lock or threading.Lock()

    def least_loaded_submit(actor_fn: Any, job: Any) -> Any:
        with lock:
            idle = pool.pool
            if idle:
                running = Counter(pool._future_to_actor.values())
                best = min(range(len(idle)), key=lambda i: running[idle[i]])
                idle.append(idle.pop(best))  # Flower's submit pops the last
            return submit(actor_fn, job)

    pool.submit = least_loaded_submit


def replace_dead_actors(pool: Any, lock: threading.Lock) -> None:
    """Make a job whose actor died (``ActorDiedError``: its process segfaulted, or the OOM
    killer ended it) replace that actor with a new one, in every idle slot and in the jobs
    it still held, before Flower puts the job's slot back.

    Flower's pool put the dead actor back: every job sent to it failed at once, so it was
    always the least loaded actor and took most jobs, and most clients failed in every
    later round. The job that found it dead still fails (an error reply, as before)."""
    fetch = pool.fetch_result_and_return_actor_to_pool
    replaced: dict[Any, Any] = {}  # dead actor -> its replacement

    def fetch_or_replace(future: Any) -> Any:
        try:
            return fetch(future)
        except ActorDiedError:
            with lock:
                dead = pool._future_to_actor.get(future)
                if dead is not None:
                    if dead not in replaced:
                        replaced[dead] = pool.create_actor_fn()
                        idle = pool.pool
                        for i, actor in enumerate(idle):  # by index: appends may go on
                            if actor is dead:
                                idle[i] = replaced[dead]
                    pool._future_to_actor[future] = replaced[dead]
            raise

    pool.fetch_result_and_return_actor_to_pool = fetch_or_replace


def tune_simulation_runtime() -> None:
    """Make Flower's simulation runtime use :func:`add_pending_messages_to_queue`,
    :func:`register_nodes_in_partition_order` and :class:`PipelinedRayBackend` (see the
    module docstring)."""
    replace_if_unchanged(
        _vce_api, "add_messages_to_queue", _flower_dispatch, add_pending_messages_to_queue
    )
    replace_if_unchanged(
        _vce_api, "_register_nodes", _flower_register, register_nodes_in_partition_order
    )
    replace_if_unchanged(_ray_backend, "RayBackend", _FlowerRayBackend, PipelinedRayBackend)
