"""The simulation-runtime fixes of ``server.vce_runtime``: dispatch that asks only the
nodes with pending instructions, two jobs in flight per Ray actor, and node ids that follow
the partitions."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from server import vce_runtime


@dataclass
class _Metadata:
    dst_node_id: int
    delivered_at: str = ""


@dataclass
class _Message:
    name: str
    metadata: _Metadata


@dataclass
class _InMemoryState:
    """The parts of Flower's ``InMemoryLinkState`` the dispatcher touches."""

    message_ins_store: dict[str, _Message] = field(default_factory=dict)
    lock: Any = field(default_factory=threading.RLock)
    asked: list[int] = field(default_factory=list)

    def add(self, name: str, node: int) -> None:
        with self.lock:
            self.message_ins_store[name] = _Message(name, _Metadata(node))

    def get_message_ins(self, node_id: int, limit: int | None) -> list[_Message]:
        with self.lock:
            self.asked.append(node_id)
            found = [
                m
                for m in self.message_ins_store.values()
                if m.metadata.dst_node_id == node_id and not m.metadata.delivered_at
            ][:limit]
            for message in found:
                message.metadata.delivered_at = "now"
            return found


def _drain(queue: Queue[Any], count: int, timeout: float = 5.0) -> list[str]:
    return [queue.get(timeout=timeout).name for _ in range(count)]


def test_pending_node_ids_lists_each_node_with_an_undelivered_instruction_once() -> None:
    state = _InMemoryState()
    state.add("a", 7)
    state.add("b", 3)
    state.add("c", 7)
    state.message_ins_store["b"].metadata.delivered_at = "earlier"
    state.add("d", 5)
    assert vce_runtime.pending_node_ids(state) == [7, 5]
    assert vce_runtime.pending_node_ids(object()) is None


def test_dispatch_asks_only_pending_nodes_and_delivers_every_instruction_in_order() -> None:
    state = _InMemoryState()
    nodes = {node: i for i, node in enumerate(range(100, 1100))}  # 1000 registered nodes
    queue: Queue[Any] = Queue()
    stop = threading.Event()
    for i, node in enumerate((105, 300, 105)):
        state.add(f"m{i}", node)
    state.add("stranger", 5)  # not a node of this simulation: never dispatched
    thread = threading.Thread(
        target=vce_runtime.add_pending_messages_to_queue, args=(state, queue, nodes, stop)
    )
    thread.start()
    try:
        first = _drain(queue, 3)
        started = time.monotonic()
        state.add("late", 999)  # a message stored while the loop runs is picked up soon
        assert _drain(queue, 1) == ["late"]
        picked_up_after = time.monotonic() - started
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert sorted(first) == ["m0", "m1", "m2"]
    assert first.index("m0") < first.index("m2")  # one node's instructions keep their order
    assert queue.empty()
    assert set(state.asked) <= {105, 300, 999}  # never a sweep over all 1000 nodes
    assert picked_up_after < 1.0


def test_dispatch_leaves_a_state_without_an_in_memory_store_to_flowers_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(vce_runtime, "_flower_dispatch", lambda *args: calls.append(args))
    other = object()
    queue: Queue[Any] = Queue()
    stop = threading.Event()
    vce_runtime.add_pending_messages_to_queue(other, queue, {1: 0}, stop)
    assert calls == [(other, queue, {1: 0}, stop)]


_STOPPED: list[str] = []
_DEAD: set[str] = set()  # the actors whose process died


@dataclass(frozen=True)
class _FakeActor:
    name: str

    @property
    def terminate(self) -> Any:
        return type("Remote", (), {"remote": staticmethod(lambda: _STOPPED.append(self.name))})


class _FakePool:
    """Flower 1.42's ``BasicActorPool`` without Ray: its idle actors in a list, ``pool``."""

    idle_attribute = "pool"

    def __init__(self, actor_type: Any, client_resources: Any, actor_kwargs: Any) -> None:
        setattr(self, self.idle_attribute, [])
        self.num_actors = 0
        self.actors_capacity = 2
        self._future_to_actor: dict[str, _FakeActor] = {}

    def add_actors_to_pool(self, num_actors: int) -> None:
        getattr(self, self.idle_attribute).extend(
            _FakeActor(f"actor{i}") for i in range(num_actors)
        )
        self.num_actors += num_actors

    def create_actor_fn(self) -> _FakeActor:
        self.created = getattr(self, "created", 0) + 1
        return _FakeActor(f"new{self.created}")

    def fetch_result_and_return_actor_to_pool(self, future: str) -> tuple[str, str]:
        if self._future_to_actor[future].name in _DEAD:  # as ray.get on a dead actor
            raise ActorDiedError()
        self.add_actor_back_to_pool(future)
        return future, "context"

    def terminate_all_actors(self) -> None:
        for actor in getattr(self, self.idle_attribute):
            actor.terminate.remote()

    def submit(self, actor_fn: Any, job: Any) -> str:  # as Flower's: the last idle slot
        actor = getattr(self, self.idle_attribute).pop()
        future = f"job{len(self._future_to_actor)}-{actor.name}"
        self._future_to_actor[future] = actor
        return future

    def add_actor_back_to_pool(self, future: str) -> None:
        getattr(self, self.idle_attribute).append(self._future_to_actor.pop(future))


class _OtherPool(_FakePool):
    """A pool of another shape (a later Flower): its idle actors under another name."""

    idle_attribute = "idle"


def _built_backend(
    monkeypatch: pytest.MonkeyPatch, pool_type: type[_FakePool]
) -> vce_runtime.PipelinedRayBackend:
    monkeypatch.setattr(vce_runtime._ray_backend, "BasicActorPool", pool_type)
    backend = object.__new__(vce_runtime.PipelinedRayBackend)
    backend.track_messages()
    backend.client_resources = {"num_cpus": 1}
    backend.actor_kwargs = {}
    backend.build(lambda: None)  # type: ignore[arg-type, return-value]
    return backend


def _stopped_by_terminate(backend: vce_runtime.PipelinedRayBackend) -> list[str]:
    _STOPPED.clear()
    backend.terminate()
    return sorted(_STOPPED)


def test_pipelined_backend_feeds_each_actor_two_jobs_and_stops_each_actor_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = _built_backend(monkeypatch, _FakePool)
    assert backend.num_workers == 2 * vce_runtime.JOBS_PER_ACTOR  # a worker thread a slot
    pool = backend.pool
    assert sorted(a.name for a in pool.pool) == ["actor0", "actor0", "actor1", "actor1"]
    pool._future_to_actor["job"] = pool.pool.pop()  # a job still holds a slot of an actor
    assert _stopped_by_terminate(backend) == ["actor0", "actor1"]


def test_each_job_goes_to_the_actor_running_the_fewest(monkeypatch: pytest.MonkeyPatch) -> None:
    """With two slots per actor side by side, Flower's last-slot pop put two jobs on one
    actor (run one after the other) while the other actor sat idle."""
    monkeypatch.setattr(_FakePool, "add_actors_to_pool", _four_actors)
    pool = _built_backend(monkeypatch, _FakePool).pool
    first = [pool.submit(None, None) for _ in range(4)]
    assert sorted(f.rsplit("-", 1)[1] for f in first) == ["actor0", "actor1", "actor2", "actor3"]
    pool.add_actor_back_to_pool(first[2])  # one actor finishes: the next job goes there
    assert pool.submit(None, None).endswith(first[2].rsplit("-", 1)[1])
    second = [pool.submit(None, None) for _ in range(3)]  # then the others' second slots
    assert sorted(f.rsplit("-", 1)[1] for f in second) == sorted(
        f.rsplit("-", 1)[1] for f in first if f != first[2]
    )


def test_an_actor_that_died_is_replaced_not_fed_every_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An actor whose process died (a segfault, the OOM killer) went back to the pool: each
    job sent to it failed at once, so it was always the least loaded, and it took most of
    the jobs; every later round most clients failed (4 of 6 with 2 actors). A dead actor is
    now replaced by a new one, in its idle slots and in the jobs it still held."""
    backend = _built_backend(monkeypatch, _FakePool)
    pool = backend.pool
    jobs = {"job0": "actor0", "job1": "actor0", "job2": "actor1"}  # actor1's other slot idle
    for future, name in jobs.items():
        slot = next(a for a in pool.pool if a.name == name)
        pool.pool.remove(slot)
        pool._future_to_actor[future] = slot
    _DEAD.update(jobs.values())
    try:
        for future in jobs:  # each fails; Flower's process_message puts its slot back
            with pytest.raises(ActorDiedError):
                pool.fetch_result_and_return_actor_to_pool(future)
            pool.add_actor_back_to_pool(future)
    finally:
        _DEAD.clear()
    assert sorted(a.name for a in pool.pool) == ["new1", "new1", "new2", "new2"]
    assert not pool._future_to_actor
    backend.app_fn = lambda: None
    context = type("Context", (), {"node_config": {"partition-id": 0}})()
    replies = [backend.process_message(str(i), context) for i in range(4)]
    assert [r[1] for r in replies] == ["context"] * 4


def _four_actors(self: _FakePool, num_actors: int) -> None:
    self.pool.extend(_FakeActor(f"actor{i}") for i in range(4))
    self.num_actors += 4


def test_pipelined_backend_leaves_a_pool_of_another_shape_as_flower_built_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = _built_backend(monkeypatch, _OtherPool)
    assert backend.num_workers == 2  # one job per actor, as in Flower
    assert not hasattr(backend.pool, "pool")
    assert _stopped_by_terminate(backend) == ["actor0", "actor1"]


def test_termination_waits_for_messages_in_flight_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an interrupt a worker thread may still wait on an actor: Ray must not shut down
    under it (a call into Ray after shutdown ends the process with status 1)."""
    import threading
    import time

    backend = _built_backend(monkeypatch, _FakePool)
    release = threading.Event()
    seen_at_shutdown: list[int] = []

    def slow_message(self: Any, message: Any, context: Any) -> Any:
        release.wait(10)
        return message, context

    def record_shutdown(self: Any) -> None:
        seen_at_shutdown.append(backend._in_flight)

    monkeypatch.setattr(vce_runtime._FlowerRayBackend, "process_message", slow_message)
    monkeypatch.setattr(vce_runtime._FlowerRayBackend, "terminate", record_shutdown)
    worker = threading.Thread(target=backend.process_message, args=("m", "c"))
    worker.start()
    while backend._in_flight == 0:
        time.sleep(0.01)
    stopper = threading.Thread(target=backend.terminate)
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive() and not seen_at_shutdown  # waiting for the message
    with pytest.raises(RuntimeError, match="shutting down"):
        backend.process_message("late", "c")  # nothing new reaches Ray meanwhile
    release.set()
    stopper.join(10)
    worker.join(10)
    assert seen_at_shutdown == [0]


def _linkstate_factory() -> Any:
    """An empty in-memory LinkState factory, built as Flower's simulation engine builds it."""
    api = vce_runtime._vce_api
    return api.LinkStateFactory(
        api.FLWR_IN_MEMORY_DB_NAME, api.NoOpFederationManager(), api.ObjectStoreFactory()
    )


def test_simulated_nodes_are_registered_under_their_partitions_ids() -> None:
    """Flower drew random node ids in every process, so the seeded cohort sampler (which
    samples sorted node ids) picked other clients in every run and after every resume."""
    from server.server_app import SIMULATED_NODE_ID_BASE

    draw = vce_runtime._linkstate.generate_rand_int_from_bytes
    runs = []
    for _ in range(2):
        factory = _linkstate_factory()
        mapping = vce_runtime.register_nodes_in_partition_order(5, factory)
        runs.append(mapping)
        assert factory.state().get_node_info(node_ids=list(mapping))  # really registered
    assert runs[0] == runs[1] == {SIMULATED_NODE_ID_BASE + i: i for i in range(5)}
    assert vce_runtime._linkstate.generate_rand_int_from_bytes is draw  # put back
    flowers = vce_runtime._flower_register(3, _linkstate_factory())  # the random ids it fixes
    assert sorted(flowers) != [SIMULATED_NODE_ID_BASE + i for i in range(3)]


def test_tuning_swaps_flowers_runtime_objects_once() -> None:
    vce_runtime.tune_simulation_runtime()
    vce_runtime.tune_simulation_runtime()  # idempotent
    assert vce_runtime._vce_api._register_nodes is vce_runtime.register_nodes_in_partition_order
    assert vce_runtime._vce_api.add_messages_to_queue is vce_runtime.add_pending_messages_to_queue
    assert vce_runtime._ray_backend.RayBackend is vce_runtime.PipelinedRayBackend
    assert vce_runtime.PipelinedRayBackend.__mro__[1] is vce_runtime._FlowerRayBackend
