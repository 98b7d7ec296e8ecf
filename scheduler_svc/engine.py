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
from scheduler_svc.metrics import ServingMetrics
from scheduler_svc.proto_convert import ParsedRequest, TokenUsage
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
    usage: TokenUsage | None = None


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
    queue_time_s: float | None = None  # None: never scheduled


@dataclass(slots=True)
class RequestStream:
    """What the gRPC handler iterates over for one request."""

    req_id: str
    client_request_id: str
    num_prompt_tokens: int
    submitted_step_id: int  # the engine's next step when the request arrived (for tests/metrics)
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
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
        metrics: ServingMetrics | None = None,
    ):
        self.scheduler = scheduler
        self.workers = workers
        self.tokenizer = tokenizer
        self._on_dead = on_dead
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self._streams: dict[str, RequestStream] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.next_step_id = 0
        self.dead_reason: str | None = None
        # Last time a step completed or work arrived at an idle engine (for the stall check).
        self.last_progress_time = time.monotonic()
        self.request_records: deque[RequestRecord] = deque(maxlen=10_000)

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    def is_stalled(self, timeout_s: float) -> bool:
        """True when requests are unfinished yet no step has completed for `timeout_s` seconds."""
        return bool(self._streams) and time.monotonic() - self.last_progress_time > timeout_s

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is active; False if some still are after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._streams:
            if time.monotonic() >= deadline or self.dead_reason is not None:
                return not self._streams
            await asyncio.sleep(0.05)
        return True

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
            priority=parsed.priority,
            cache_salt=parsed.cache_salt,
            tenant=parsed.tenant,
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
        self._observe_queues()
        return stream

    def abort(self, req_id: str) -> None:
        """Client went away: free the request's blocks now; the worker hears of it next step."""
        stream = self._streams.get(req_id)
        if stream is not None:
            self.scheduler.abort_requests([req_id])
            self._finish(stream, RequestStatus.FINISHED_ABORTED, time.monotonic())
            self._observe_queues()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_all(EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down"))

    async def _run(self) -> None:
        try:
            await self._step_forever()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug here would otherwise leave every stream hanging
            logger.exception("the engine loop failed")
            self._die(f"internal error in the engine loop: {error!r}")

    async def _step_forever(self) -> None:
        while True:
            if not self.scheduler.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                self.last_progress_time = time.monotonic()  # idle time is not a stall
                continue
            plan = self.scheduler.schedule()
            if plan.num_scheduled_tokens == 0 and not plan.finished_req_ids:
                await asyncio.sleep(0.001)  # nothing runnable this step; let handlers run
                continue
            self.next_step_id = plan.step_id + 1  # a request arriving from now on joins that step
            self._observe_scheduled(plan.step_id)
            try:
                result = await self.workers.execute(plan)
            except WorkerDiedError as error:
                self._die(str(error))
                return
            except WorkerStepError as error:
                self._fail_step(plan, str(error))
                continue
            self.last_progress_time = time.monotonic()
            self.scheduler.observe_step_time(plan.num_scheduled_tokens, result.execute_time_s)
            self._deliver(self.scheduler.update_from_output(plan, result))
            self._observe_queues()

    def _observe_scheduled(self, step_id: int) -> None:
        """Queue time and prompt tokens of requests computed for the first time in this step."""
        records = self.scheduler.records
        if not records or records[-1].step_id != step_id:
            return
        record, now = records[-1], time.monotonic()
        self.metrics.observe_step(record)
        self.metrics.observe_preemption_causes(self.scheduler.num_preemptions_by_cause)
        for req_id in record.new_req_ids:
            stream = self._streams.get(req_id)
            if stream is not None and stream.first_scheduled_time is None:
                stream.first_scheduled_time = now
                request = self.scheduler.requests[req_id]
                stream.num_cached_tokens = request.num_cached_tokens
                self.metrics.observe_first_scheduled(now - stream.arrival_time, stream.num_prompt_tokens,
                                                     request.priority, request.tenant)

    def _observe_queues(self) -> None:
        scheduler = self.scheduler
        self.metrics.observe_queues(scheduler.num_running, scheduler.num_waiting, scheduler.block_manager.usage,
                                    scheduler.num_swapped)
        self.metrics.observe_prefix_cache(scheduler.block_manager.stats)

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
            self._note_tokens(stream, len(update.new_token_ids), now)
            event = StreamEvent(update.new_token_ids, text, status)
            if status is not None:
                event.usage = TokenUsage(stream.num_prompt_tokens, stream.num_output_tokens,
                                         stream.num_cached_tokens)
                self._finish(stream, status, now)
            stream.push(event)

    def _note_tokens(self, stream: RequestStream, num_tokens: int, now: float) -> None:
        if num_tokens == 0:
            return
        stream.num_output_tokens += num_tokens
        ttft = now - stream.arrival_time if stream.first_token_time is None else None
        itl = None if stream.last_token_time is None else now - stream.last_token_time
        stream.first_token_time = stream.first_token_time or now
        stream.last_token_time = now
        self.metrics.observe_tokens(num_tokens, ttft, itl)

    def _finish(self, stream: RequestStream, status: RequestStatus, now: float, error: str | None = None) -> None:
        stream.finished = True
        del self._streams[stream.req_id]
        record = RequestRecord(
            stream.client_request_id, stream.req_id, stream.submitted_step_id, status,
            stream.num_prompt_tokens, stream.num_output_tokens, _since(stream.arrival_time, stream.first_token_time),
            now - stream.arrival_time, _since(stream.arrival_time, stream.first_scheduled_time),
        )
        self.request_records.append(record)
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.metrics.observe_finished(record.latency_s)
        _log_request(record, stream, error)

    def _fail_step(self, plan, message: str) -> None:
        # The requests this plan swapped out fail with it: their device blocks are already free,
        # and the copy to swap space may never have been made, so resuming would read garbage.
        req_ids = [r.req_id for r in plan.new_requests] + [r.req_id for r in plan.cached_requests]
        req_ids += self._swapped_out_by(plan)
        logger.error("step %d failed on a worker; failing its %d requests: %s", plan.step_id, len(req_ids), message)
        self.scheduler.abort_requests(req_ids)
        # Blocks this step was to fill were cached when it was scheduled; their K/V is not there.
        self.scheduler.block_manager.reset_prefix_cache()
        now = time.monotonic()
        for req_id in req_ids:
            stream = self._streams.get(req_id)
            if stream is not None:
                self._finish(stream, RequestStatus.FINISHED_ABORTED, now, error=message)
                stream.push(EngineError(ErrorKind.INTERNAL, f"the worker failed on this request: {message}"))

    def _swapped_out_by(self, plan) -> list[str]:
        """The requests `plan` swapped out, from the scheduler's record of its step."""
        if not plan.swap_out:
            return []
        record = next((r for r in reversed(self.scheduler.records) if r.step_id == plan.step_id), None)
        if record is None:  # never expected: the plan was built just now, with its record
            logger.error("no record of step %d; its swapped-out requests cannot be failed", plan.step_id)
            return []
        return list(record.swapped_out_req_ids)

    def _die(self, reason: str) -> None:
        self.dead_reason = f"worker failure: {reason}"
        self._fail_all(EngineError(ErrorKind.UNAVAILABLE, self.dead_reason))
        if self._on_dead is not None:
            self._on_dead(self.dead_reason)

    def _fail_all(self, error: EngineError) -> None:
        streams = list(self._streams.values())
        if streams:
            self.scheduler.abort_requests([stream.req_id for stream in streams])
        now = time.monotonic()
        for stream in streams:
            self._finish(stream, RequestStatus.FINISHED_ABORTED, now, error=str(error))
            stream.push(error)
        self._observe_queues()


def _since(start: float, end: float | None) -> float | None:
    return None if end is None else end - start


def _log_request(record: RequestRecord, stream: RequestStream, error: str | None) -> None:
    """One key=value line per finished request, for log pipelines to parse."""
    decode_s = _since(stream.first_token_time, stream.last_token_time)
    itl = decode_s / (record.num_output_tokens - 1) if decode_s and record.num_output_tokens > 1 else None
    fields = {
        "request_id": record.client_request_id, "req_id": record.req_id, "status": record.status.name,
        "prompt_tokens": record.num_prompt_tokens, "output_tokens": record.num_output_tokens,
        "queue_s": record.queue_time_s, "ttft_s": record.ttft_s, "mean_itl_s": itl, "e2e_s": record.latency_s,
    }
    line = " ".join(f"{key}={_format(value)}" for key, value in fields.items())
    if error is not None:
        line += f" error={error!r}"
    logger.info("request done %s", line)


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    # A client-chosen request id must not break the line into fake fields.
    return repr(text) if not text or any(c.isspace() or c in "=\"'" for c in text) else text
