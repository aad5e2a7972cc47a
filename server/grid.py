"""A ``Grid`` that forwards every call to another one: the base of the grids that change
one behaviour of Flower's (a default timeout, faster reply polling, timing in benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["DelegatingGrid", "ResponsiveGrid"]


class DelegatingGrid(Grid):
    """Forwards everything to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)


class ResponsiveGrid(DelegatingGrid):
    """Delegating ``Grid`` whose ``send_and_receive`` notices replies soon after they land.

    Flower 1.42's grids sleep a fixed interval between pulls: 3 s on a deployment, 0.1 s
    in the simulation engine. Every stage of a round pays up to one interval after its
    last reply, and a SecAgg+ round has four stages. This grid pulls after
    ``min_poll_s``, doubles the wait while nothing arrives (up to ``max_poll_s``, so a
    long training stage costs few pulls) and drops back to ``min_poll_s`` on each
    reply. Same push, same pulls, same timeout semantics: only the waits differ.
    """

    def __init__(self, inner: Grid, min_poll_s: float = 0.01, max_poll_s: float = 0.25) -> None:
        if not 0 < min_poll_s <= max_poll_s:
            raise ValueError(
                f"need 0 < min_poll_s <= max_poll_s, got {min_poll_s} and {max_poll_s}"
            )
        super().__init__(inner)
        self._min_poll_s = min_poll_s
        self._max_poll_s = max_poll_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self._min_poll_s
        while pending:
            arrived = list(self.pull_messages(pending))
            for reply in arrived:
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending:
                break
            wait = self._min_poll_s if arrived else min(2 * wait, self._max_poll_s)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            time.sleep(wait)
        return replies
