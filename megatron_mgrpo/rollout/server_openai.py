"""`mgrpo serve`'s OpenAI-compatible API, as SGLang 0.5.23 serves it (`sglang.srt.entrypoints.
openai`: `protocol.py`, `serving_completions.py`, `serving_chat.py`, `serving_base.py`):

    GET /v1/models, POST /v1/completions, POST /v1/chat/completions

A request becomes a `/generate` one, as SGLang's `_convert_to_internal_request` makes it, and
runs as one (`EmbeddedServer.run`); replies and stream chunks are built from the `/generate`
items as SGLang builds them: `id` is the request id, `model` echoes the request's, `metadata`
has the weight version; a completion stream sends one chunk per token with the text delta (the
finish reason on a row's last); a chat stream sends the role first, then content deltas, then
one finish chunk per choice once all are done; `stream_options.include_usage` adds a usage chunk
before `data: [DONE]`. Chat prompts are the messages through the tokenizer's chat template
(`add_generation_prompt`; a last assistant message becomes a user one, or with
`continue_final_message` the start of the reply), and temperature, top_p and top_k the request
leaves out come from the model's generation_config.json, as SGLang's do.

Every field of SGLang's `CompletionRequest` / `ChatCompletionRequest` is honoured, has no
effect on one model served one batch at a time (user, priority, extra_key, cache_salt,
custom_labels, parallel_tool_calls, separate_reasoning, stream_reasoning), or is refused
with 400 away from its neutral value (`NEUTRAL`: log-probs, penalties, tools, constrained
output, echo, best_of, suffix, LoRA, sessions, images). Fields SGLang does not know are
ignored, as its pydantic models ignore them. Errors have SGLang's `ErrorResponse` shape: a
malformed body `"type": "Bad Request"`, a refused one `"type": "BadRequestError"`; once a
stream has started, an event `{"error": ErrorResponse}`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Tuple

from megatron_mgrpo.rollout.server_http import Reply, Stream, body_field, json_object
from megatron_mgrpo.rollout.server_requests import (GenerateRequest, Invalid, Refused,
                                                    parse_generate)

_COMMON = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": (None, {}),
           "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "regex": (None,),
           "ebnf": (None,), "stop_regex": (None, "", []), "response_format": (
               None, {"type": "text"}), "lora_path": (None,), "session_id": (None,),
           "session_params": (None,), "custom_params": (None,),
           "custom_logit_processor": (None,), "watermark": (None,), "images_config": (None,),
           "mm_processor_kwargs": (None,), "return_hidden_states": (False,),
           "return_routed_experts": (False,), "return_cached_tokens_details": (False,),
           "return_spec_tokens_details": (False,), "return_token_ids": (False,),
           "bootstrap_host": (None,), "bootstrap_port": (None,), "bootstrap_room": (None,),
           "routed_dp_rank": (None, 0), "data_parallel_rank": (None, 0),
           "disagg_prefill_dp_rank": (None,)}
NEUTRAL = {
    "/v1/completions": {**_COMMON, "best_of": (None, 1), "echo": (False,), "logprobs": (None,),
                        "suffix": (None, ""), "json_schema": (None,)},
    "/v1/chat/completions": {
        **_COMMON, "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
        "tool_choice": (None, "none", "auto"), "reasoning_effort": (None,), "thinking": (None,),
        "task": (None,), "return_prompt_token_ids": (False,), "return_meta_info": (False,),
        "return_input_ids_in_sglext": (False,), "return_output_ids_in_sglext": (False,),
        "return_sampling_mask": (False,), "sampling_logprobs_mode": (None,),
        "return_flat_raw_output_top_logprobs": (False,), "max_dynamic_patch": (None,),
        "min_dynamic_patch": (None,), "use_audio_in_video": (False,), "video_config": (None,)}}
"""Per route, the request fields accepted only at these values (this server does not do the
rest)."""

GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""What SGLang's chat takes from the model's generation_config.json when a request leaves
it out (`ModelConfig.get_default_sampling_params`)."""


def error_body(message: str, kind: str = "BadRequestError", code: int = 400) -> dict:
    """SGLang's `ErrorResponse`."""
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


def openai_routes(server) -> Dict[Tuple[str, str], Any]:
    api = OpenAIServing(server)
    return {("GET", "/v1/models"): api.models,
            ("POST", "/v1/completions"): api.refusing(api.completions),
            ("POST", "/v1/chat/completions"): api.refusing(api.chat)}


class OpenAIServing:
    """The three routes over an `EmbeddedServer` (its tokenizer, limits and `run`)."""

    def __init__(self, server):
        self.server = server
        self.generation_defaults = _generation_defaults(server.model_path)

    def refusing(self, route):
        """`route` with its refusals in SGLang's OpenAI error shape."""
        def wrapped(body, handler):
            try:
                return route(body, handler)
            except Refused as e:
                raise Reply(400, error_body(str(e))) from None
        return wrapped

    def models(self, body, handler) -> dict:
        name = self.server.model_path
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": name, "parent": None, "max_model_len": self.server.context_len}]}

    # ---- /v1/completions ------------------------------------------------------------------

    def completions(self, body, handler) -> Any:
        body = self._body(body, handler, "/v1/completions")
        prompt = body.get("prompt")
        if prompt is None:
            raise Invalid("prompt: field required")
        if not prompt or (isinstance(prompt, list) and all(
                isinstance(p, (str, list)) and not p for p in prompt)):
            raise Refused("Prompt cannot be empty")
        texts = isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(p, str) for p in prompt))
        max_tokens = body_field(body, "max_tokens", (int,), 16)
        if max_tokens <= 0:
            raise Invalid("max_tokens must be positive")
        req = self._request(body, {"text" if texts else "input_ids": prompt},
                            self._sampling(body, max_tokens, {}))
        return self._answer(req, body, handler, chat=False)

    # ---- /v1/chat/completions -------------------------------------------------------------

    def chat(self, body, handler) -> Any:
        body = self._body(body, handler, "/v1/chat/completions")
        prompt = self._chat_prompt(body)
        max_new = body_field(body, "max_completion_tokens", (int,), None) or body_field(
            body, "max_tokens", (int,), None)
        # Too many is refused as /generate refuses it: SGLang's chat has a check of its own
        # only for a --context-length given at launch, which mgrpo serve does not take.
        if max_new is None:  # SGLang's scheduler: what the context leaves
            max_new = max(1, self.server.context_len - len(prompt) - 2)
        req = self._request(body, {"input_ids": prompt},
                            self._sampling(body, max_new, self.generation_defaults))
        return self._answer(req, body, handler, chat=True)

    def _chat_prompt(self, body: dict) -> List[int]:
        ids = body.get("input_ids")
        if ids is not None:  # SGLang: given token ids bypass the template
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise Invalid("input_ids: expected a list of token ids")
            return ids
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise Invalid("messages: field required (a list of messages)")
        if not messages:
            raise Refused("Messages cannot be empty.")
        messages = [_message(m) for m in messages]
        prefix = None
        if messages[-1]["role"] == "assistant":
            if body_field(body, "continue_final_message", (bool,), False):
                prefix = messages.pop()["content"]
            else:
                messages[-1] = {"role": "user", "content": messages[-1]["content"]}
        kwargs = body_field(body, "chat_template_kwargs", (dict,), {})
        if "chat_template" in kwargs:
            raise Refused("Request-supplied chat_template is not allowed. Start the server "
                          "with --trust-request-chat-template to permit it.")
        tok = self.server.tokenizer
        if not getattr(tok, "chat_template", None):
            raise Refused("this model's tokenizer has no chat template: use /v1/completions")
        try:
            text = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - a template's own refusal is the client's
            raise Refused(f"the chat template refused the messages: {e}") from None
        ids = list(tok.encode(text, add_special_tokens=False))
        if prefix:
            ids += tok.encode(prefix, add_special_tokens=False)
        return ids

    # ---- shared ---------------------------------------------------------------------------

    def _body(self, body, handler, route: str) -> dict:
        if self.server.tokenizer is None:
            raise Refused(f"{route} needs the model's tokenizer, and this model directory "
                          "has none: use /generate with input_ids")
        media = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media != "application/json":
            raise Invalid("Unsupported Media Type: Only 'application/json' is allowed")
        body = json_object(body)
        for key, allowed in NEUTRAL[route].items():
            if key in body and body[key] not in allowed:
                raise Refused(f"{key}={body[key]!r} is not supported by mgrpo serve "
                              f"(only {' or '.join(map(json.dumps, allowed))})")
        return body

    def _sampling(self, body: dict, max_new: int, defaults: dict) -> dict:
        """The `/generate` sampling_params of a request (SGLang's `_build_sampling_params`,
        `to_sampling_params`)."""
        for key, neutral in (("min_p", 0.0), ("repetition_penalty", 1.0)):
            if body.get(key) is None and defaults.get(key, neutral) != neutral:
                raise Refused(f"the model's generation_config.json sets {key}="
                              f"{defaults[key]}, which mgrpo serve does not apply: send "
                              f"{key}: {neutral} to sample without it")

        def value(key, kinds, default):
            return body_field(body, key, kinds, defaults.get(key, default))

        return {"temperature": value("temperature", (int, float), 1.0),
                "top_p": value("top_p", (int, float), 1.0),
                "top_k": value("top_k", (int,), -1), "max_new_tokens": max_new,
                "min_new_tokens": body_field(body, "min_tokens", (int,), 0),
                "n": body_field(body, "n", (int,), 1), "stop": body.get("stop"),
                "stop_token_ids": body.get("stop_token_ids"),
                "no_stop_trim": body_field(body, "no_stop_trim", (bool,), False),
                "ignore_eos": body_field(body, "ignore_eos", (bool,), False),
                "skip_special_tokens": body_field(body, "skip_special_tokens", (bool,), True),
                "sampling_seed": body_field(body, "seed", (int,), None)}

    def _request(self, body: dict, prompt: dict, sampling: dict) -> GenerateRequest:
        s = self.server
        s.refuse_if_released()  # before a stream starts: a 400, not an event
        return parse_generate({**prompt, "sampling_params": sampling, "rid": body.get("rid"),
                               "stream": body_field(body, "stream", (bool,), False)},
                              s.tokenizer, s.engine.config.vocab_size, s.context_len,
                              s.eos_ids)

    def _answer(self, req: GenerateRequest, body: dict, handler, chat: bool) -> Any:
        """The reply (SGLang's `_build_completion_response` / `_build_chat_response`), or
        the stream."""
        model = body_field(body, "model", (str,), "default")
        if req.stream:
            options = body_field(body, "stream_options", (dict,), {})
            usage = (body_field(options, "include_usage", (bool,), False),
                     body_field(options, "continuous_usage_stats", (bool,), False))
            return Stream(lambda send: self._stream(send, req, handler, model, chat, *usage))
        items = self.server.run(req, handler)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": it["text"],
                                                "reasoning_content": None},
                        "logprobs": None, **_finish(it)} for i, it in enumerate(items)]
        else:
            choices = [{"index": i, "text": it["text"], "logprobs": None, **_finish(it)}
                       for i, it in enumerate(items)]
        meta = items[0]["meta_info"]
        return {"id": meta["id"], "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": choices,
                "usage": _usage(items, req.sampling.n),
                "metadata": {"weight_version": meta["weight_version"]}}

    def _stream(self, send, req: GenerateRequest, handler, model: str, chat: bool,
                usage_at_end: bool, usage_each: bool) -> None:
        """A completion or chat stream, as SGLang's `_generate_completion_stream` /
        `_generate_chat_stream` send it (`stream_options`: a usage chunk at the end, usage
        in every chunk)."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        created, offsets, finished = int(time.time()), {}, {}

        def chunk(rid, choices, usage=None) -> dict:
            out = {"id": rid, "object": kind, "created": created, "model": model,
                   "choices": choices}
            if usage is not None or not chat:  # a chat chunk leaves out a null usage
                out["usage"] = usage
            return out

        def on_item(i: int, item: dict) -> None:
            meta, text = item["meta_info"], item["text"]
            delta = text[offsets.get(i, 0):]
            usage = _usage([item], 1) if usage_each else None
            if not chat:
                send(chunk(meta["id"], [{"index": i, "text": delta, "logprobs": None,
                                         **_finish(item)}], usage))
            else:
                if i not in offsets:
                    send(chunk(meta["id"], [_delta(i, role="assistant", content="")]))
                if delta:
                    send(chunk(meta["id"], [_delta(i, content=delta)], usage))
                if meta["finish_reason"] is not None:
                    finished[i] = (meta["id"], item)
            offsets[i] = len(text)

        try:
            items = self.server.run(req, handler, emit=on_item)
        except Refused as e:
            send({"error": error_body(str(e))})
            return
        for i, (rid, item) in finished.items():
            send(chunk(rid, [{**_delta(i), **_finish(item)}]))
        if usage_at_end:
            usage = _usage(items, req.sampling.n)
            if not chat:  # sent with exclude_none
                usage = {k: v for k, v in usage.items() if v is not None}
            send(chunk(items[0]["meta_info"]["id"], [], usage))


def _message(m: Any) -> dict:
    """A chat message as SGLang gives it to a text-only template: text parts joined, null
    content empty, null fields left out."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Invalid("messages: each message must be an object with a role (a string)")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in ("text", "input_text")
                   and isinstance(p.get("text"), str) for p in content):
            raise Refused("mgrpo serve takes text content parts only (this model takes no "
                          "images, audio or video)")
        content = " ".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        raise Invalid("messages: content must be a string or a list of content parts")
    return {**{k: v for k, v in m.items() if v is not None}, "content": content or ""}


def _finish(item: dict) -> dict:
    fin = item["meta_info"]["finish_reason"]
    return {"finish_reason": fin["type"] if fin else None,
            "matched_stop": fin.get("matched") if fin else None}


def _delta(i: int, **delta) -> dict:
    return {"index": i, "delta": {"reasoning_content": None, **delta}, "logprobs": None,
            "finish_reason": None, "matched_stop": None}


def _usage(items: List[dict], n: int) -> dict:
    """SGLang's `UsageInfo`: each prompt counted once, every choice's completion."""
    prompt = sum(items[i]["meta_info"]["prompt_tokens"] for i in range(0, len(items), n))
    completion = sum(it["meta_info"]["completion_tokens"] for it in items)
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None,
            "reasoning_tokens": 0, "completion_tokens_details": None}


def _generation_defaults(model_path: str) -> dict:
    path = os.path.join(model_path or "", "generation_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}
