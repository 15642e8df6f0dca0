"""SGLang 0.5.23's own HTTP server on a CPU, with the embedded engine in place of its GPU model.

    python -m tests.sglang_harness --model HF_DIR --port PORT     (where `sglang` imports:
                                                                   `make test-sglang`)

SGLang's own code here, unchanged: the FastAPI app (`sglang.srt.entrypoints.http_server.app`:
routes, request parsing and validation, error handlers, reply formats, the OpenAI-compatible
serving classes), `ServerArgs`, `ModelConfig`, the runtime context, the tokenizer manager's
weight-control half (`TokenizerControlMixin` and `TokenizerManager`'s disk update, abort,
pause, version bookkeeping, talking through its real `FanOutCommunicator`s), the scheduler's
`SchedulerWeightUpdaterManager` (the begin/end session and its refusals, the flush after an
update) and the model runner's `WeightUpdater` (`SafeUnpickler` deserialisation, flattened
buckets, verl's `LocalSerializedTensor`, the receive over a `torch.distributed` group, disk
loads through its `DefaultModelLoader`), on SGLang's CUDA torch running on the CPU.

The stub, small and written from the 0.5.23 source: `generate_request` (tokenise, validate
with SGLang's own `SamplingParams.normalize/verify`, run the embedded engine, shape the reply
as `TokenizerManager._handle_batch_output` does; streamed, the cumulative item after every
token, as the detokenizer's outputs reach the real manager, so SGLang's OpenAI streams build
their deltas from real steps; a client gone mid-request aborts its rows, as SGLang's
`_release_req_states_on_failure` does); the "model" under `WeightUpdater`
(`load_weights` hands the tensors to the embedded engine); a scheduler thread that answers the
control requests the way `Scheduler` does (flush only when idle, abort, weight version).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import socket
import threading
import time
import types
import uuid
from contextlib import asynccontextmanager
from typing import Any, Dict, List

import torch

from megatron_mgrpo.rollout.base import SamplingParams as EngineParams
from megatron_mgrpo.rollout.embedded import EmbeddedEngine

MODEL = "policy"
_WAIT_S = 4.0
"""How often a waiting request asks whether its client is still there
(SGLANG_REQUEST_STATE_WAIT_TIMEOUT's default)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(model_dir: str, port: int):
    """SGLang's app, its global state set as `launch_server` would, around the stubs."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.entrypoints import http_server
    from sglang.srt.parser.template_manager import TemplateManager
    from sglang.srt.runtime_context import get_parallel, publish
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=model_dir, device="cpu", host="127.0.0.1", port=port,
                      skip_server_warmup=True)
    publish(args, role="tokenizer")
    # WeightUpdater and the weight-update manager barrier on the TP group and read the rank.
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                         rank=0, world_size=1)
    group = torch.distributed.new_group([0], backend="gloo")
    get_parallel().override_permanently(tp_rank=0,
                                        tp_group=types.SimpleNamespace(cpu_group=group))
    if not torch.cuda.is_available():
        # The memory release synchronises "the" device; SGLang's CUDA torch means CUDA by it.
        device_module = torch.get_device_module
        torch.get_device_module = lambda device=None: (
            torch.cpu if device is None else device_module(device))
    engine = EmbeddedEngine.from_pretrained(model_dir, sets=(MODEL,))
    manager = Manager(args, ModelConfig.from_server_args(args), engine)
    templates = TemplateManager()
    templates.initialize_templates(tokenizer_manager=manager, model_path=model_dir)
    http_server.set_global_state(http_server._GlobalState(
        tokenizer_manager=manager, template_manager=templates, scheduler_info={}))
    app = http_server.app

    @asynccontextmanager
    async def lifespan(fast_api_app):
        # launch_server's lifespan, less the warm-up thread, gRPC, tracing and tool servers.
        from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
        from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

        manager.loop = asyncio.get_running_loop()
        fast_api_app.state.openai_serving_completion = OpenAIServingCompletion(manager, templates)
        fast_api_app.state.openai_serving_chat = OpenAIServingChat(manager, templates)
        yield

    app.router.lifespan_context = lifespan
    return app, manager


# ---- the tokenizer manager: SGLang's control half, a stub generation half -----------------------

def _manager_class():
    from sglang.srt.utils.aio_rwlock import RWLock
    from sglang.srt.managers.tokenizer_control_mixin import TokenizerControlMixin
    from sglang.srt.managers.tokenizer_manager import ServerStatus, TokenizerManager
    from sglang.srt.utils.hf_transformers.tokenizer import get_tokenizer
    from sglang.srt.utils.request_logger import RequestLogger
    from sglang.utils import TypeBasedDispatcher

    borrowed = ("config_value", "record_config_updates", "resolved_config_dict",
                "update_weights_from_disk", "_wait_for_model_update_from_disk",
                "_update_model_path_info", "abort_request", "create_abort_task",
                "pause_generation", "continue_generation", "is_healthy", "is_ready",
                "set_startup_time")

    class _Manager(TokenizerControlMixin):
        locals().update({name: getattr(TokenizerManager, name) for name in borrowed
                         if hasattr(TokenizerManager, name)})

        def __init__(self, server_args, model_config, engine):
            self.server_args = server_args
            self.model_config = model_config
            self.model_path = server_args.model_path
            self.served_model_name = server_args.served_model_name
            self.is_generation = True
            self.tokenizer = get_tokenizer(server_args.tokenizer_path or server_args.model_path)
            self.processor = None
            self.mm_processor = None
            self.skip_tokenizer_init = False
            self.enable_metrics = False
            self.gracefully_exit = False
            self.server_status = ServerStatus.Up
            self.startup_time = time.time()
            self.last_receive_tstamp = 0.0
            self.rid_to_state: Dict[str, Any] = {}
            self.elastic_worker_count = 1
            self.is_pause = False
            self.is_pause_cond = asyncio.Condition()
            self.model_update_lock = RWLock()
            self.context_len = model_config.context_len
            self.max_req_input_len = None
            self.lora_registry = None
            self.served_model_name = self.served_model_name or self.model_path
            self._result_dispatcher = TypeBasedDispatcher([])
            self.loop = None
            self.request_logger = RequestLogger(log_requests=False, log_requests_level=0,
                                                log_requests_format="text",
                                                log_requests_target=None)
            self.scheduler = Scheduler(engine, self)
            self.init_communicators()

        def auto_create_handle_loop(self) -> None:
            """The real one starts the loop reading the scheduler's ZMQ replies: `_receive`."""

        # The real manager sends these over ZMQ to the scheduler process; here a thread.
        def _dispatch_to_scheduler(self, obj) -> None:
            self.scheduler.inbox.put(obj)

        async def _async_dispatch_to_scheduler(self, obj) -> None:
            self._dispatch_to_scheduler(obj)

        def _receive(self, out) -> None:
            from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqOutput

            self.last_receive_tstamp = time.time()
            if isinstance(out, UpdateWeightFromDiskReqOutput):
                self.model_update_result.set_result(out)
            elif out is not None:
                self._result_dispatcher(out)

        async def generate_request(self, obj, request=None):
            """The rows' replies as `TokenizerManager.generate_request` yields them: one
            (a list for a batch) when done, or, streamed, each row's cumulative item after
            every token and its final item when it ends (a batch's with its `index`)."""
            from sglang.srt.sampling.sampling_params import SamplingParams

            obj.normalize_batch_and_arguments()
            single = obj.is_single
            rids = [obj.rid] if single else list(obj.rid)
            texts = [obj.text] if single else obj.text
            ids = [obj.input_ids] if single else obj.input_ids
            sps = [obj.sampling_params] if single else obj.sampling_params
            for rid in rids:
                self.rid_to_state[rid] = types.SimpleNamespace(abort_sent=False, obj=obj)
            finished = False
            try:
                async with self.is_pause_cond:
                    await self.is_pause_cond.wait_for(lambda: not self.is_pause)
                async with self.model_update_lock.reader_lock:
                    items = []
                    for i, rid in enumerate(rids):
                        prompt = ids[i] if ids is not None and ids[i] is not None else \
                            self.tokenizer.encode(texts[i])
                        sp = SamplingParams(**(sps[i] or {}))
                        sp.normalize(self.tokenizer)
                        sp.verify(self.model_config.vocab_size)
                        self._validate(prompt, sp)
                        _refuse_what_the_engine_lacks(sp)
                        items.append((rid, list(prompt), sp))
                    start = time.time()
                    # The scheduler thread posts each event into this loop, as the
                    # detokenizer's outputs reach the real manager's `handle_loop`.
                    loop, events = asyncio.get_running_loop(), asyncio.Queue()

                    def post(*event):
                        loop.call_soon_threadsafe(events.put_nowait, event)

                    def run():
                        try:
                            post("done", self.scheduler.generate(
                                items, on_token=(lambda *a: post("token", *a))
                                if obj.stream else None,
                                on_row=(lambda *a: post("row", *a)) if obj.stream else None))
                        except BaseException as e:  # noqa: BLE001 - raised in the loop below
                            post("error", e)

                    loop.run_in_executor(None, run)
                    while True:
                        try:
                            kind, *event = await asyncio.wait_for(events.get(), _WAIT_S)
                        except asyncio.TimeoutError:  # _stream_one_response's check
                            if request is not None and not obj.background and \
                                    await request.is_disconnected():
                                raise ValueError("Request is disconnected from the client "
                                                 f"side. Abort request {obj.rid=}") from None
                            continue
                        if kind == "error":
                            raise event[0]
                        self.last_receive_tstamp = time.time()
                        if kind == "done":
                            finished = True
                            if not obj.stream:
                                outs = [self._reply(rid, prompt, sp, c, matched, obj, start)
                                        for (rid, prompt, sp), (c, matched)
                                        in zip(items, event[0])]
                                yield outs[0] if single else outs
                            break
                        k, rid, prompt, sp = (event[0], *items[event[0]])
                        if kind == "token":  # (k, ids, logprobs): not the row's last
                            c = types.SimpleNamespace(token_ids=event[1], logprobs=event[2],
                                                      finish_reason="length")
                            out = self._reply(rid, prompt, sp, c, None, obj, start)
                            out["meta_info"]["finish_reason"] = None
                        else:  # "row" (k, completion, matched): its final item
                            out = self._reply(rid, prompt, sp, event[1], event[2], obj, start)
                        yield out if single else {**out, "index": k}
            finally:
                if not finished:  # the client left (or a refusal): SGLang aborts its rows
                    for rid in rids:
                        if rid in self.rid_to_state:
                            self.abort_request(rid)
                for rid in rids:
                    self.rid_to_state.pop(rid, None)

        def _validate(self, prompt: List[int], sp) -> None:
            # TokenizerManager._validate_one_request's checks and wording.
            n = len(prompt)
            if n >= self.context_len:
                raise ValueError(f"The input ({n} tokens) is longer than the model's context "
                                 f"length ({self.context_len} tokens).")
            if sp.max_new_tokens is not None and n + sp.max_new_tokens > self.context_len:
                raise ValueError(
                    f"Requested token count exceeds the model's maximum context length of "
                    f"{self.context_len} tokens. You requested a total of "
                    f"{n + sp.max_new_tokens} tokens: {n} tokens from the input messages and "
                    f"{sp.max_new_tokens} tokens for the completion. Please reduce the number "
                    f"of tokens in the input messages or the completion to fit within the "
                    f"limit.")

        def _reply(self, rid, prompt, sp, c, matched, obj, start) -> Dict[str, Any]:
            ids = list(c.token_ids)
            if c.finish_reason == "length":
                finish = {"type": "length", "length": len(ids)}
            elif c.finish_reason == "abort":
                finish = {"type": "abort", "message": "Abort before prefill"}
            else:
                finish = {"type": "stop", "matched": matched if matched is not None
                          else ids[-1]}
            if finish["type"] == "stop" and not sp.no_stop_trim and matched is None:
                ids_text = ids[:-1]  # the detokenizer trims a matched stop token
            else:
                ids_text = ids
            meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                    "weight_version": self.config_value("weight_version"),
                    "num_retractions": 0, "reasoning_tokens": 0,
                    "completion_tokens": len(c.token_ids), "cached_tokens": 0,
                    "e2e_latency": time.time() - start}
            if obj.return_logprob:
                meta["output_token_logprobs"] = [(lp, t, None)
                                                 for lp, t in zip(c.logprobs, c.token_ids)]
            text = self.tokenizer.decode(ids_text, skip_special_tokens=sp.skip_special_tokens)
            if matched is not None and matched in text:  # DetokenizerManager.trim_matched_stop
                pos = text.find(matched)
                text = text[:pos + len(matched)] if sp.no_stop_trim else text[:pos]
            return {"text": text, "output_ids": ids, "meta_info": meta}

    return _Manager


_NEUTRAL = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "repetition_penalty": 1.0, "logit_bias": None, "json_schema": None, "regex": None,
            "ebnf": None, "structural_tag": None, "stop_regex_strs": []}


def _refuse_what_the_engine_lacks(sp) -> None:
    """SGLang applies these; the embedded engine does not, so the stub says so (a 400) rather
    than answer as if it had."""
    for name, neutral in _NEUTRAL.items():
        if getattr(sp, name, neutral) not in (neutral, None):
            raise ValueError(f"the harness's engine does not apply {name}")


def Manager(*args):
    return _manager_class()(*args)


# ---- the scheduler: SGLang's weight-update manager, a thread in place of the process --------

class _Row:
    """A row's stop strings, checked after every token as SGLang's scheduler does
    (`Req.check_finished`: the decoded tail of the output ends with one)."""

    def __init__(self, tokenizer, stops: List[str], heard, on_token=None):
        self.tokenizer, self.stops, self.heard, self.on_token = tokenizer, stops, heard, on_token
        self.ids: List[int] = []
        self.logprobs: List[float] = []
        self.matched = None

    def step(self, rows, tokens, logprobs, ends):
        self.heard()
        self.ids.append(tokens[0])
        self.logprobs.append(logprobs[0])
        if self.stops and not ends[0]:
            tail = self.tokenizer.decode(self.ids[-max(len(s) for s in self.stops) - 8:])
            self.matched = next((s for s in self.stops if s in tail), None)
        if self.on_token is not None and not ends[0] and self.matched is None:
            self.on_token(list(self.ids), list(self.logprobs))  # the row goes on
        return () if self.matched is None else (0,)


class _Model(torch.nn.Module):
    """What WeightUpdater loads into: the embedded engine's weight set, by HF names."""

    def __init__(self, engine: EmbeddedEngine):
        super().__init__()
        self.engine = engine

    def load_weights(self, weights):
        self.engine.load_tensors(MODEL, [(n, t.detach().to("cpu")) for n, t in weights])


class _MemorySaver:
    def __init__(self):
        self.paused = set()

    def pause(self, tag):
        self.paused.add(tag)

    def resume(self, tag):
        self.paused.discard(tag)


class Scheduler:
    def __init__(self, engine: EmbeddedEngine, manager):
        from sglang.srt.disaggregation.utils import DisaggregationMode
        from sglang.srt.managers.scheduler_components.weight_updater import (
            SchedulerWeightUpdaterManager)
        from sglang.srt.managers.tp_worker import TpModelWorker
        from sglang.srt.model_executor.model_runner_components.weight_updater import (
            WeightUpdater)

        self.engine, self.manager = engine, manager
        self.disaggregation_mode = DisaggregationMode.NULL
        self._engine_paused = False
        self.inbox: "queue.Queue[Any]" = queue.Queue()
        self.lock = threading.Lock()  # a generation or a weight load at a time
        self.running: Dict[str, threading.Event] = {}
        self.saver = _MemorySaver()
        runner = types.SimpleNamespace(model=_Model(engine))
        runner.weight_updater = WeightUpdater(
            tp_rank=0, device="cpu", gpu_id=0, model_config=manager.model_config,
            custom_weight_loaders={}, get_model=lambda: runner.model,
            update_model_fields=lambda *a, **k: None, recapture_cuda_graph=lambda: None,
            get_model_runner=lambda: runner)
        worker = types.SimpleNamespace(model_runner=runner, _model_runner=runner)
        for name in ("deserialize_own_rank", "init_weights_update_group",
                     "destroy_weights_update_group", "weight_update_runners"):
            setattr(worker, name, types.MethodType(getattr(TpModelWorker, name), worker))
        self.weights = SchedulerWeightUpdaterManager(
            tp_worker=worker, draft_worker=None, memory_saver_adapter=self.saver,
            flush_cache=self.flush_cache, is_fully_idle=self.is_fully_idle, scheduler=self)
        threading.Thread(target=self._loop, daemon=True, name="scheduler").start()

    def _heard(self) -> None:
        """A token was produced: what the detokenizer's stream tells the manager (its
        /health_generate passes on any output while a request runs)."""
        self.manager.last_receive_tstamp = time.time()

    def is_fully_idle(self, ignore_waiting: bool = False) -> bool:
        return not self.running

    def flush_cache(self, empty_cache: bool = True) -> bool:
        return self.is_fully_idle()

    def record_weight_version_change(self, new_version) -> None:
        from sglang.srt.runtime_context import get_context

        if new_version is not None:
            get_context().override("scheduler.weight_version", weight_version=new_version)

    def generate(self, items, on_token=None, on_row=None) -> list:
        """Each item's (completion, matched stop string), generated in turn;
        `on_token(k, ids, logprobs)` after each of item k's tokens but its last,
        `on_row(k, completion, matched)` once it ends."""
        from sglang.srt.constants import GPU_MEMORY_TYPE_WEIGHTS

        cancel = threading.Event()
        for rid, _, _ in items:
            self.running[rid] = cancel
        try:
            with self.lock:
                if GPU_MEMORY_TYPE_WEIGHTS in self.saver.paused:
                    raise ValueError("the weights are released")
                out = []
                # Req.check_finished: the model's EOS ids and the tokenizer's; one the model
                # cannot draw (this tokenizer's added <|endoftext|>) never ends anything.
                vocab = self.manager.model_config.vocab_size
                eos_ids = set(self.manager.model_config.hf_eos_token_id or ())
                eos_ids.add(self.manager.tokenizer.eos_token_id)
                eos_ids = {int(t) for t in eos_ids if t is not None and 0 <= t < vocab}
                for k, (rid, prompt, sp) in enumerate(items):
                    stops = set(sp.stop_token_ids or ())
                    if not sp.ignore_eos:
                        stops |= eos_ids
                    params = EngineParams(
                        temperature=sp.temperature, top_p=sp.top_p,
                        top_k=-1 if sp.top_k >= 1 << 30 else sp.top_k,
                        max_new_tokens=sp.max_new_tokens, min_new_tokens=sp.min_new_tokens,
                        stop_token_ids=sorted(stops))
                    row = _Row(self.manager.tokenizer, list(sp.stop_strs or ()), self._heard,
                               None if on_token is None else
                               lambda ids, lps, k=k: on_token(k, ids, lps))
                    c = self.engine.generate_rows([prompt], [sp.sampling_seed], params, MODEL,
                                                  should_stop=cancel.is_set,
                                                  on_step=row.step)[0]
                    out.append((c, row.matched))
                    if on_row is not None:
                        on_row(k, c, row.matched)
                return out
        finally:
            for rid, _, _ in items:
                self.running.pop(rid, None)

    def _loop(self) -> None:
        while True:
            req = self.inbox.get()
            try:
                out = self._handle(req)
            except BaseException as e:  # noqa: BLE001 - as SGLang's scheduler process dies
                print(f"harness scheduler: {type(req).__name__}: {e!r}; exiting", flush=True)
                os._exit(1)
            self.manager.loop.call_soon_threadsafe(self.manager._receive, out)

    def _handle(self, req):
        from sglang.srt.managers import io_struct as io

        w = self.weights
        if isinstance(req, io.AbortReq):
            for rid, cancel in list(self.running.items()):
                if req.abort_all or rid == req.rid:
                    cancel.set()
            return None
        if isinstance(req, io.FlushCacheReqInput):
            return io.FlushCacheReqOutput(success=self.flush_cache())
        if isinstance(req, io.UpdateWeightVersionReqInput):
            self.record_weight_version_change(req.new_version)
            return io.UpdateWeightVersionReqOutput()
        if isinstance(req, io.GetInternalStateReq):
            from sglang.srt.runtime_context import get_context
            state = get_context().resolved_server_args_dict()
            return io.GetInternalStateReqOutput(internal_state=state)
        if isinstance(req, (io.PauseGenerationReqInput, io.ContinueGenerationReqInput)):
            return None
        handlers = {io.BeginWeightUpdateReqInput: w.begin_weight_update,
                    io.EndWeightUpdateReqInput: w.end_weight_update,
                    io.UpdateWeightsFromTensorReqInput: w.update_weights_from_tensor,
                    io.UpdateWeightsFromDistributedReqInput: w.update_weights_from_distributed,
                    io.UpdateWeightFromDiskReqInput: w.update_weights_from_disk,
                    io.InitWeightsUpdateGroupReqInput: w.init_weights_update_group,
                    io.DestroyWeightsUpdateGroupReqInput: w.destroy_weights_update_group,
                    io.ReleaseMemoryOccupationReqInput: w.release_memory_occupation,
                    io.ResumeMemoryOccupationReqInput: w.resume_memory_occupation}
        handler = handlers.get(type(req))
        if handler is None:
            raise NotImplementedError(f"the harness does not handle {type(req).__name__}")
        with self.lock:
            return handler(req)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=30000)
    a = p.parse_args()
    app, _ = build(a.model, a.port)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", timeout_keep_alive=5)


if __name__ == "__main__":
    main()
