"""Executes one `StepPlan`: update request state, run the model on one flattened batch, sample."""

from __future__ import annotations

import time
from typing import Callable

import torch

from scheduler_svc.protocol import SamplingOptions, StepPlan, StepResult, TokenLogprobs, TokenMask
from worker_svc.attention_metadata import AttentionMetadata
from worker_svc.input_batch import InputBatch, prepare_inputs, to_device
from worker_svc.kv_cache import KVCaches
from worker_svc.logits_processing import RowHistory, needs_history
from worker_svc.logprobs import gather_logprobs
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.request_state import PlanError, RequestStates, ScheduledRequest
from worker_svc.sampler import Sampler, torch_argmax
from worker_svc.swap_space import SwapSpace
from worker_svc.tensor_parallel import share_sampled_tokens
from worker_svc.token_mask import apply_token_masks

# Exercises the sampler's widest path (sort for top-k/top-p, the most logprobs) during memory
# profiling.
_PROFILE_SAMPLING = SamplingOptions(temperature=1.0, top_k=50, top_p=0.9, logprobs=20)


class ModelRunner:
    """Owns the model, the KV pool, the per-request state and the sampler of one worker."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        block_size: int,
        device: torch.device | str,
        rank: int = 0,
        *,
        max_model_len: int | None = None,
        sampler_seed: int | None = None,
        swap_space: SwapSpace | None = None,
        world_size: int = 1,
        argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
    ) -> None:
        """`world_size` > 1: a tensor-parallel rank of a joined process group, whose model is
        sharded (tensor_parallel.py); rank 0 samples and every rank appends its tokens. `argmax`:
        the sampler's (see `Sampler`)."""
        if len(kv_caches) != model.num_layers:
            raise ValueError(f"{len(kv_caches)} KV cache layers for a {model.num_layers}-layer model")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.num_blocks = kv_caches[0][0].shape[0]
        self.requests = RequestStates(block_size, self.num_blocks, max_model_len)
        self.sampler = Sampler(self.device, seed=sampler_seed, argmax=argmax)
        self.swap_space = swap_space

    def reset(self) -> None:
        """Forget every request (a new scheduler knows none of them); the pool is left as is."""
        self.requests = RequestStates(self.block_size, self.num_blocks, self.requests.max_model_len)

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and return the sampled tokens, in batch order.

        Raises `PlanError` when the plan disagrees with the worker. On any failure the request
        state is as before the plan, except that its finished requests are dropped.
        """
        started = time.perf_counter()
        self._check_swaps(plan)
        scheduled = self.requests.apply(plan)
        req_ids: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        try:
            if self.swap_space is not None:
                self.swap_space.swap_out(self.kv_caches, plan.swap_out)
                self.swap_space.swap_in(self.kv_caches, plan.swap_in)
            if scheduled:
                req_ids, token_ids, logprobs = self._run(scheduled, plan.token_masks)
        except BaseException:
            # Back to the state the scheduler still believes in (it advances nothing on a
            # failed step), so later plans keep agreeing with ours.
            self.requests.undo(plan)
            raise
        return StepResult(
            step_id=plan.step_id,
            rank=self.rank,
            req_ids=req_ids,
            token_ids=token_ids,
            execute_time_s=time.perf_counter() - started,
            logprobs=logprobs,
        )

    def _check_swaps(self, plan: StepPlan) -> None:
        if not (plan.swap_out or plan.swap_in):
            return
        if self.swap_space is None:
            raise PlanError(f"step {plan.step_id} swaps blocks, but this worker has no swap space")
        try:
            self.swap_space.check(plan.swap_out + plan.swap_in, self.num_blocks)
        except ValueError as error:
            raise PlanError(f"step {plan.step_id}: {error}") from None

    def _run(self, scheduled: list[ScheduledRequest], token_masks: list[TokenMask] = ()
             ) -> tuple[list[str], list[int], list[TokenLogprobs | None]]:
        batch = prepare_inputs(scheduled, self.block_size)
        histories = None
        if needs_history(batch.sampling):
            histories = [RowHistory(s.state.token_ids, s.state.num_prompt_tokens) for s in scheduled if s.samples]
        sampled, logprobs = self._forward_and_sample(batch, histories, token_masks)
        self.requests.advance(scheduled, sampled)
        return batch.sample_req_ids, sampled, logprobs

    @torch.inference_mode()
    def _forward_and_sample(self, batch: InputBatch, histories: list[RowHistory] | None,
                            token_masks: list[TokenMask] = ()) -> tuple[list[int], list[TokenLogprobs | None]]:
        input_ids, positions = batch.model_inputs(self.device)
        attn = batch.attention_metadata(self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, attn)
        if batch.logits_indices.size == 0:
            return [], []
        if self.rank > 0:  # rank 0 samples for the group (tensor_parallel.py)
            tokens = share_sampled_tokens(None, batch.logits_indices.size, self.device)
            return tokens.tolist(), []
        logits_indices = to_device(batch.logits_indices, self.device)
        logits = self.model.compute_logits(hidden[logits_indices])
        # Structured output: what the constraint forbids is -inf to sampling and logprobs alike (as in vLLM).
        logits = apply_token_masks(logits, batch.sample_req_ids, token_masks)
        tokens = self.sampler.sample(logits, batch.sampling, batch.sample_positions, histories)
        if self.world_size > 1:
            tokens = share_sampled_tokens(tokens, len(tokens), self.device)
        # From the raw logits, which sampling leaves untouched.
        logprobs = gather_logprobs(logits, batch.sampling, tokens)
        return tokens.tolist(), logprobs

    @torch.inference_mode()
    def profile_step(self, num_tokens: int, max_num_sampled: int = 256) -> None:
        """Run a step as large as any the worker should see, to measure peak activation memory.

        Meant for a throwaway pool: the dummy sequences all share its first blocks, each as long
        as the pool (and max_model_len) allows. Samples `max_num_sampled` rows with top-k/top-p so
        the sampler's sort is part of the peak.
        """
        seq_len = min(num_tokens, self.num_blocks * self.block_size,
                      self.requests.max_model_len or num_tokens)
        num_full, rest = divmod(num_tokens, seq_len)
        query_lens = [seq_len] * num_full + ([rest] if rest else [])
        table = list(range(-(-seq_len // self.block_size)))
        attn = AttentionMetadata.build([table] * len(query_lens), query_lens, query_lens,
                                       self.block_size, self.device)
        positions = torch.cat([torch.arange(n) for n in query_lens]).to(self.device)
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, attn)
        rows = min(num_tokens, max_num_sampled)
        logits = self.model.compute_logits(hidden[:rows])
        options = [_PROFILE_SAMPLING] * rows
        gather_logprobs(logits, options, self.sampler.sample(logits, options, [0] * rows))
