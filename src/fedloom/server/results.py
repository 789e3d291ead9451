"""What a decoded result becomes before it reaches its round: an update, an evaluation, a protocol reply, a partial.

:func:`result_payload` checks a decoded wire message against the task it answers (its
kind, its round, the example counts the client registered, the model's layout) and turns
it into what the round loop takes; it runs on the server's thread pool, never on the event
loop (validating a dense update reads every value). A result that fails a check raises
:class:`Refused` or :class:`~fedloom.core.errors.InvalidUpdateError` with the reason the
client and the round are told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedloom.core.errors import InvalidUpdateError
from fedloom.transport import codec
from fedloom.transport.protocol import EVAL_RESULT, EVALUATE, FAILURE, PARTIAL, PROTOCOL, PROTOCOL_REPLY, TASK, UPDATE
from fedloom.transport.wire import Message

if TYPE_CHECKING:
    from fedloom.server.service import FleetService

__all__ = ["Refused", "result_payload"]


class Refused(Exception):
    """A result refused before it reached its round; ``reason`` is what the client is told."""

    def __init__(self, reason: str, client: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.client = client


def result_payload(service: FleetService, cid: str, task_id: str, msg: Message) -> Any:
    """The round's view of ``msg``, ``cid``'s answer to ``task_id``: a failure reason (str), an update, ...

    An update carrying an encoded payload has its header checked here; the round loop's
    pipeline (the stage that names the codec) checks every payload tensor and decodes it.
    """
    meta = msg.meta
    if msg.kind == FAILURE:
        return codec.decode_failure(meta)
    task = service.coordinator.task(task_id)
    if task is None:
        raise Refused("task closed")
    expected = {TASK: UPDATE, EVALUATE: EVAL_RESULT, PROTOCOL: PROTOCOL_REPLY}[task.kind]
    if msg.kind == PARTIAL and task.kind == TASK:  # an edge aggregator's answer (hierarchical FL)
        part = codec.decode_partial(meta, msg.tensors, client_id=cid, round=task.meta["round"])
        part.validate(numel=service.spec.numel)
        return part
    if msg.kind != expected:
        raise InvalidUpdateError(f"a {task.kind} task needs a {expected!r} message, got {msg.kind!r}", client_id=cid)
    registered = service.coordinator.info(cid)
    if msg.kind == PROTOCOL_REPLY:  # the sender is the session's client; the protocol's server checks the rest
        return codec.decode_protocol(meta, msg.tensors, client_id=cid)
    if msg.kind == EVAL_RESULT:
        n, metrics = codec.decode_eval_result(
            meta, client_id=cid, max_examples=registered.num_test_examples if registered is not None else None
        )
        return cid, n, metrics
    limit = registered.num_examples if registered else None
    update = codec.decode_update(meta, msg.tensors, client_id=cid, round=task.meta["round"])
    if update.payload is not None:
        update.validate_header(max_examples=limit)
    else:
        update.validate(numel=service.spec.numel, dtype=service.dtype, max_examples=limit)
    return update
