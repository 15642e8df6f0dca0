"""`mgrpo serve`'s reading of SGLang 0.5.23 `/generate` bodies, and its replies.

Every field of SGLang's `GenerateReqInput` and `SamplingParams` is either honoured or refused
with 400 (`Invalid`), never ignored:

- honoured: `text` / `input_ids` (one or a batch), `rid`, `return_logprob`,
  `logprob_start_len` (-1 only: no input log-probs), `return_text_in_logprobs`, `stream`,
  `log_metrics`; sampling: `temperature`, `top_p`, `top_k`, `max_new_tokens`,
  `min_new_tokens`, `stop` (strings), `stop_token_ids`, `ignore_eos` (else the model's EOS ends
  a completion), `no_stop_trim`, `skip_special_tokens`, `spaces_between_special_tokens`, `n`,
  `sampling_seed`; penalties, `min_p` and `logit_bias` at their neutral values.
- refused: anything else (constrained decoding, penalties, LoRA, images, custom logit
  processors, top log-probs, hidden states, the other GenerateReqInput fields that change
  the output); fields GenerateReqInput does not have are ignored, as SGLang ignores them.

Limits, as SGLang's tokenizer manager words them: a prompt of the context length or more, and
prompt + max_new_tokens beyond it, are 400s. One request takes one set of sampling parameters
for all its items except `sampling_seed` (the embedded engine batches them together).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from megatron_mgrpo.rollout.base import Completion, SamplingParams


class Invalid(ValueError):
    """A body SGLang's request validation refuses (400, `ErrorResponse` shape)."""


class Refused(ValueError):
    """A request SGLang's tokenizer manager refuses (400, `{"error": {"message"}}`)."""


REQUEST_FIELDS = {"rid", "text", "input_ids", "sampling_params", "return_logprob",
                  "logprob_start_len", "return_text_in_logprobs", "stream", "log_metrics",
                  "top_logprobs_num", "token_ids_logprob", "return_hidden_states",
                  "custom_logit_processor", "lora_path", "image_data", "video_data",
                  "audio_data", "input_embeds", "session_params", "bootstrap_host",
                  "bootstrap_port", "bootstrap_room", "data_parallel_rank", "modalities"}
"""The GenerateReqInput fields this server reads."""

METADATA_FIELDS = {"custom_labels", "routing_key", "external_trace_header", "no_logs",
                   "received_time", "http_worker_ipc", "conversation_id", "extra_key",
                   "cache_salt", "priority", "routed_dp_rank", "disagg_prefill_dp_rank",
                   "decode_tp_size", "bootstrap_pair_key", "kv_hints", "num_items_assigned"}
"""GenerateReqInput fields (0.5.23) that route, label or log a request: accepted whatever
their value, since a single embedded engine's output does not depend on them."""

UNSET_ONLY_FIELDS = {
    "background", "encoder_urls", "image_max_dynamic_patch", "images_config", "lora_id",
    "max_dynamic_patch", "max_thinking_tokens", "min_dynamic_patch", "mm_content_hashes",
    "mm_hashes", "mm_processor_kwargs", "multi_item_delimiter_indices",
    "need_wait_for_mm_inputs", "positional_embed_overrides", "require_reasoning",
    "return_bytes", "return_entropy", "return_flat_raw_output_top_logprobs",
    "return_flat_raw_top_logprobs", "return_flat_raw_top_logprobs_b64",
    "return_indexer_topk", "return_prompt_token_ids", "return_routed_experts",
    "return_sampling_mask", "routed_experts_start_len", "sampling_logprobs_mode", "session_id",
    "token_indices_to_pool", "use_audio_in_video", "video_config", "video_max_dynamic_patch",
    "watermark"}
"""The other GenerateReqInput fields (0.5.23): they change what is generated or returned,
which this server does not do, so they are accepted only unset (null, false, empty). Fields
GenerateReqInput does not have are ignored, as SGLang's request parsing ignores them."""

NEUTRAL = {"top_logprobs_num": (None, 0), "token_ids_logprob": (None,),
           "return_hidden_states": (None, False), "custom_logit_processor": (None,),
           "lora_path": (None,), "image_data": (None,), "video_data": (None,),
           "audio_data": (None,), "input_embeds": (None,), "session_params": (None,),
           "bootstrap_host": (None,), "bootstrap_port": (None,), "bootstrap_room": (None,),
           "data_parallel_rank": (None,), "modalities": (None,)}
"""Request fields accepted only at these values (this server does not do the rest)."""

SAMPLING_NEUTRAL = {"min_p": (0, 0.0), "frequency_penalty": (0, 0.0),
                    "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
                    "logit_bias": (None, {}), "json_schema": (None,), "regex": (None,),
                    "ebnf": (None,), "structural_tag": (None,), "stop_regex": (None, [], ""),
                    "custom_params": (None,), "beam_width": (None, 1), "watermark": (None,),
                    "stream_interval": (None,)}
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "no_stop_trim", "skip_special_tokens",
                   "spaces_between_special_tokens", "n", "sampling_seed"} | set(SAMPLING_NEUTRAL)


@dataclass
class Sampling:
    """One request's sampling, as the embedded engine runs it."""

    params: SamplingParams
    n: int
    stop_strings: List[str]
    no_stop_trim: bool
    skip_special_tokens: bool
    seeds: List[Optional[int]]
    """Per item (before n is expanded)."""


@dataclass
class GenerateRequest:
    prompts: List[List[int]]
    single: bool
    sampling: Sampling
    rid: List[str]
    return_logprob: bool
    text_in_logprobs: bool
    stream: bool
    texts_in: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


def _typed(name: str, value, kinds, allow_none: bool = False):
    if value is None and allow_none:
        return None
    # bool is an int subclass: True must not pass as a count
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise Invalid(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def parse_generate(body: Any, tokenizer, vocab_size: int, context_len: int,
                   eos_ids: Sequence[int]) -> GenerateRequest:
    """A `/generate` body -> the request to run; Invalid / Refused for anything else."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    for key in sorted(UNSET_ONLY_FIELDS & set(body)):
        if body[key] not in (None, False, 0, "", [], {}):
            raise Refused(f"{key} is not supported by mgrpo serve")
    for key, allowed in NEUTRAL.items():
        if key in body and body[key] not in allowed:
            raise Refused(f"{key} is not supported by mgrpo serve")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise Invalid("give exactly one of text and input_ids")
    texts_in = text is not None
    if texts_in:
        if tokenizer is None:
            raise Refused("text prompts need a tokenizer: this model directory has none "
                          "(send input_ids)")
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str)
                                                                for t in texts):
            raise Invalid("text: expected a string or a non-empty list of strings")
        prompts = [list(tokenizer.encode(t)) for t in texts]
    else:
        if not isinstance(ids, list) or not ids:
            raise Invalid("input_ids: expected a non-empty list of token ids or of lists")
        single = not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        for p in prompts:
            if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in p):
                raise Invalid("input_ids: expected lists of integers")
    for i, p in enumerate(prompts):
        if not p:
            raise Refused(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab_size:
            raise Refused(f"prompt {i} has a token id outside [0, {vocab_size})")
    start = body.get("logprob_start_len", -1)
    if start not in (-1, None):
        raise Refused("logprob_start_len: only -1 (no input log-probs) is supported")
    sp = body.get("sampling_params")
    per_item = sp if isinstance(sp, list) else [sp or {}] * len(prompts)
    if len(per_item) != len(prompts):
        raise Invalid(f"{len(prompts)} prompts but {len(per_item)} sampling_params")
    sampling = _sampling(per_item, vocab_size, eos_ids, tokenizer)
    for p in prompts:
        _check_length(len(p), sampling.params.max_new_tokens, context_len)
    rid = body.get("rid")
    if rid is None:
        rids = [uuid.uuid4().hex for _ in prompts]
    elif isinstance(rid, str) and single:
        rids = [rid]
    elif isinstance(rid, list) and len(rid) == len(prompts) and all(
            isinstance(r, str) for r in rid):
        rids = list(rid)
    else:
        raise Invalid("rid: expected a string (one prompt) or one string per prompt")
    return GenerateRequest(
        prompts=[list(p) for p in prompts], single=single, sampling=sampling, rid=rids,
        return_logprob=bool(_typed("return_logprob", body.get("return_logprob", False),
                                   (bool,))),
        text_in_logprobs=bool(_typed("return_text_in_logprobs",
                                     body.get("return_text_in_logprobs", False), (bool,))),
        stream=bool(_typed("stream", body.get("stream", False), (bool,))), texts_in=texts_in)


def _check_length(prompt_len: int, max_new: int, context_len: int) -> None:
    if prompt_len >= context_len:
        raise Refused(f"The input ({prompt_len} tokens) is longer than the model's context "
                      f"length ({context_len} tokens).")
    if prompt_len + max_new > context_len:
        raise Refused(
            f"Requested token count exceeds the model's maximum context length of "
            f"{context_len} tokens. You requested a total of {prompt_len + max_new} tokens: "
            f"{prompt_len} tokens from the input messages and {max_new} tokens for the "
            "completion. Please reduce the number of tokens in the input messages or the "
            "completion to fit within the limit.")


def _sampling(per_item: List[Any], vocab_size: int, eos_ids: Sequence[int], tokenizer
              ) -> Sampling:
    for s in per_item:
        if not isinstance(s, dict):
            raise Invalid("sampling_params: expected an object (or one per prompt)")
        unknown = set(s) - SAMPLING_FIELDS
        if unknown:
            raise Invalid(f"sampling_params: unknown field(s) {', '.join(sorted(unknown))}")
        for key, allowed in SAMPLING_NEUTRAL.items():
            if key in s and s[key] not in allowed:
                raise Refused(f"sampling_params.{key}={s[key]!r} is not supported by mgrpo "
                              "serve (only its neutral value)")
    first = {k: v for k, v in per_item[0].items() if k != "sampling_seed"}
    if any({k: v for k, v in s.items() if k != "sampling_seed"} != first for s in per_item):
        raise Refused("mgrpo serve takes one set of sampling parameters per request (only "
                      "sampling_seed may differ between items)")
    s = per_item[0]
    temperature = float(_typed("temperature", s.get("temperature", 1.0), (int, float)))
    top_p = float(_typed("top_p", s.get("top_p", 1.0), (int, float)))
    top_k = _typed("top_k", s.get("top_k", -1), (int,))
    max_new = _typed("max_new_tokens", s.get("max_new_tokens", 128), (int,), allow_none=True)
    max_new = 128 if max_new is None else max_new
    min_new = _typed("min_new_tokens", s.get("min_new_tokens", 0), (int,))
    n = _typed("n", s.get("n", 1), (int,))
    if not math.isfinite(temperature) or temperature < 0:
        raise Refused(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise Refused(f"top_p must be in (0, 1], got {top_p}.")
    if top_k < 1 and top_k != -1:
        raise Refused(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new < 1:
        raise Refused(f"max_new_tokens must be at least 1 here, got {max_new}.")
    if not 0 <= min_new <= max_new:
        raise Refused(f"min_new_tokens must be in [0, max_new_tokens({max_new})], got "
                      f"{min_new}.")
    if n < 1:
        raise Refused(f"n must be at least 1, got {n}.")
    stop = s.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise Invalid("stop: expected a string or a list of non-empty strings")
    if stop and tokenizer is None:
        raise Refused("stop strings need a tokenizer: this model directory has none")
    stop_ids = s.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise Invalid("stop_token_ids: expected a list of token ids")
    # SGLang takes any id; one outside the vocabulary can never be drawn, so never stops.
    stop_ids = [t for t in stop_ids if 0 <= t < vocab_size]
    ignore_eos = _typed("ignore_eos", s.get("ignore_eos", False), (bool,))
    ids = sorted(set(stop_ids) | (set() if ignore_eos else set(eos_ids)))
    seeds = []
    for item in per_item:
        seed = _typed("sampling_seed", item.get("sampling_seed"), (int,), allow_none=True)
        if seed is not None and not -2 ** 63 <= seed < 2 ** 63:
            raise Refused(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
        seeds.append(seed)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                            max_new_tokens=max_new, min_new_tokens=min_new,
                            stop_token_ids=ids)
    return Sampling(params=params, n=n, stop_strings=stop,
                    no_stop_trim=bool(_typed("no_stop_trim", s.get("no_stop_trim", False),
                                             (bool,))),
                    skip_special_tokens=bool(_typed("skip_special_tokens",
                                                    s.get("skip_special_tokens", True),
                                                    (bool,))),
                    seeds=seeds)


def reply_item(c: Completion, rid: str, prompt_len: int, weight_version: str, latency: float,
               req: GenerateRequest, tokenizer, matched_str: Optional[str],
               text: Optional[str] = None) -> Dict[str, Any]:
    """One `/generate` reply item, the fields SGLang 0.5.23 gives (`text`: the caller's
    decoding of the tokens, else the tokenizer's)."""
    skip = req.sampling.skip_special_tokens
    if text is None:
        ids = c.token_ids
        if c.finish_reason == "stop" and matched_str is None and not req.sampling.no_stop_trim:
            ids = ids[:-1]  # SGLang's detokenizer trims the stop token (`trim_matched_stop`)
        text = tokenizer.decode(ids, skip_special_tokens=skip) if tokenizer else ""
    if matched_str is not None and not req.sampling.no_stop_trim:
        text = text[:text.find(matched_str)] if matched_str in text else text
    if c.finish_reason == "stop":
        finish = {"type": "stop", "matched": matched_str if matched_str is not None
                  else c.token_ids[-1]}
    elif c.finish_reason == "length":
        finish = {"type": "length", "length": len(c.token_ids)}
    else:
        finish = {"type": "abort", "message": "Abort in the middle of generation"}
    meta = {"id": rid, "finish_reason": finish, "prompt_tokens": prompt_len,
            "weight_version": weight_version, "completion_tokens": len(c.token_ids),
            "cached_tokens": 0, "e2e_latency": latency}
    if req.return_logprob:
        def tok_text(t):
            return tokenizer.decode([t]) if (tokenizer and req.text_in_logprobs) else None
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[lp, t, tok_text(t)]
                                         for lp, t in zip(c.logprobs, c.token_ids)]
    return {"text": text, "output_ids": list(c.token_ids), "meta_info": meta}
