"""The embedded rollout engine: transformers' models, in this process (CPU runs and tests).

One `AutoModelForCausalLM` per weight set ("policy", "momentum"), built from an HF config dict
(random init, the same for both sets) or loaded offline from an HF directory.

Sampling is our own loop over `model(input_ids, attention_mask, position_ids, cache)` rather
than `model.generate`, for two things `generate` does not give:
- exact log-probs: each token's log p under softmax(logits / T) over the full vocabulary, before
  top-p truncation (what megatron's `completion_logprobs(..., temperature=T)` recomputes);
  `generate`'s scores are post-processing (top-p rows are -inf);
- per-request seeds: `generate` draws from the global RNG, so one request's tokens depend on
  the rest of the batch.
Prompts are left-padded, position ids count real tokens only, logits are computed for the last
position only, and finished rows are dropped from the cache so that the batch shrinks as
completions stop. The forward is `fast_decode.Decoder` (the Llama family written out over the
transformers model's own parameters, a cache allocated once per batch) where it covers the
architecture, else transformers' forward with its `DynamicCache`.

Seeding: every completion has its own random stream, seeded from (call seed, prompt tokens,
occurrence of that prompt in the call, sample index j). Each step draws one uniform u per row
from its stream and picks the token by inverse CDF over the top-p-truncated distribution. So a
completion depends on its seed, prompt and j only: the same prompt gives the same completions
alone or in any batch (up to float differences in the logits of padded vs unpadded forwards,
which move a token only when u falls within ~1e-7 of a CDF boundary). A prompt repeated within
one call gets fresh streams for each repeat.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from megatron_mgrpo.platform import without_device_rewrites
from megatron_mgrpo.rollout.base import (WEIGHT_SETS, Bucket, Completion, RolloutEngine,
                                         SamplingParams, WeightsNotReadyError, WeightUpdateError,
                                         check_weight_set)

StepCallback = Callable[[List[int], List[int], List[float], List[bool]],
                        Optional[Iterable[int]]]
"""`on_step(rows, tokens, logprobs, ends)` after each decoding step: the rows (indices into
the call's prompts) that drew a token, their tokens, log-probs, and whether the token ends the
row (a stop token, or max_new_tokens). It may return rows to end there as "stop": a stop
condition the engine cannot check itself (a server's stop strings)."""


@dataclass
class _WeightSet:
    model: torch.nn.Module
    params: Dict[str, torch.nn.Parameter]
    """Parameters by HF name (each once: a tied lm_head is not listed)."""
    aliases: frozenset
    """Names accepted and ignored (the tied lm_head.weight)."""
    version: Optional[int] = None
    broken: Optional[str] = None
    """Why the set cannot generate (an update that did not complete), else None."""
    fused: Optional[list] = None
    """`fast_decode.fuse`'s tensors: the set decodes with `fast_decode.Decoder` (None: with
    transformers' forward, an architecture that decoder does not cover)."""


class EmbeddedEngine(RolloutEngine):
    """Both weight sets as transformers models on `device`; see the module docstring.

    A new engine's sets hold the config's random init (or `from_pretrained`'s weights) with
    version None and can generate; only a failed update makes a set refuse to."""

    def __init__(self, hf_config: dict, dtype: torch.dtype = torch.float32,
                 max_batch_size: int = 256, device: str | torch.device = "cpu",
                 init_seed: int = 0, seed: Optional[int] = None,
                 num_threads: Optional[int] = None, sets: Sequence[str] = WEIGHT_SETS):
        """hf_config: an HF config.json as a dict (`models.architecture.hf_config_dict`).
        dtype: the models' parameter dtype (sampling math is fp32 whatever it is).
        max_batch_size: most sequences in one forward; bigger requests run in chunks.
        init_seed: seed of the random init both sets start from (the global RNG is untouched).
        seed: seed of the engine's generator, which seeds calls with `SamplingParams.seed=None`.
        num_threads: torch CPU threads while generating (None: leave torch's setting). On a
            small machine shared with busy processes, 1 avoids OpenMP threads waiting on each
            other (measured: 50 ms with 1 thread vs seconds with 2 under load).
        sets: the weight sets to hold (a server that serves one model holds just "policy").
        """
        from transformers import AutoConfig

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: got {max_batch_size}; accepted: an integer >= 1")
        from megatron_mgrpo.weights.fp8 import block_size_of

        # FP8 weights (an FP8 checkpoint, FP8 updates) are dequantised as they arrive: the
        # models here stay plain, and the config's tile size says how to read block scales.
        self.fp8_block_size = block_size_of(hf_config)
        self.config = AutoConfig.for_model(**{k: v for k, v in hf_config.items()
                                              if k != "quantization_config"})
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self._rng = random.Random(seed)
        self.num_threads = num_threads
        self._sets: Dict[str, _WeightSet] = {}
        for name in sets:
            check_weight_set(name)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self._install(name, self._from_config())

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, **kwargs
                        ) -> "EmbeddedEngine":
        """Both weight sets loaded (offline) from an HF model directory; versions stay None."""
        from megatron_mgrpo.models.architecture import read_hf_config

        engine = cls(read_hf_config(path), dtype=dtype, **kwargs)
        for name in engine._sets:
            engine.load_pretrained(name, path)
        return engine

    # ---- weights ----------------------------------------------------------------------------

    def _from_config(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(self.config)

    def _install(self, name: str, model: torch.nn.Module) -> None:
        from megatron_mgrpo.rollout import fast_decode

        model = model.to(device=self.device, dtype=self.dtype).eval()
        model.requires_grad_(False)
        fused = None if fast_decode.unsupported(model.config) else fast_decode.fuse(model)
        params = dict(model.named_parameters())
        tied = "lm_head.weight" not in params and "lm_head.weight" in model.state_dict()
        self._sets[name] = _WeightSet(model, params,
                                      frozenset({"lm_head.weight"} if tied else ()),
                                      fused=fused)
        if not hasattr(self, "_cache_kw"):
            fwd = inspect.signature(model.forward).parameters
            self._cache_kw = "cache" if "cache" in fwd else "past_key_values"

    def load_pretrained(self, model: str, path: str, version: Optional[int] = None) -> None:
        """Replace weight set `model` with the HF checkpoint at `path` (local files only).
        An FP8 checkpoint (`weights.fp8`) is read by name and dequantised."""
        from transformers import AutoModelForCausalLM

        from megatron_mgrpo.models.architecture import read_hf_config
        from megatron_mgrpo.weights.fp8 import block_size_of, is_fp8_config

        self._set(model)
        hf_config = read_hf_config(path)
        if is_fp8_config(hf_config):
            from megatron_mgrpo.weights.hf_io import HFCheckpoint

            if block_size_of(hf_config) != self.fp8_block_size:
                raise WeightUpdateError(
                    f"{path}: FP8 tiles of {block_size_of(hf_config)}, this engine's config "
                    f"says {self.fp8_block_size}")

            self._install(model, self._from_config())
            ckpt = HFCheckpoint(path)
            try:
                seen: set = set()
                self.load_tensors(model, [(n, ckpt[n]) for n in ckpt], seen)
                self.check_covered(model, seen)
            finally:
                ckpt.close()
        else:
            self._install(model, AutoModelForCausalLM.from_pretrained(path,
                                                                      local_files_only=True))
        self._sets[model].version = version

    def update_weights(self, model: str, buckets: Iterable[Bucket], version: int) -> None:
        """Copy HF-named tensors into weight set `model` (cast to the engine's dtype/device).

        Each bucket is checked whole (known name, matching shape, not sent before) before any
        of it is copied; at the end every parameter must have been covered. A tied model's
        lm_head.weight is the embedding: it may be absent, and is ignored if sent."""
        ws = self._set(model)
        ws.version = None
        ws.broken = f"the update to version {version} did not complete"
        seen: set = set()
        for bucket in buckets:
            self.load_tensors(model, bucket, seen)
        self.check_covered(model, seen)
        ws.broken = None
        ws.version = version

    def load_tensors(self, model: str, bucket: Bucket, seen: Optional[set] = None) -> None:
        """Copy one bucket into weight set `model` after checking all of it (known names,
        matching shapes, none in `seen`, the names already loaded in this update, which it
        extends). Leaves the version alone: a partial update's caller stamps it. FP8 weights
        with their scales (`weights.fp8`) are dequantised into the engine's dtype."""
        from megatron_mgrpo.weights.fp8 import dequantize_bucket

        ws = self._set(model)
        seen = set() if seen is None else seen
        try:
            bucket = dequantize_bucket(bucket, self.fp8_block_size)
        except ValueError as e:
            raise WeightUpdateError(f"update_weights({model!r}): {e}") from None
        staged = []
        for name, tensor in bucket:  # check the whole bucket before copying any of it
            if name in ws.aliases:
                continue
            param = ws.params.get(name)
            if param is None:
                close = difflib.get_close_matches(name, list(ws.params), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise WeightUpdateError(
                    f"update_weights({model!r}): the model has no parameter {name!r}{hint}")
            if name in seen:
                raise WeightUpdateError(
                    f"update_weights({model!r}): {name!r} sent twice in one update")
            if tuple(tensor.shape) != tuple(param.shape):
                raise WeightUpdateError(
                    f"update_weights({model!r}): {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model's parameter {tuple(param.shape)}")
            seen.add(name)
            staged.append((param, tensor))
        with torch.no_grad():
            for param, tensor in staged:
                param.copy_(tensor)

    def check_covered(self, model: str, seen: set) -> None:
        """Raise WeightUpdateError unless `seen` names every parameter of weight set `model`."""
        ws = self._set(model)
        missing = [n for n in ws.params if n not in seen]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise WeightUpdateError(
                f"update_weights({model!r}): the update ended without {len(missing)} of "
                f"{len(ws.params)} parameters ({', '.join(missing[:3])}{more}); the weight set "
                "is unusable until a complete update")

    def _set(self, model: str) -> _WeightSet:
        check_weight_set(model)
        if model not in self._sets:
            raise ValueError(f"this engine holds only {' and '.join(self._sets)}, not {model!r}")
        return self._sets[model]

    def weight_version(self, model: str = "policy") -> Optional[int]:
        return self._set(model).version

    def hf_model(self, model: str = "policy") -> torch.nn.Module:
        """The transformers module behind weight set `model` (for tests and inspection)."""
        return self._set(model).model

    # ---- sampling ---------------------------------------------------------------------------

    def generate(self, prompts: List[List[int]], n: int, params: SamplingParams,
                 model: str = "policy") -> List[List[Completion]]:
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        prompts = self._checked(prompts)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seeds = stream_seeds(prompts, n, seed)
        flat = self._rows([p for p in prompts for _ in range(n)], seeds, params, model)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def generate_rows(self, prompts: List[List[int]], seeds: Sequence[Optional[int]],
                      params: SamplingParams, model: str = "policy",
                      should_stop: Optional[Callable[[], bool]] = None,
                      on_step: Optional[StepCallback] = None) -> List[Completion]:
        """One completion per prompt, each drawn from the random stream `seeds[i]` (None: a
        fresh one from the engine's generator); `params.seed` is not used. What a server
        does with a request whose items carry their own sampling seeds. `should_stop` is
        asked before every decoding step; True ends the unfinished completions there with
        finish_reason "abort" (a cancelled request). `on_step` (`StepCallback`) sees the
        tokens as they are drawn (a server's stream) and may end rows."""
        return self._rows(self._checked(prompts), seeds, params, model, should_stop, on_step)

    @torch.no_grad()
    def _rows(self, prompts: List[List[int]], seeds: Sequence[Optional[int]],
              params: SamplingParams, model: str,
              should_stop: Optional[Callable[[], bool]] = None,
              on_step: Optional[StepCallback] = None) -> List[Completion]:
        """generate_rows on prompts already checked."""
        ws = self._set(model)
        if ws.broken:
            raise WeightsNotReadyError(
                f"weight set {model!r} cannot generate: {ws.broken}; push a complete update "
                "first")
        if len(seeds) != len(prompts):
            raise ValueError(f"generate_rows: {len(prompts)} prompts but {len(seeds)} seeds")
        seeds = [self._rng.getrandbits(63) if s is None else int(s) for s in seeds]
        # Similar lengths together: less padding; the result does not depend on the grouping.
        rows = sorted(range(len(prompts)), key=lambda r: -len(prompts[r]))
        out: List[Optional[Completion]] = [None] * len(prompts)
        threads = torch.get_num_threads()
        if self.num_threads and self.num_threads != threads:
            torch.set_num_threads(self.num_threads)
        try:
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start:start + self.max_batch_size]
                with without_device_rewrites():  # transformers on CPU: no CUDA to rewrite
                    done = self._sample(ws, [prompts[r] for r in chunk],
                                        [seeds[r] for r in chunk], params, should_stop,
                                        None if on_step is None else _in_chunk(on_step, chunk))
                for r, c in zip(chunk, done):
                    out[r] = c
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        return out

    def _checked(self, prompts: List[List[int]]) -> List[List[int]]:
        vocab = self.config.vocab_size
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"generate: prompt {i} has a token id outside [0, {vocab})")
        return prompts

    def _sample(self, ws: _WeightSet, prompts: Sequence[List[int]], seeds: Sequence[int],
                params: SamplingParams, should_stop: Optional[Callable[[], bool]] = None,
                on_step: Optional[StepCallback] = None) -> List[Completion]:
        """One batch: left-padded prefill, then one token per step for the unfinished rows
        (`on_step`'s rows are this batch's)."""
        from megatron_mgrpo.rollout.fast_decode import Decoder

        dev, b, steps = self.device, len(prompts), params.max_new_tokens
        width = max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = mask.sum(-1)
        uniforms = torch.stack([torch.rand(steps, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(s))
                                for s in seeds]).to(dev)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long,
                                device=dev)

        if ws.fused is not None:
            decoder = Decoder(ws.model, ws.fused, b, width + steps)
        else:
            decoder = _TransformersDecoder(ws.model, self._cache_kw)
        logits = decoder.prefill(ids, mask, positions)

        tokens = torch.zeros(b, steps, dtype=torch.long, device=dev)
        logprobs = torch.zeros(b, steps, dtype=torch.float32, device=dev)
        lengths = torch.full((b,), steps, dtype=torch.long)
        stopped = torch.zeros(b, dtype=torch.bool)
        aborted = False
        active = torch.arange(b, device=dev)  # original rows still in the cache
        for t in range(steps):
            if should_stop is not None and should_stop():
                lengths[active.cpu()] = t
                aborted = True
                break
            logits = logits.float()
            if t < params.min_new_tokens and stop_ids.numel():
                logits[:, stop_ids] = float("-inf")
            tok, lp = _pick(logits, uniforms[active, t], params)
            tokens[active, t] = tok
            logprobs[active, t] = lp
            hit = torch.isin(tok, stop_ids)
            if on_step is not None:
                ended = on_step(active.tolist(), tok.tolist(), lp.tolist(),
                                (hit | (t == steps - 1)).tolist())
                if ended:
                    hit = hit | torch.isin(active, torch.tensor(sorted(ended), device=dev))
            if hit.any():
                rows_hit = active[hit].cpu()
                lengths[rows_hit] = t + 1
                stopped[rows_hit] = True
                keep = (~hit).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                decoder.select(keep)
                active, next_pos, tok = active[keep], next_pos[keep], tok[keep]
            if t == steps - 1:
                break
            logits = decoder.step(tok, next_pos)
            next_pos = next_pos + 1

        tokens, logprobs = tokens.cpu().tolist(), logprobs.cpu().tolist()
        return [Completion(token_ids=tokens[r][:int(lengths[r])],
                           logprobs=logprobs[r][:int(lengths[r])],
                           finish_reason="stop" if stopped[r] else
                           "abort" if aborted and int(lengths[r]) < steps else "length")
                for r in range(b)]


class _TransformersDecoder:
    """`fast_decode.Decoder`'s interface over transformers' forward and `DynamicCache`."""

    def __init__(self, model: torch.nn.Module, cache_kw: str):
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=model.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        self.model, self.cache, self.mask = model, cache, None
        self.kw = {cache_kw: cache, "use_cache": True, "logits_to_keep": 1}

    def prefill(self, ids, mask, positions):
        self.mask = mask
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          **self.kw).logits[:, -1]

    def step(self, tokens, positions):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                          position_ids=positions[:, None], **self.kw).logits[:, -1]

    def select(self, rows):
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


def _in_chunk(on_step: StepCallback, chunk: List[int]) -> StepCallback:
    """`on_step` for one batch of a call: batch rows -> the call's rows, and back."""
    back = {r: i for i, r in enumerate(chunk)}

    def step(rows, tokens, logprobs, ends):
        ended = on_step([chunk[r] for r in rows], tokens, logprobs, ends)
        return [back[r] for r in ended or () if r in back]

    return step


def stream_seeds(prompts: Sequence[Sequence[int]], n: int, seed: int) -> List[int]:
    """The random stream of each of a call's completions, prompt-major (prompt i's j-th at
    i * n + j): a function of (call seed, prompt tokens, occurrence of that prompt in the call,
    j) only, so the same prompt gets the same completions alone or in any batch, in this
    process or through a server that is handed these seeds."""
    seeds, occurrences = [], {}
    for p in prompts:
        key = tuple(int(t) for t in p)
        k = occurrences.get(key, 0)
        occurrences[key] = k + 1
        seeds.extend(_stream_seed(seed, key, k, j) for j in range(n))
    return seeds


def _stream_seed(seed: int, prompt: tuple, occurrence: int, sample: int) -> int:
    """A 63-bit seed for one completion's random stream (stable across runs and versions)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((int(seed), occurrence, sample)).encode())
    h.update(",".join(map(str, prompt)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def _pick(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams):
    """Next token per row and its log-prob under softmax(logits / T) (full vocabulary).

    Inverse-CDF sampling with one uniform u per row: the first token, in vocabulary order,
    whose cumulative probability exceeds u times the total, over the top-p nucleus (the other
    tokens zeroed). No full sort: the nucleus is found with `topk`.
    """
    if params.temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = logp.exp()
    if 0 < params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[:, -1:]
        probs = probs * (probs >= kth)  # ties with the k-th are kept, as in a nucleus
        probs = probs / probs.sum(-1, keepdim=True)  # top_p reads the renormalised top k
    if params.top_p < 1.0:
        probs = probs * _nucleus(probs, params.top_p)
    cdf = probs.cumsum(-1)
    target = u.to(cdf.dtype) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    over = tok >= probs.shape[-1]  # u * total rounded up to the total: the last kept token
    if over.any():
        rows = probs[over]
        tok[over] = rows.shape[-1] - 1 - (rows.flip(-1) > 0).to(torch.int8).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask of the top-p nucleus per row: the most likely tokens, in order, while the mass of
    those before them is <= top_p (SGLang's rule; ties with the last one kept are kept too).
    Looks at the top k tokens, k growing from 64 by what is still missing, instead of sorting
    the whole vocabulary (a trained model's nucleus is small)."""
    vocab = probs.shape[-1]
    k = min(vocab, 64)
    while True:
        top = probs.topk(k, dim=-1).values  # descending
        kept = ((top.cumsum(-1) - top) <= top_p).sum(-1)  # >= 1: the first has 0 before it
        open_rows = kept >= k
        if k == vocab or not bool(open_rows.any()):
            break
        covered = float(top[open_rows].sum(-1).min())
        k = max(8 * k, int(2 * k * top_p / max(covered, 1e-12)))
        k = vocab if k > vocab // 4 else k  # a big share of the vocabulary: just sort it all
    threshold = top.gather(-1, (kept - 1)[:, None])
    return probs >= threshold
