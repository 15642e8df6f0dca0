"""The trainable policy: megatron-core model chunks, DDP, optimizer and LR schedule.

Two operations, both through megatron-core's `get_forward_backward_func` so that TP, PP (1F1B,
or interleaved 1F1B over model chunks with a virtual pipeline) and DP behave exactly as in
megatron training:
- `logprobs(batch)`: forward only; per-token log-probs and entropies, on every rank.
- `train_step(batch, loss_fn)`: forward + backward + optimizer step. `loss_fn` turns a
  microbatch's log-probs (and entropies) into a per-token loss *sum*; megatron divides the
  gradients by the global token count, so the objective is a token mean over the global batch.
  With `keep_values` it also hands back the forward's log-probs and entropies (the policy
  before the step), so an exactly on-policy update needs no separate `logprobs` forward.

Batches are dicts of tensors with a leading batch dimension: `input_ids` [B, S] (prompt and
completion, right-padded), `loss_mask` [B, S] (1 where a token is trained on) and whatever the
loss needs (`advantages`, `old_logprobs`, ...). Each DP rank passes its own shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_mgrpo.config.schema import Config, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_mgrpo.models.architecture import complete
from megatron_mgrpo.models.gpt import TORCH_DTYPES, build_policy, transformer_config
from megatron_mgrpo.models.logprobs import completion_logprobs
from megatron_mgrpo.parallel import ParallelContext
from megatron_mgrpo.weights.megatron_layout import gather_full_state_dict, load_full_state_dict

Batch = Dict[str, torch.Tensor]
# (logprobs [b, S], entropy [b, S] or None, microbatch) -> (loss sum, token count, metric sums)
LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], Batch],
                  Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]]


# Per-token tensors in the schedule's data store, beside the loss function's metric sums.
_VALUE_KEYS = ("logprobs", "entropy")


class NonFiniteUpdate(FloatingPointError):
    """An update refused because its loss or gradient norm is not finite (nothing changed)."""

    def __init__(self, loss: float, grad_norm: float):
        super().__init__(f"loss {loss:.4g}, grad norm {grad_norm:.4g}")
        self.loss, self.grad_norm = loss, grad_norm


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    """Token-mean loss over the global batch."""
    grad_norm: float
    """Global grad norm before clipping."""
    num_tokens: int
    """Tokens that carried loss, over all DP ranks."""
    metrics: Dict[str, float]
    """Sums over the global batch of what `loss_fn` reported, divided by num_tokens."""
    lr: float
    """Learning rate used for this step."""
    logprobs: Optional[torch.Tensor] = None
    """With `keep_values`: [B, S] the forward's log-probs of this rank's shard, before the step."""
    entropy: Optional[torch.Tensor] = None
    """With `keep_values`: [B, S] their token entropies."""


def _split_micro(batch: Batch, micro_batch_size: int, pad: bool = True) -> List[Batch]:
    """Split into microbatches of micro_batch_size rows; with `pad`, fill the last with
    all-masked rows (PP P2P needs fixed shapes, and masked rows contribute nothing), without,
    leave it short (no pipeline: a padded row would cost a full forward and backward)."""
    n = next(iter(batch.values())).shape[0]
    num = max(1, -(-n // micro_batch_size))
    padded_n = num * micro_batch_size if pad else n
    out = {}
    for k, v in batch.items():
        if padded_n > n:
            filler = torch.zeros((padded_n - n,) + tuple(v.shape[1:]), dtype=v.dtype,
                                 device=v.device)
            v = torch.cat([v, filler], dim=0)
        out[k] = v
    return [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in out.items()}
            for i in range(num)]


class MegatronPolicy:
    """This rank's GPTModel stage (a list of model chunks with a virtual pipeline), each chunk
    wrapped in megatron DDP, with their optimizer.

    `trainable=False` builds the same chunks frozen, for forwards only (the reference model,
    evaluation): no DDP grad buffers, no optimizer, no gradients. `initialize=False` skips the
    random init, for weights that are copied in right after."""

    def __init__(self, cfg: Config, ctx: ParallelContext, total_steps: Optional[int] = None,
                 temperature: float = 1.0, trainable: bool = True, initialize: bool = True):
        self.ctx = ctx
        self.model_cfg: ModelConfig = complete(cfg.model)
        self.parallel: ParallelConfig = cfg.parallel
        self.temperature = temperature
        self.trainable = trainable
        self.config = transformer_config(self.model_cfg, cfg.parallel,
                                         perform_initialization=initialize)
        # One model chunk per virtual pipeline stage (just one without a virtual pipeline),
        # each in its own DDP when trained, as megatron training builds them.
        self.ddp_chunks = []
        for vp_stage in (range(ctx.vp_size) if ctx.vp_size > 1 else [None]):
            module = build_policy(self.model_cfg, cfg.parallel, pg_collection=ctx.pg_collection,
                                  config=self.config, vp_stage=vp_stage)
            module.to(ctx.device)
            if self.config.bf16 or self.config.fp16:
                # As in megatron training: every parameter (norms too) in half precision, the
                # first stage's inputs cast down and the last stage's logits handed back in
                # fp32.
                from megatron.core.transformer.module import Float16Module

                module = Float16Module(self.config, module)
            if not trainable:
                module.requires_grad_(False)
            self.ddp_chunks.append(self._wrap(module) if trainable else module)
        self.optimizer = self.scheduler = None
        if trainable:
            from megatron.core.distributed import finalize_model_grads

            self.config.finalize_model_grads_func = finalize_model_grads
            self.config.no_sync_func = ([c.no_sync for c in self.ddp_chunks]
                                        if len(self.ddp_chunks) > 1
                                        else self.ddp_chunks[0].no_sync)
            self.optimizer = _build_optimizer(cfg.optimizer, cfg.parallel, self.model_cfg,
                                              self.ddp_chunks, ctx)
            self.scheduler = _build_scheduler(self.optimizer, cfg.optimizer,
                                              total_steps or cfg.training.steps)

    def _wrap(self, module):
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig)

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.parallel.use_distributed_optimizer)
        return DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=module,
                                       pg_collection=self.ctx.pg_collection)

    def weights_changed(self) -> None:
        """After writing into the model params: the optimizer's fp32 main params follow."""
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    @torch.no_grad()
    def copy_weights_from(self, other: "MegatronPolicy") -> None:
        """This model's params := `other`'s (the same layout: a frozen copy of a policy)."""
        mine, theirs = self.parameters(), other.parameters()
        if [p.shape for p in mine] != [p.shape for p in theirs]:
            raise ValueError("copy_weights_from: the two models are laid out differently")
        for dst, src in zip(mine, theirs):
            dst.copy_(src)
        self.weights_changed()

    # ---- weights ---------------------------------------------------------------------------

    def load_full_state_dict(self, full: Dict[str, torch.Tensor]) -> None:
        """Load full (unsplit, HF-vocab-sized) megatron-named tensors into this rank's shards
        and refresh the optimizer's fp32 main params from them."""
        load_full_state_dict(self.chunks, full, self.ctx.tp_rank, self.ctx.tp_size)
        self.weights_changed()

    def full_state_dict(self, grads: bool = False) -> Dict[str, torch.Tensor]:
        """The full state dict (or the full main grads) on every rank. Small models only."""
        tensor_of = (lambda p: p.main_grad) if grads else (lambda p: p.data)
        return gather_full_state_dict(self.chunks, self.ctx, self.model_cfg.vocab_size,
                                      tensor_of)

    # ---- forward ---------------------------------------------------------------------------

    @property
    def chunks(self) -> List[torch.nn.Module]:
        """This rank's bare GPTModel chunks (named parameters without the DDP / Float16Module
        prefixes): one, or one per virtual pipeline stage."""
        from megatron.core.models.gpt import GPTModel

        out = []
        for m in self.ddp_chunks:
            while not isinstance(m, GPTModel):
                m = m.module
            out.append(m)
        return out

    def parameters(self) -> List[torch.nn.Parameter]:
        """Every parameter this rank holds, over its chunks."""
        return [p for c in self.chunks for p in c.parameters()]

    def _set_train(self, mode: bool) -> None:
        for c in self.ddp_chunks:
            c.train(mode)

    def _forward_step(self, data_iterator, model, loss_fn=None, with_entropy=True,
                      keep_values=False):
        # The loss's tensors (masks, advantages, log-probs) come from the host batch too.
        micro = {k: v.to(self.ctx.device) for k, v in next(data_iterator).items()}
        ids = micro["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        output = model(ids, pos, None)
        return output, partial(self._loss_func, micro, ids, loss_fn, with_entropy, keep_values)

    def _loss_func(self, micro, ids, loss_fn, with_entropy, keep_values, logits):
        lp, ent = completion_logprobs(
            logits, ids, self.ctx.tp_group, self.ctx.tp_rank, self.ctx.tp_size,
            real_vocab_size=self.model_cfg.vocab_size, temperature=self.temperature,
            with_entropy=with_entropy or keep_values)
        values = {"logprobs": lp.detach()}  # handed back through the schedule's data store
        if ent is not None:
            values["entropy"] = ent.detach()
        if loss_fn is None:  # forward only
            return lp.sum() * 0.0, torch.tensor(0, dtype=torch.int), values
        # Entropy kept only as a value stays out of the loss, so no gradient runs through it.
        loss_sum, num_tokens, metrics = loss_fn(lp, ent if with_entropy else None, micro)
        metrics = {k: v.detach().float() for k, v in metrics.items()}
        metrics["loss_sum"] = loss_sum.detach().float()
        metrics["num_tokens"] = num_tokens.detach().float()
        if keep_values:
            metrics.update(values)
        return loss_sum, num_tokens.to(torch.int), metrics

    def _run(self, batch: Batch, loss_fn: Optional[LossFn], forward_only: bool,
             with_entropy: bool, keep_values: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micros = _split_micro(batch, self.parallel.micro_batch_size, pad=self.ctx.pp_size > 1)
        if self.ctx.vp_size > 1:
            # The interleaved schedule runs microbatches in groups of PP: pad with all-masked
            # microbatches to a multiple of it.
            micros += [{k: torch.zeros_like(v) for k, v in micros[0].items()}
                       for _ in range(-len(micros) % self.ctx.pp_size)]
        seq_len = batch["input_ids"].shape[1]
        fb = get_forward_backward_func()
        # Each model chunk walks every microbatch, so each gets its own iterator.
        data = [iter(micros) for _ in self.ddp_chunks] if self.ctx.vp_size > 1 else iter(micros)
        return micros, fb(
            forward_step_func=partial(self._forward_step, loss_fn=loss_fn,
                                      with_entropy=with_entropy, keep_values=keep_values),
            data_iterator=data,
            model=self.ddp_chunks,
            num_microbatches=len(micros),
            seq_length=seq_len,
            micro_batch_size=self.parallel.micro_batch_size,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def logprobs(self, batch: Batch, with_entropy: bool = True
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-token log-probs [B, S] (position t scores token t) and entropies, on all ranks."""
        self._set_train(False)
        _, store = self._run(batch, None, forward_only=True, with_entropy=with_entropy)
        self._set_train(True)
        return self._values(store, batch["input_ids"].shape, with_entropy)

    def _values(self, store, shape, with_entropy: bool
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The per-token log-probs (and entropies) the loss function put in the data store,
        [B, S] on every stage."""
        n, seq_len = shape
        if self.ctx.is_last_stage:
            lp = torch.cat([d["logprobs"] for d in store])[:n]
            ent = torch.cat([d["entropy"] for d in store])[:n] if with_entropy else None
        else:
            lp = torch.empty(n, seq_len, device=self.ctx.device)
            ent = torch.empty(n, seq_len, device=self.ctx.device) if with_entropy else None
        if self.ctx.pp_size > 1:  # results live on the last stage; every stage needs them
            src = dist.get_global_rank(self.ctx.pp_group, self.ctx.pp_size - 1)
            dist.broadcast(lp, src=src, group=self.ctx.pp_group)
            if ent is not None:
                dist.broadcast(ent, src=src, group=self.ctx.pp_group)
        return lp, ent

    def dp_shard(self, batch: Batch) -> Batch:
        """This DP rank's equal share of a global batch (all-masked rows pad the tail)."""
        n = next(iter(batch.values())).shape[0]
        per = -(-n // self.ctx.dp_size)
        shards = _split_micro(batch, per)
        while len(shards) < self.ctx.dp_size:  # fewer rows than ranks: empty, masked shards
            shards.append({k: torch.zeros_like(v) for k, v in shards[0].items()})
        return shards[self.ctx.dp_rank]

    @torch.no_grad()
    def logprobs_global(self, batch: Batch, with_entropy: bool = True
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`logprobs` of a global batch: each DP rank scores its shard, then all-gather, so
        every rank holds [B, S] for the whole batch (the IQR fence is over the global batch)."""
        lp, ent = self.logprobs(self.dp_shard(batch), with_entropy)
        return self.gather_dp(batch["input_ids"].shape[0], lp, ent)

    def gather_dp(self, n: int, *shards: Optional[torch.Tensor]
                  ) -> Tuple[Optional[torch.Tensor], ...]:
        """Each DP rank's [b, S] shard (`dp_shard`'s rows) -> the global batch's first `n`
        rows, on every rank (None stays None)."""
        out = []
        for t in shards:
            if t is None or self.ctx.dp_size == 1:
                out.append(t[:n] if t is not None else None)
                continue
            parts = [torch.empty_like(t) for _ in range(self.ctx.dp_size)]
            dist.all_gather(parts, t.contiguous(), group=self.ctx.dp_group)
            out.append(torch.cat(parts)[:n])
        return tuple(out)

    # ---- update ----------------------------------------------------------------------------

    def compute_grads(self, batch: Batch, loss_fn: LossFn, with_entropy: bool = False
                      ) -> Tuple[float, int, Dict[str, float]]:
        """Forward + backward into the (DP-reduced, token-normalised) grad buffers.

        Returns (global token-mean loss, global token count, metric means)."""
        return self._forward_backward(batch, loss_fn, with_entropy, keep_values=False)[0]

    def _forward_backward(self, batch: Batch, loss_fn: LossFn, with_entropy: bool,
                          keep_values: bool):
        if not self.trainable:
            raise RuntimeError("this model was built frozen (trainable=False)")
        self._set_train(True)
        for c in self.ddp_chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        _, store = self._run(batch, loss_fn, forward_only=False, with_entropy=with_entropy,
                             keep_values=keep_values)
        values = (self._values(store, batch["input_ids"].shape, with_entropy=True)
                  if keep_values else (None, None))
        return self._reduce_metrics(store), values

    def train_step(self, batch: Batch, loss_fn: LossFn, with_entropy: bool = False,
                   keep_values: bool = False) -> StepResult:
        """One optimizer step on this batch (this rank's DP shard of it)."""
        (loss, num_tokens, metrics), (lp, ent) = self._forward_backward(
            batch, loss_fn, with_entropy, keep_values)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self._step_if_finite(loss)
        self.scheduler.step(increment=1)
        return StepResult(loss=loss, grad_norm=grad_norm, num_tokens=num_tokens,
                          metrics=metrics, lr=lr, logprobs=lp, entropy=ent)

    @torch.no_grad()
    def _step_if_finite(self, loss: float) -> float:
        """megatron's optimizer step (grads ready -> norm -> clip -> update), refusing a
        non-finite loss or grad norm before anything is updated: megatron itself applies NaN
        gradients in bf16 and fp32 (it checks only under an fp16 loss scale). Returns the grad
        norm (the same on every rank: it is reduced over the model-parallel groups)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        found_inf = opt.prepare_grads()
        grad_norm = float(opt.get_grad_norm())
        if found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteUpdate(loss, grad_norm)
        for part in getattr(opt, "chained_optimizers", [opt]):
            params = part.get_parameters()
            if part.config.clip_grad > 0 and params:
                clip_grad_by_total_norm_fp32(
                    params, part.config.clip_grad, grad_norm,
                    part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if not opt.step_with_ready_grads():
            raise FloatingPointError("megatron's optimizer step did not run")
        return grad_norm

    def _reduce_metrics(self, store) -> Tuple[float, int, Dict[str, float]]:
        """Sum the per-microbatch metric sums over microbatches and DP ranks; every PP stage
        gets the last stage's numbers. Returns (loss, tokens, metrics), token means."""
        keys = (sorted(k for k in store[0] if k not in _VALUE_KEYS)
                if (self.ctx.is_last_stage and store) else None)
        if self.ctx.pp_size > 1:  # only the last stage ran the loss and knows the keys
            holder = [keys]
            src = dist.get_global_rank(self.ctx.pp_group, self.ctx.pp_size - 1)
            dist.broadcast_object_list(holder, src=src, group=self.ctx.pp_group)
            keys = holder[0]
        vec = torch.zeros(len(keys), dtype=torch.float64, device=self.ctx.device)
        if self.ctx.is_last_stage:
            for d in store:
                vec += torch.stack([d[k].double().sum() for k in keys]).to(vec.device)
        if self.ctx.pp_size > 1:  # zeros elsewhere, so the sum is a broadcast
            dist.all_reduce(vec, group=self.ctx.pp_group)
        dist.all_reduce(vec, group=self.ctx.dp_group)
        sums = dict(zip(keys, vec.tolist()))
        num_tokens = int(round(sums.pop("num_tokens")))
        denom = max(num_tokens, 1)
        loss = sums.pop("loss_sum") / denom
        return loss, num_tokens, {k: v / denom for k, v in sums.items()}


def _build_optimizer(o: OptimizerConfig, parallel: ParallelConfig, m: ModelConfig, chunks,
                     ctx: ParallelContext):
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    dtype = TORCH_DTYPES[m.params_dtype]
    mcfg = MegatronOptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16,
        params_dtype=dtype, use_distributed_optimizer=parallel.use_distributed_optimizer,
        # fp16 needs a loss scale; bf16 and fp32 do not.
        initial_loss_scale=2 ** 16 if dtype is torch.float16 else 2 ** 32,
    )
    return get_megatron_optimizer(mcfg, chunks, pg_collection=None,
                                  use_gloo_process_groups=ctx.device.type == "cpu")


def _build_scheduler(optimizer, o: OptimizerConfig, total_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = int(o.warmup_fraction * total_steps)
    style = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[o.schedule]
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
