"""One `mgrpo serve` generation while it runs: each row's tokens as the engine draws them
(`EmbeddedEngine`'s `on_step`), stop strings checked as they complete (the row ends there, as
SGLang's scheduler ends it), and SGLang 0.5.23's reply items: after every token, the row's
cumulative item that SGLang's `/generate` stream sends (`incremental_streaming_output` off:
the text and ids so far, `finish_reason` null, no `e2e_latency`), and once it ends, its final
item, the one a non-streamed reply holds.

Where it differs from SGLang, on purpose: an item's text holds back a tail that may still grow
into a stop string, or that decodes to an incomplete character ("\\ufffd"), so that every
event's text is a prefix of the final text (SGLang's detokenizer can send text that a stop
string then trims away).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from megatron_mgrpo.rollout.base import Completion
from megatron_mgrpo.rollout.server_http import Stream
from megatron_mgrpo.rollout.server_requests import GenerateRequest, Refused, reply_item

Emit = Callable[[int, Dict[str, Any]], None]
"""emit(row, item): a row's cumulative item (rows prompt-major, each prompt's n together)."""


class Rows:
    """The rows of one request as they are generated."""

    def __init__(self, req: GenerateRequest, prompts: Sequence[List[int]], rids: Sequence[str],
                 tokenizer, emit: Optional[Emit] = None):
        self.req, self.prompts, self.rids = req, prompts, rids
        self.tokenizer, self.emit = tokenizer, emit
        self.tokens: List[List[int]] = [[] for _ in rids]
        self.logprobs: List[List[float]] = [[] for _ in rids]
        self.sent = [False] * len(rids)  # final item emitted
        self.matched: List[Optional[str]] = [None] * len(rids)  # the stop string that ended it
        self.stop_ids = set(req.sampling.params.stop_token_ids)
        self.version = ""
        self.start = time.monotonic()

    @property
    def watching(self) -> bool:
        """Whether the engine has to report its steps: a stream, or stop strings to end rows."""
        return self.emit is not None or bool(self.req.sampling.stop_strings)

    def on_step(self, rows: List[int], tokens: List[int], logprobs: List[float],
                ends: List[bool]) -> List[int]:
        """The engine's `StepCallback`: the rows a stop string ends here."""
        stops = self.req.sampling.stop_strings
        ended = []
        for r, token, logprob, end in zip(rows, tokens, logprobs, ends):
            self.tokens[r].append(token)
            self.logprobs[r].append(logprob)
            text = self._text(r) if stops or self.emit is not None else ""
            self.matched[r] = next((s for s in stops if s in text), None)
            if self.matched[r] is not None:
                ended.append(r)
            if self.emit is None:
                continue
            if end or self.matched[r] is not None:
                reason = "stop" if self.matched[r] is not None or token in self.stop_ids \
                    else "length"
                self.finish(r, Completion(list(self.tokens[r]), list(self.logprobs[r]), reason))
            else:
                self.emit(r, self._partial(r, text))
        return ended

    def finish(self, r: int, c: Completion) -> Dict[str, Any]:
        """Row r's final item (emitted once, the first time)."""
        item = reply_item(c, self.rids[r], len(self.prompts[r]), self.version,
                          time.monotonic() - self.start, self.req, self.tokenizer,
                          self.matched[r])
        if self.emit is not None and not self.sent[r]:
            self.sent[r] = True
            self.emit(r, item)
        return item

    def _text(self, r: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(self.tokens[r],
                                     skip_special_tokens=self.req.sampling.skip_special_tokens)

    def _partial(self, r: int, text: str) -> Dict[str, Any]:
        c = Completion(list(self.tokens[r]), list(self.logprobs[r]), "length")
        item = reply_item(c, self.rids[r], len(self.prompts[r]), self.version, 0.0, self.req,
                          self.tokenizer, None,
                          text=settled(text, self.req.sampling.stop_strings))
        meta = item["meta_info"]
        meta["finish_reason"] = None
        del meta["e2e_latency"]
        return item


def settled(text: str, stops: Sequence[str]) -> str:
    """What of a row's text so far can be sent: without a tail that may still grow into a
    stop string, or a character still incomplete."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stops:
        for i in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:i]):
                keep = min(keep, len(text) - i)
                break
    return text[:keep]


def generate_stream(run, req: GenerateRequest, handler, batch: bool) -> Stream:
    """`/generate`'s stream, as SGLang's `generate_request` sends it: each row's item as it
    grows (a batch's with its `index`), an error event for a refusal once started.
    `run(req, handler, emit)`: `EmbeddedServer.run`."""
    def produce(send) -> None:
        try:
            run(req, handler, lambda i, item: send({**item, "index": i} if batch else item))
        except Refused as e:
            send({"error": {"message": str(e), "type": "invalid_request_error", "code": 400,
                            "retryable": False}})
    return Stream(produce)
