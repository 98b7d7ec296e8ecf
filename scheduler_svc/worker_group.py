"""The scheduler's side of the ZeroMQ link to its workers.

One ROUTER socket: workers connect DEALERs, register with a `WorkerHello`, answer each `StepPlan`
with a `StepResult`, and send heartbeats from a second DEALER. A monitor task declares the group
dead when a worker process we spawned exits or a worker's heartbeats stop; a pending step then
fails at once with `WorkerDiedError` instead of hanging.

A death is not the end of the group: it forgets every worker (a surviving rank is asked to
register again when it next heartbeats, dropping its requests) and waits for the ranks to register
anew, spawned again by the app (`omnibus serve`) or by their own supervisor. `num_deaths` and
`generation` (full registrations) tell the engine that the workers' state is gone; a returning
worker must match the first ones (model, block size, at least their KV pool and swap space).

A tensor-parallel group (`world_size` > 1, worker_svc/tensor_parallel.py) is one worker to the
engine: it serves once every rank registered with the same model, block size, vocabulary, length
limit and dtype; each plan is encoded once and sent to every rank; rank 0's tokens are the step's
(the others must report the same ones); and any rank's death, failed step or disagreement is the
group's death, since the other ranks may be waiting in a collective that will never complete.

A worker that heartbeats without having registered here belongs to a previous incarnation of
this scheduler (it crashed and restarted on the same address): it is asked to `Reregister`, so
a separately started worker rejoins a restarted scheduler without being restarted itself.

Anyone who can reach the socket can send it anything: a frame that is malformed, undecodable, or
a result or error that no registered worker sent is logged, counted (`num_dropped_frames`) and
dropped. Only a registered worker's exit or silence is the group's death.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from scheduler_svc import protocol
from scheduler_svc.protocol import Heartbeat, Reregister, StepPlan, StepResult, WorkerError, WorkerHello
from scheduler_svc.worker_link_security import CurveServer, SchedulerKeys, check_worker_bind

_REREGISTER_INTERVAL_S = 2.0  # between two requests to the same unregistered worker
# A worker's first heartbeats may overtake its hello (another socket): ask it to register only once
# it has beaten unregistered this long, so that a starting worker is never asked. (A
# tensor-parallel rank asked to register exits, worker.py.)
_REREGISTER_GRACE_S = 1.0
_MAX_UNREGISTERED_TRACKED = 1024
# What every rank, and every worker that replaces one, must share with the others.
_SAME_MODEL_FIELDS = ("model_fingerprint", "block_size", "vocab_size", "world_size", "max_model_len", "dtype",
                      "kv_cache_dtype")

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A worker exited or stopped answering; the engine cannot make progress."""


class WorkerStepError(RuntimeError):
    """A worker reported an exception while executing a plan."""


class WorkerRegistrationError(RuntimeError):
    """Workers did not register in time, or disagree about the model or the protocol."""


class _DroppedFrame(ValueError):
    """A message the group ignores (malformed, or not from a registered worker)."""


@dataclass(slots=True)
class _Worker:
    hello: WorkerHello
    identity: bytes
    last_seen: float


@dataclass(slots=True)
class _PendingStep:
    plan_step_id: int
    results: dict[int, StepResult] = field(default_factory=dict)
    future: asyncio.Future | None = None


class WorkerGroup:
    """Registers `world_size` workers and runs plans on all of them, one step at a time."""

    def __init__(self, bind_addr: str, world_size: int = 1, heartbeat_timeout_s: float = 15.0,
                 keys: SchedulerKeys | None = None, insecure: bool = False):
        """`keys`: accept only CURVE-authenticated workers (worker_link_security.py); without them
        a bind other machines can reach is refused unless `insecure`."""
        check_worker_bind(bind_addr, keys is not None, insecure)
        self.world_size = world_size
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise, not vanish
        self.curve: CurveServer | None = None if keys is None else CurveServer(self._context, keys)
        if self.curve is not None:
            self.curve.secure(self._socket)
        self._socket.bind(bind_addr)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._workers: dict[int, _Worker] = {}
        self._heartbeats: dict[int, float] = {}
        self._processes: list[subprocess.Popen] = []
        self._pending: _PendingStep | None = None
        self._registered = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._asked_to_register: dict[int, float] = {}  # rank -> when we last asked
        self._unregistered_beats: dict[tuple[int, int], float] = {}  # (rank, pid) -> first beat seen
        self.dead_reason: str | None = None
        self.num_dropped_frames = 0  # malformed or unexpected messages, logged and ignored
        self.num_deaths = 0  # deaths declared: exits, silences, double registrations
        self.generation = 0  # full registrations: each brings workers that know no request
        self.lost_since: float | None = None  # the first death since the group was last whole
        self._first_hellos: list[WorkerHello] = []  # what the scheduler was sized for
        self._change = asyncio.Event()  # replaced at each full registration or death

    @property
    def hellos(self) -> list[WorkerHello]:
        return [self._workers[rank].hello for rank in sorted(self._workers)]

    @property
    def is_registered(self) -> bool:
        """Every rank is registered and none has died since."""
        return self._registered.is_set()

    def watch_process(self, process: subprocess.Popen) -> None:
        """Treat this worker process's exit as the group's death."""
        self._processes.append(process)

    def unwatch_process(self, process: subprocess.Popen) -> None:
        """Stop watching a process (about to be killed on purpose); unknown ones are ignored."""
        if process in self._processes:
            self._processes.remove(process)

    async def wait_change(self, timeout_s: float | None) -> bool:
        """Wait for the next full registration or death; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._change.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="worker-recv"),
            asyncio.create_task(self._monitor_loop(), name="worker-monitor"),
        ]

    async def wait_registered(self, timeout_s: float) -> list[WorkerHello]:
        """Wait for every rank's hello; checks they agree on model, blocks and protocol. Raises
        WorkerDiedError if a worker has died (a spawned process exited) before they all did."""
        deadline = time.monotonic() + timeout_s
        while not self._registered.is_set():
            if self.dead_reason is not None:
                raise WorkerDiedError(self.dead_reason)
            if not await self.wait_change(deadline - time.monotonic()):
                raise WorkerRegistrationError(
                    f"{len(self._workers)} of {self.world_size} workers registered within {timeout_s:.0f} s"
                )
        return _check_agreement(self.hellos)

    async def execute(self, plan: StepPlan) -> StepResult:
        """Send the plan to every worker; rank 0's result is authoritative."""
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        pending = _PendingStep(plan.step_id, future=asyncio.get_running_loop().create_future())
        self._pending = pending
        frame = protocol.encode(plan)
        try:
            for worker in self._workers.values():
                await self._socket.send_multipart([worker.identity, frame])
        except zmq.ZMQError as error:
            self._declare_dead(f"could not send a plan to a worker: {error}")
        try:
            return await pending.future
        finally:
            self._pending = None

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask workers to exit, wait for spawned processes, then close the socket."""
        for task in self._tasks[1:]:
            task.cancel()  # the monitor: workers exiting now is the plan, not a death
        frame = protocol.encode(protocol.Shutdown(reason="scheduler stopping"))
        for worker in list(self._workers.values()):
            try:
                await self._socket.send_multipart([worker.identity, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # already gone
        await asyncio.to_thread(_reap, self._processes, timeout_s)
        self.close()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._socket.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self._context.term()

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                identity, message = self._decode(frames)
                self._handle(identity, message)
            except _DroppedFrame as error:
                self._drop(frames, str(error))
                continue
            except Exception as error:  # a bug handling one message must not stop the scheduler
                logger.exception("error handling a message from %r", frames[0])
                self._drop(frames, repr(error))
                continue
            if isinstance(message, Heartbeat) and message.rank not in self._workers:
                if len(self._unregistered_beats) > _MAX_UNREGISTERED_TRACKED:  # beats with made-up pids
                    self._unregistered_beats.clear()
                first_beat = self._unregistered_beats.setdefault((message.rank, message.pid), time.monotonic())
                if time.monotonic() - first_beat >= _REREGISTER_GRACE_S:
                    await self._ask_to_register(message.rank)

    def _decode(self, frames: list[bytes]) -> tuple[bytes, object]:
        # A worker's DEALER sends one frame; the ROUTER puts the sender's identity before it.
        if len(frames) != 2:
            raise _DroppedFrame(f"{len(frames) - 1} frames instead of one")
        identity, frame = frames
        try:
            return identity, protocol.decode_for_scheduler(frame)
        except Exception as error:
            raise _DroppedFrame(f"undecodable: {error}") from None

    def _drop(self, frames: list[bytes], reason: str) -> None:
        self.num_dropped_frames += 1
        logger.error("dropping a message from %r (%d dropped so far): %s", frames[0], self.num_dropped_frames, reason)

    async def _ask_to_register(self, rank: int) -> None:
        now = time.monotonic()
        if now - self._asked_to_register.get(rank, -_REREGISTER_INTERVAL_S) < _REREGISTER_INTERVAL_S:
            return
        self._asked_to_register[rank] = now
        logger.info("worker %d heartbeats but never registered here; asking it to register", rank)
        frame = protocol.encode(Reregister(reason="scheduler restarted"))
        try:
            await self._socket.send_multipart([f"worker-{rank}".encode(), frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as error:
            logger.warning("cannot reach worker %d to ask it to register: %s", rank, error)

    def _handle(self, identity: bytes, message) -> None:
        now = time.monotonic()
        if isinstance(message, Heartbeat):
            if message.rank not in self._workers:
                return  # not ours (yet): its silence must not count as our worker's death
            self._heartbeats[message.rank] = now
        elif isinstance(message, WorkerHello):
            self._register(identity, message, now)
        elif isinstance(message, StepResult):
            self._check_sender(identity, message.rank)
            self._heartbeats[message.rank] = now
            self._collect(message)
        elif isinstance(message, WorkerError):
            self._check_sender(identity, message.rank)
            self._heartbeats[message.rank] = now
            if self.world_size > 1:
                # Its peers may be waiting in a collective of that step: the group is out of step
                # for good (the rank exits, worker.py), so it is lost as a whole and restarts.
                self._declare_dead(f"worker rank {message.rank} failed step {message.step_id} of a "
                                   f"tensor-parallel group: {message.message}")
                return
            # A negative step id: the worker could not even decode what we sent. Only one plan is
            # in flight at a time, so it is the pending one, which would otherwise never resolve.
            step_id = None if message.step_id < 0 else message.step_id
            self._fail_pending(step_id, WorkerStepError(f"worker {message.rank}: {message.message}"))

    def _check_sender(self, identity: bytes, rank: int) -> None:
        worker = self._workers.get(rank)
        if worker is None or worker.identity != identity:
            raise _DroppedFrame(f"a reply claiming rank {rank} from {identity!r}, not that rank's registered worker")

    def _register(self, identity: bytes, hello: WorkerHello, now: float) -> None:
        if hello.world_size != self.world_size or not 0 <= hello.rank < self.world_size:
            raise _DroppedFrame(f"registration refused: a worker of rank {hello.rank} in a group of "
                                f"{hello.world_size}, this scheduler serves a group of {self.world_size} "
                                f"(--tensor-parallel-size)")
        known = self._workers.get(hello.rank)
        if known is not None and known.hello.pid == hello.pid:
            # The same process answering a Reregister that crossed its first hello (its first
            # heartbeat overtook the hello): it had no requests yet, so nothing is lost.
            return
        if known is not None:
            # A new process for a rank we believed alive: the old one died unseen (its own
            # supervisor restarted it), and its requests' state with it.
            self._declare_dead(f"worker rank {hello.rank} registered again from pid {hello.pid} "
                               f"(pid {known.hello.pid} restarted?)")
        if hello.protocol_version != protocol.PROTOCOL_VERSION:
            self._declare_dead(
                f"worker rank {hello.rank} speaks protocol {hello.protocol_version}, "
                f"scheduler speaks {protocol.PROTOCOL_VERSION}"
            )
            return
        if self._first_hellos:
            _check_can_replace(self._first_hellos, hello)
        self._workers[hello.rank] = _Worker(hello, identity, now)
        self._heartbeats[hello.rank] = now
        logger.info("worker %d registered: pid %d, %s %s, %d KV blocks of %d tokens",
                    hello.rank, hello.pid, hello.device, hello.dtype, hello.num_kv_blocks, hello.block_size)
        if len(self._workers) == self.world_size:
            self._first_hellos = self._first_hellos or self.hellos
            self.generation += 1
            if self.dead_reason is not None:
                logger.info("workers are back (%d full registrations); lost %.1f s ago: %s",
                            self.generation, now - self.lost_since, self.dead_reason)
            self.dead_reason = self.lost_since = None
            self._registered.set()
            self._notify_change()

    def _collect(self, result: StepResult) -> None:
        pending = self._pending
        if pending is None or result.step_id != pending.plan_step_id:
            logger.warning("ignoring result of step %d from rank %d", result.step_id, result.rank)
            return
        pending.results[result.rank] = result
        if len(pending.results) == len(self._workers) and not pending.future.done():
            disagreement = _disagreement(pending.results) if len(pending.results) > 1 else None
            if disagreement is not None:
                self._declare_dead(disagreement)
                return
            pending.future.set_result(pending.results[0])

    def _fail_pending(self, step_id: int | None, error: Exception) -> None:
        pending = self._pending
        if pending is None or pending.future.done():
            return
        if step_id is None or step_id == pending.plan_step_id:
            pending.future.set_exception(error)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            reason = self._find_death()
            if reason is not None:
                self._declare_dead(reason)

    def _find_death(self) -> str | None:
        for process in self._processes:
            code = process.poll()
            if code is not None:
                self._processes.remove(process)  # one exit is one death
                return f"worker process {process.pid} exited with code {code}"
        now = time.monotonic()
        for rank, seen in self._heartbeats.items():
            if now - seen > self.heartbeat_timeout_s:
                return f"worker rank {rank} sent no heartbeat for {now - seen:.1f} s"
        return None

    def _declare_dead(self, reason: str) -> None:
        """Forget every worker and fail the pending step; the ranks must register again."""
        self.num_deaths += 1
        self.dead_reason = reason
        if self.lost_since is None:
            self.lost_since = time.monotonic()
        logger.error("lost the workers (death %d): %s", self.num_deaths, reason)
        self._workers.clear()
        self._heartbeats.clear()
        self._registered.clear()
        self._notify_change()
        self._fail_pending(None, WorkerDiedError(reason))

    def _notify_change(self) -> None:
        """Wake every `wait_change`."""
        self._change.set()
        self._change = asyncio.Event()


def _check_agreement(hellos: list[WorkerHello]) -> list[WorkerHello]:
    first = hellos[0]
    for hello in hellos[1:]:
        for name in _SAME_MODEL_FIELDS:
            if getattr(hello, name) != getattr(first, name):
                raise WorkerRegistrationError(
                    f"workers disagree on {name}: rank 0 has {getattr(first, name)!r}, "
                    f"rank {hello.rank} has {getattr(hello, name)!r}"
                )
    return hellos


def _disagreement(results: dict[int, StepResult]) -> str | None:
    """Why tensor-parallel ranks' results of one step differ, or None. Rank 0 samples for all
    (worker_svc/tensor_parallel.py), so a difference means their request states have parted."""
    first = results[0]
    for rank, result in sorted(results.items()):
        if (result.req_ids, result.token_ids) != (first.req_ids, first.token_ids):
            return (f"worker ranks 0 and {rank} disagree on the tokens of step {first.step_id}: "
                    f"{list(zip(first.req_ids, first.token_ids))[:4]} vs {list(zip(result.req_ids, result.token_ids))[:4]}")
    return None


def _check_can_replace(first: list[WorkerHello], hello: WorkerHello) -> None:
    """A returning worker must serve the scheduler sized for the first ones."""
    template = first[0]
    for name in _SAME_MODEL_FIELDS:
        if getattr(hello, name) != getattr(template, name):
            raise _DroppedFrame(f"registration refused: worker rank {hello.rank} has {name} "
                                f"{getattr(hello, name)!r}, the scheduler serves {getattr(template, name)!r}")
    for name in ("num_kv_blocks", "num_swap_blocks"):
        needed = min(getattr(h, name) for h in first)
        if getattr(hello, name) < needed:
            raise _DroppedFrame(f"registration refused: worker rank {hello.rank} has {name} "
                                f"{getattr(hello, name)}, the scheduler needs at least {needed}")


def _reap(processes: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not exit in time; killing it", process.pid)
            process.kill()
            process.wait()
