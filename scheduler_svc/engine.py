"""The engine loop: schedule a step, run it on the workers, stream what came back.

One asyncio task drives the loop. gRPC handlers only add and abort requests; everything that
touches the scheduler happens between two awaits of this loop, so the scheduler needs no locks.
A request added while a step runs joins the batch at the next step.

A worker's death ends no request: while no worker is registered every request is kept and new
ones queue; when workers register again, every request that had K/V resumes by recompute from its
prompt plus the tokens already streamed (the scheduler's preemption path), so clients see a pause.
Only if no worker is back within `worker_restart_timeout_s` of the loss do requests fail with
UNAVAILABLE. A failed step (the worker stays up) is recovered the same way for its batch.

Poison requests: the requests in the batch of a failed step (death or error) become suspects and
are held; they go back to the queue one at a time, each only once the previous one has sampled a
token, so a suspect is never in a batch with another. A suspect in the batch of the next failure
was in two consecutive failures: it alone fails, with INTERNAL; the rest resume.
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
from scheduler_svc.protocol import StepResult, TokenLogprobs
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import RequestUpdate, Scheduler
from scheduler_svc.structured_output import Constraint, Progress, StructuredOutputs
from scheduler_svc.tokenizer import ModelTokenizer
from scheduler_svc.worker_group import WorkerDiedError, WorkerGroup, WorkerStepError

logger = logging.getLogger(__name__)


class ErrorKind(Enum):
    UNAVAILABLE = "unavailable"  # the engine cannot serve (no worker came back, shutting down)
    INTERNAL = "internal"  # the request was in two consecutive failed steps (a poison request)


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
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per token, when requested


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
class Recovery:
    """One loss of the workers, from the engine's side (for logs, metrics and tests)."""

    reason: str
    lost_at: float  # monotonic: the death was declared
    num_resumed: int  # requests that had K/V and are recomputed
    registered_at: float | None = None  # the workers were back
    first_token_at: float | None = None  # the first token after they were back

    @property
    def pause_s(self) -> float | None:
        """From the workers' return to the first token: what a resume costs on top of the restart."""
        return _since(self.registered_at, self.first_token_at) if self.registered_at else None


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
        worker_restart_timeout_s: float = 120.0,
    ):
        self.scheduler = scheduler
        self.workers = workers
        self.tokenizer = tokenizer
        self.worker_restart_timeout_s = worker_restart_timeout_s
        self._seen_deaths = workers.num_deaths
        # Requests in the batch of a failed step that have sampled no token since (see the module
        # docstring), and the one of them released to the queue.
        self._suspects: set[str] = set()
        self._on_probation: str | None = None
        self.recoveries: deque[Recovery] = deque(maxlen=1000)
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
        self.structured = StructuredOutputs()  # matchers of the constrained requests

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    @property
    def num_suspects(self) -> int:
        """Requests of a failed step's batch that have not sampled since (see the module docstring)."""
        return len(self._suspects)

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

    def add_request(self, parsed: ParsedRequest, constraint: Constraint | None = None) -> RequestStream:
        """Queue a validated request (with its compiled structured-output constraint, if any).
        Raises EngineError (dead) or QueueFullError."""
        if self.dead_reason is not None:
            raise EngineError(ErrorKind.UNAVAILABLE, self.dead_reason)
        if self._worker_wait_expired():
            raise EngineError(ErrorKind.UNAVAILABLE, self._no_worker_message())
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
        if constraint is not None:
            self.structured.add(req_id, constraint)
        stream = RequestStream(
            req_id=req_id,
            client_request_id=parsed.client_request_id or req_id,
            num_prompt_tokens=len(parsed.prompt_token_ids),
            submitted_step_id=self.next_step_id,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer.tokenizer, parsed.prompt_token_ids, parsed.sampling_params.stop,
                parsed.sampling_params.min_tokens,
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
            self.die(f"internal error in the engine loop: {error!r}")

    async def _step_forever(self) -> None:
        while True:
            if not self.scheduler.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                self.last_progress_time = time.monotonic()  # idle time is not a stall
                continue
            if self.workers.num_deaths != self._seen_deaths:
                self._forget_worker_state()
            if not self.workers.is_registered:
                await self._wait_for_workers()
                continue
            self._release_next_suspect()
            plan = self.scheduler.schedule()
            if plan.num_scheduled_tokens == 0 and not plan.finished_req_ids:
                await asyncio.sleep(0.001)  # nothing runnable this step; let handlers run
                continue
            self.structured.attach_masks(plan, self.scheduler.requests)
            self.next_step_id = plan.step_id + 1  # a request arriving from now on joins that step
            self._observe_scheduled(plan.step_id)
            try:
                result = await self.workers.execute(plan)
            except WorkerDiedError as error:
                self._strike(plan, f"the worker died: {error}")  # the loop top then resets
                continue
            except WorkerStepError as error:
                self._recover_failed_step(plan, str(error))
                continue
            self.last_progress_time = time.monotonic()
            self.scheduler.observe_step_time(plan.num_scheduled_tokens, result.execute_time_s)
            self._deliver(self.scheduler.update_from_output(plan, result), _logprobs_by_request(result))
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
        num_waiting = scheduler.num_waiting + len(scheduler.held_req_ids)  # held suspects wait too
        self.metrics.observe_queues(scheduler.num_running, num_waiting, scheduler.block_manager.usage,
                                    scheduler.num_swapped)
        self.metrics.observe_prefix_cache(scheduler.block_manager.stats)

    def _deliver(self, updates: list[RequestUpdate], logprobs: dict[str, TokenLogprobs] | None = None) -> None:
        now = time.monotonic()
        for update in updates:
            stream = self._streams.get(update.req_id)
            if stream is None:
                continue  # aborted while the step ran
            status = update.status if update.status.is_finished else None
            progress = self.structured.advance(update.req_id, update.new_token_ids)
            if progress is Progress.FAILED:
                self._fail_request(stream, f"structured output failed: {self.structured.error(update.req_id)}")
                continue
            if progress is Progress.COMPLETE and status is None:  # the output is whole
                self.scheduler.finish_requests([update.req_id], RequestStatus.FINISHED_STOPPED)
                status = RequestStatus.FINISHED_STOPPED
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
            if logprobs and update.req_id in logprobs:
                event.logprobs = [logprobs[update.req_id]]
            if status is not None:
                event.usage = TokenUsage(stream.num_prompt_tokens, stream.num_output_tokens,
                                         stream.num_cached_tokens)
                self._finish(stream, status, now)
            stream.push(event)

    def _note_tokens(self, stream: RequestStream, num_tokens: int, now: float) -> None:
        if num_tokens == 0:
            return
        self._acquit(stream.req_id)
        recovery = self.recoveries[-1] if self.recoveries else None
        if recovery is not None and recovery.registered_at is not None and recovery.first_token_at is None:
            recovery.first_token_at = now
            logger.info("resumed after a worker loss: first token %.2f s after the workers were back, "
                        "%.2f s after the loss", recovery.pause_s, now - recovery.lost_at)
        stream.num_output_tokens += num_tokens
        ttft = now - stream.arrival_time if stream.first_token_time is None else None
        itl = None if stream.last_token_time is None else now - stream.last_token_time
        stream.first_token_time = stream.first_token_time or now
        stream.last_token_time = now
        self.metrics.observe_tokens(num_tokens, ttft, itl)

    def _finish(self, stream: RequestStream, status: RequestStatus, now: float, error: str | None = None) -> None:
        stream.finished = True
        del self._streams[stream.req_id]
        self._acquit(stream.req_id)
        self.structured.remove(stream.req_id)
        record = RequestRecord(
            stream.client_request_id, stream.req_id, stream.submitted_step_id, status,
            stream.num_prompt_tokens, stream.num_output_tokens, _since(stream.arrival_time, stream.first_token_time),
            now - stream.arrival_time, _since(stream.arrival_time, stream.first_scheduled_time),
        )
        self.request_records.append(record)
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.metrics.observe_finished(record.latency_s)
        _log_request(record, stream, error)

    def _fail_request(self, stream: RequestStream, message: str) -> None:
        self.scheduler.abort_requests([stream.req_id])
        self._finish(stream, RequestStatus.FINISHED_ABORTED, time.monotonic(), error=message)
        stream.push(EngineError(ErrorKind.INTERNAL, message))

    def _strike(self, plan, reason: str) -> None:
        """A step failed: its batch's suspects were in two consecutive failures and fail alone
        with INTERNAL; the rest of its batch become suspects (held when they are recomputed)."""
        batch = {r.req_id for r in plan.new_requests} | {r.req_id for r in plan.cached_requests}
        batch &= self.scheduler.requests.keys()
        poisoned = batch & self._suspects
        self._suspects |= batch - poisoned
        logger.error("step %d failed (%s): %d request(s) in its batch will resume%s", plan.step_id, reason,
                     len(batch - poisoned), f", {len(poisoned)} quarantined" if poisoned else "")
        now = time.monotonic()
        for req_id in sorted(poisoned):
            self._quarantine(req_id, reason, now)

    def _quarantine(self, req_id: str, reason: str, now: float) -> None:
        message = (f"this request was in the batch of two consecutive failed steps and is failed alone, "
                   f"so that it cannot fail the others again; the last failure: {reason}")
        self.scheduler.abort_requests([req_id])
        self.metrics.count_quarantined()
        logger.warning("quarantined req_id=%s: %s", req_id, message)
        stream = self._streams.get(req_id)
        if stream is not None:
            self._finish(stream, RequestStatus.FINISHED_ABORTED, now, error=message)
            stream.push(EngineError(ErrorKind.INTERNAL, message))

    def _recover_failed_step(self, plan, message: str) -> None:
        """The worker is up but failed the step: its batch is recomputed (suspects held), and so are
        the requests it swapped out, whose copy in swap space may never have been made."""
        self._strike(plan, message)
        batch = [r.req_id for r in plan.new_requests] + [r.req_id for r in plan.cached_requests]
        resumed = self.scheduler.recompute_requests([i for i in batch if i in self._suspects], hold=True)
        resumed += self.scheduler.recompute_requests(self._swapped_out_by(plan))
        # Blocks this step was to fill were cached when it was scheduled; their K/V is not there.
        self.scheduler.block_manager.reset_prefix_cache()
        self.metrics.count_resumed(len(resumed))
        self._observe_queues()

    def _forget_worker_state(self) -> None:
        """The workers died: every request that had K/V goes back to be recomputed (suspects held)."""
        self._seen_deaths = self.workers.num_deaths
        resumed = self.scheduler.reset_after_worker_loss(hold=self._suspects)
        reason = self.workers.dead_reason or "the workers were replaced"
        pending = self.recoveries[-1] if self.recoveries else None
        if pending is not None and pending.registered_at is None:
            pending.num_resumed += len(resumed)  # another death before the workers were back
        else:
            self.recoveries.append(Recovery(reason, self.workers.lost_since or time.monotonic(), len(resumed)))
        if self.workers.is_registered:  # replaced at once (a worker registered again unannounced)
            self.recoveries[-1].registered_at = time.monotonic()
        self.metrics.count_resumed(len(resumed))
        logger.warning("workers lost (%s): %d request(s) kept to resume by recompute, %d waiting",
                       reason, len(resumed), len(self._streams) - len(resumed))
        self._observe_queues()

    async def _wait_for_workers(self) -> None:
        """Keep every request while no worker is registered; fail them with UNAVAILABLE once
        `worker_restart_timeout_s` has passed since the loss."""
        lost_since = self.workers.lost_since or time.monotonic()
        remaining = lost_since + self.worker_restart_timeout_s - time.monotonic()
        if remaining > 0:
            await self.workers.wait_change(remaining)
            if self.workers.is_registered:
                now = self.last_progress_time = time.monotonic()
                if self.recoveries and self.recoveries[-1].registered_at is None:
                    self.recoveries[-1].registered_at = now
            return
        logger.error("no worker is back %.0f s after the loss; failing %d request(s)",
                     self.worker_restart_timeout_s, len(self._streams))
        self._fail_all(EngineError(ErrorKind.UNAVAILABLE, self._no_worker_message()))

    def _worker_wait_expired(self) -> bool:
        lost_since = self.workers.lost_since
        return (not self.workers.is_registered and lost_since is not None
                and time.monotonic() - lost_since >= self.worker_restart_timeout_s)

    def _no_worker_message(self) -> str:
        return (f"no worker has registered within {self.worker_restart_timeout_s:.0f} s of losing the last "
                f"one ({self.workers.dead_reason}); retry later")

    def _release_next_suspect(self) -> None:
        """Queue the next held suspect once the previous one has sampled (or finished)."""
        if self._on_probation is None:
            self._on_probation = self.scheduler.release_held()

    def _acquit(self, req_id: str) -> None:
        """The request sampled a token (or finished): it is no longer a suspect."""
        self._suspects.discard(req_id)
        if self._on_probation == req_id:
            self._on_probation = None

    def _swapped_out_by(self, plan) -> list[str]:
        """The requests `plan` swapped out, from the scheduler's record of its step."""
        if not plan.swap_out:
            return []
        record = next((r for r in reversed(self.scheduler.records) if r.step_id == plan.step_id), None)
        if record is None:  # never expected: the plan was built just now, with its record
            logger.error("no record of step %d; its swapped-out requests cannot be failed", plan.step_id)
            return []
        return list(record.swapped_out_req_ids)

    def die(self, reason: str) -> None:
        """Stop serving for good: every request fails with UNAVAILABLE, and so will new ones."""
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


def _logprobs_by_request(result: StepResult) -> dict[str, TokenLogprobs]:
    if result.logprobs and len(result.logprobs) != len(result.req_ids):
        raise ValueError(f"result of step {result.step_id}: {len(result.logprobs)} logprobs "
                         f"for {len(result.req_ids)} tokens")
    return {req_id: lp for req_id, lp in zip(result.req_ids, result.logprobs) if lp is not None}


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
