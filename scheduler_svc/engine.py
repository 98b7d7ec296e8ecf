"""The engine loop: schedule a step, run it on the workers, stream what came back.

One asyncio task drives the loop. gRPC handlers only add and abort requests; everything that
touches the scheduler happens between two awaits of this loop, so the scheduler needs no locks.
A request added while a step runs joins the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Callable

from scheduler_svc.detokenizer import IncrementalDetokenizer
from scheduler_svc.proto_convert import ParsedRequest
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import RequestUpdate, Scheduler
from scheduler_svc.tokenizer import ModelTokenizer
from scheduler_svc.worker_group import WorkerDiedError, WorkerGroup, WorkerStepError

logger = logging.getLogger(__name__)


class ErrorKind(Enum):
    UNAVAILABLE = "unavailable"  # the engine cannot serve (worker died, shutting down)
    INTERNAL = "internal"  # a step failed on the worker


class EngineError(RuntimeError):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class StreamEvent:
    """New output of one request; `status` is set (and `usage` too) on the last event."""

    token_ids: list[int]
    text: str
    status: RequestStatus | None = None
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens)


@dataclass(slots=True, frozen=True)
class RequestRecord:
    """How one request went; the engine keeps the most recent ones for tests and logs."""

    client_request_id: str
    req_id: str
    submitted_step_id: int
    status: RequestStatus
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float | None
    latency_s: float


@dataclass(slots=True)
class RequestStream:
    """What the gRPC handler iterates over for one request."""

    req_id: str
    client_request_id: str
    num_prompt_tokens: int
    submitted_step_id: int  # the engine's next step when the request arrived (for tests/metrics)
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_output_tokens: int = 0
    finished: bool = False
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, item: StreamEvent | EngineError) -> None:
        self._queue.put_nowait(item)

    async def events(self) -> AsyncIterator[StreamEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, EngineError):
                raise item
            yield item
            if item.status is not None:
                return


class Engine:
    """Owns the scheduler and drives the workers, one step at a time."""

    def __init__(
        self,
        scheduler: Scheduler,
        workers: WorkerGroup,
        tokenizer: ModelTokenizer,
        on_dead: Callable[[str], None] | None = None,
    ):
        self.scheduler = scheduler
        self.workers = workers
        self.tokenizer = tokenizer
        self._on_dead = on_dead
        self._streams: dict[str, RequestStream] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.next_step_id = 0
        self.dead_reason: str | None = None
        self.request_records: deque[RequestRecord] = deque(maxlen=10_000)

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    def add_request(self, parsed: ParsedRequest) -> RequestStream:
        """Queue a validated request. Raises EngineError (dead) or QueueFullError."""
        if self.dead_reason is not None:
            raise EngineError(ErrorKind.UNAVAILABLE, self.dead_reason)
        req_id = uuid.uuid4().hex
        request = Request(
            req_id=req_id,
            prompt_token_ids=parsed.prompt_token_ids,
            sampling_params=parsed.sampling_params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            arrival_time=time.monotonic(),
        )
        self.scheduler.add_request(request)
        stream = RequestStream(
            req_id=req_id,
            client_request_id=parsed.client_request_id or req_id,
            num_prompt_tokens=len(parsed.prompt_token_ids),
            submitted_step_id=self.next_step_id,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer.tokenizer, parsed.prompt_token_ids, parsed.sampling_params.stop
            ),
        )
        self._streams[req_id] = stream
        self._wakeup.set()
        return stream

    def abort(self, req_id: str) -> None:
        """Client went away: free the request's blocks now; the worker hears of it next step."""
        stream = self._streams.get(req_id)
        if stream is not None:
            self.scheduler.abort_requests([req_id])
            self._finish(stream, RequestStatus.FINISHED_ABORTED, time.monotonic())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_all(EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down"))

    async def _run(self) -> None:
        while True:
            if not self.scheduler.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            plan = self.scheduler.schedule()
            if plan.num_scheduled_tokens == 0 and not plan.finished_req_ids:
                await asyncio.sleep(0.001)  # nothing runnable this step; let handlers run
                continue
            self.next_step_id = plan.step_id + 1  # a request arriving from now on joins that step
            try:
                result = await self.workers.execute(plan)
            except WorkerDiedError as error:
                self._die(str(error))
                return
            except WorkerStepError as error:
                self._fail_step(plan, str(error))
                continue
            self._deliver(self.scheduler.update_from_output(plan, result))

    def _deliver(self, updates: list[RequestUpdate]) -> None:
        now = time.monotonic()
        for update in updates:
            stream = self._streams.get(update.req_id)
            if stream is None:
                continue  # aborted while the step ran
            status = update.status if update.status.is_finished else None
            chunk = stream.detokenizer.add_tokens(update.new_token_ids)
            text = chunk.text
            if chunk.stopped:
                if status is None:
                    self.scheduler.finish_requests([update.req_id], RequestStatus.FINISHED_STOPPED)
                status = RequestStatus.FINISHED_STOPPED
            elif status is not None:
                text += stream.detokenizer.flush()
            stream.num_output_tokens += len(update.new_token_ids)
            if stream.first_token_time is None and update.new_token_ids:
                stream.first_token_time = now
            event = StreamEvent(update.new_token_ids, text, status)
            if status is not None:
                event.usage = (stream.num_prompt_tokens, stream.num_output_tokens)
                self._finish(stream, status, now)
            stream.push(event)

    def _finish(self, stream: RequestStream, status: RequestStatus, now: float) -> None:
        stream.finished = True
        del self._streams[stream.req_id]
        ttft = None if stream.first_token_time is None else stream.first_token_time - stream.arrival_time
        record = RequestRecord(
            stream.client_request_id, stream.req_id, stream.submitted_step_id, status,
            stream.num_prompt_tokens, stream.num_output_tokens, ttft, now - stream.arrival_time,
        )
        self.request_records.append(record)
        logger.info(
            "request %s %s: %d prompt + %d output tokens, ttft %s, total %.3f s",
            record.client_request_id, status.name, record.num_prompt_tokens, record.num_output_tokens,
            "-" if ttft is None else f"{ttft:.3f} s", record.latency_s,
        )

    def _fail_step(self, plan, message: str) -> None:
        req_ids = [r.req_id for r in plan.new_requests] + [r.req_id for r in plan.cached_requests]
        logger.error("step %d failed on a worker; failing its %d requests: %s", plan.step_id, len(req_ids), message)
        self.scheduler.abort_requests(req_ids)
        for req_id in req_ids:
            stream = self._streams.pop(req_id, None)
            if stream is not None:
                stream.push(EngineError(ErrorKind.INTERNAL, f"the worker failed on this request: {message}"))

    def _die(self, reason: str) -> None:
        self.dead_reason = f"worker failure: {reason}"
        self._fail_all(EngineError(ErrorKind.UNAVAILABLE, self.dead_reason))
        if self._on_dead is not None:
            self._on_dead(self.dead_reason)

    def _fail_all(self, error: EngineError) -> None:
        streams, self._streams = self._streams, {}
        if streams:
            self.scheduler.abort_requests(list(streams))
        for stream in streams.values():
            stream.push(error)
