"""SGLang 0.5.23's HTTP contract, asserted against `mgrpo serve` (`EmbeddedServer`), and what
the client does with it.

The assertions take a base URL (`target`), so that the same ones can run against SGLang's own
FastAPI app where it can be served (see docs/sglang.md); here the target is `mgrpo serve`.
Facts of 0.5.23 they encode, from its `entrypoints/http_server.py`,
`managers/scheduler_components/weight_updater.py` and `managers/io_struct.py`: the weight
version is in `/model_info`, `/get_weight_version` is gone (404); `/server_info` has
`version`; tensor and distributed loads are refused (400, `success: false`) outside
`/begin_weight_update` ... `/end_weight_update`; `/flush_cache` answers text, 400 while
requests run; malformed bodies are 400 (never 500); `/update_weight_version {}` is a 400.
"""

import base64
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.models.architecture import hf_config_dict
from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import RolloutError, SamplingParams
from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from megatron_mgrpo.rollout.server import EmbeddedServer
from megatron_mgrpo.rollout.servers import Server, ServerError
from megatron_mgrpo.rollout.sglang_engine import SGLangEngine
from megatron_mgrpo.rollout.transports import make_transport
from tests.test_hf_reference import hf_model
from tests import DEADLOCK_GUARD_S
from tests.serve_targets import CHARS, KW, build_model_dir, serve_only, start_target

CFG = hf_config_dict(ModelConfig(**KW))


def http(url, path, body=None, method=None, timeout=60.0, raw=None):
    """(status, parsed JSON or text, content type) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or (
        "GET" if data is None else "POST"), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    try:
        return status, json.loads(payload) if payload else None, kind
    except json.JSONDecodeError:
        return status, payload.decode(), kind


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 with a one-character-per-token tokenizer (for text prompts and stops)."""
    return build_model_dir(str(tmp_path_factory.mktemp("contract_model")))


@pytest.fixture(scope="module", params=["serve", "sglang"])
def target(request, model_dir):
    t = start_target(request.param, model_dir)
    yield t
    t.stop()


def gen(url, prompt, **sampling):
    return http(url, "/generate", {"input_ids": prompt, "sampling_params": sampling,
                                   "return_logprob": True})


# ---- routes and reply formats -----------------------------------------------------------------

def test_info_routes_and_reply_formats(target):
    url = target.url
    status, body, _ = http(url, "/health")
    assert status == 200 and body is None
    status, info, _ = http(url, "/model_info")
    assert status == 200 and {"model_path", "weight_version", "is_generation",
                              "tokenizer_path"} <= set(info)
    status, info, _ = http(url, "/server_info")
    assert status == 200 and protocol.parse_version(info["version"]) >= (0, 5, 23)
    assert http(url, "/get_weight_version")[:2] == (404, {"detail": "Not Found"})
    assert http(url, "/generate", method="GET")[0] == 405
    status, text, kind = http(url, "/flush_cache", {})
    assert status == 200 and text.startswith("Cache flushed.") and "json" not in kind


def test_generate_reply_has_sglang_meta_info(target):
    status, item, _ = gen(target.url, [1, 2, 3], max_new_tokens=4, temperature=0.0)
    assert status == 200
    meta = item["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
            "e2e_latency", "weight_version", "output_token_logprobs"} <= set(meta)
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert [p[1] for p in meta["output_token_logprobs"]] == item["output_ids"]
    # Text in, text out through the model's tokenizer; a batch answers a list.
    status, items, _ = http(target.url, "/generate", {
        "text": ["abc", "12"], "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert status == 200 and len(items) == 2 and all(len(i["text"]) == 3 for i in items)
    # stream: server-sent events ending in [DONE]
    status, text, kind = http(target.url, "/generate", {
        "input_ids": [1, 2], "stream": True, "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and kind.startswith("text/event-stream")
    assert text.startswith("data: {") and text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("path,body", [
    ("/generate", [1, 2]), ("/generate", {"input_ids": "abc"}),
    ("/generate", {"input_ids": [1], "sampling_params": {"temperature": "hot"}}),
    ("/generate", {"input_ids": [1], "sampling_params": {"max_new_token": 3}}),
    ("/generate", {}),
    ("/generate", {"input_ids": [[1], "x"]}),
    ("/update_weights_from_tensor", {}), ("/update_weights_from_tensor",
                                          {"serialized_named_tensors": "x"}),
    ("/update_weights_from_disk", {}), ("/update_weights_from_disk", {"model_path": 3}),
    ("/update_weights_from_distributed", {"names": ["a"]}),
    ("/init_weights_update_group", {"master_address": "x"}),
    ("/update_weight_version", {}), ("/update_weight_version", {"new_version": 3}),
    ("/abort_request", {"rid": 5}),
    ("/pause_generation", {"mode": "nap"}), ("/begin_weight_update", [1])])
def test_every_malformed_body_is_a_400(target, path, body):
    status, reply, _ = http(target.url, path, body)
    assert status == 400, (path, body, reply)
    assert http(target.url, path, raw=b"{not json")[0] == 400


def test_fields_generate_does_not_know_are_ignored_as_sglang_ignores_them(target):
    status, item, _ = http(target.url, "/generate", {
        "input_ids": [1], "bogus": 1, "sampling_params": {"max_new_tokens": 2,
                                                          "stop_token_ids": [400]}})
    assert status == 200 and len(item["output_ids"]) == 2  # and an id past the vocabulary
    status, reply, _ = http(target.url, "/generate", {
        "input_ids": [1], "sampling_params": {"max_new_token": 2}})  # a typo in sampling
    assert status == 400, reply


def test_weight_version_routes_answer_as_sglang(target, model_dir, tmp_path):
    url = target.url
    before = http(url, "/model_info")[1]["weight_version"]
    status, reply, _ = http(url, "/update_weight_version", {"new_version": "v7",
                                                             "abort_all_requests": False})
    assert status == 200 and reply == {"success": True, "new_version": "v7",
                                       "message": "Weight version updated to v7"}
    # A disk update without a version leaves the version alone.
    status, reply, _ = http(url, "/update_weights_from_disk", {"model_path": model_dir})
    assert status == 200 and reply["success"] and "num_paused_requests" in reply
    assert http(url, "/model_info")[1]["weight_version"] == "v7"
    http(url, "/update_weight_version", {"new_version": before, "abort_all_requests": False})


# ---- weight-update sessions, payloads, the unpickler ---------------------------------------

def test_tensor_and_distributed_loads_need_a_session(target):
    url = target.url
    named = list(hf_model(KW, seed=3).state_dict().items())[:1]  # model_dir's own
    body = protocol.tensor_update_request(protocol.serialize_named_tensors(named), 1, None)
    status, reply, _ = http(url, "/update_weights_from_tensor", body)
    assert status == 400 and reply["success"] is False
    assert "between begin_weight_update() and end_weight_update()" in reply["message"]
    assert http(url, "/end_weight_update", {})[0] == 400  # nothing open
    assert http(url, "/begin_weight_update", {})[:2] == (200, {"success": True,
                                                               "message": "Success"})
    assert "already open" in http(url, "/begin_weight_update", {})[1]["message"]
    try:
        status, reply, _ = http(url, "/update_weights_from_tensor", body)
        assert status == 200 and reply["success"], reply
    finally:
        assert http(url, "/end_weight_update", {})[0] == 200


class _Gadget:
    """Unpickles as a call of torch.serialization.save(obj, path): a file write."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return torch.serialization.save, ({"pwned": 1}, self.path)


@pytest.mark.parametrize("kind", ["serve", "sglang"])
def test_the_unpickler_refuses_a_file_writing_gadget_and_writes_nothing(kind, model_dir,
                                                                        tmp_path):
    """Both refuse the payload and write nothing. mgrpo serve answers 400 and serves on;
    SGLang 0.5.23's SafeUnpickler raises in its scheduler, which takes the server down
    (`run_scheduler_process` signals its parent), so that target is a server of its own."""
    victim = tmp_path / "written_by_a_request.pt"
    payload = base64.b64encode(pickle.dumps([("w", _Gadget(str(victim)))])).decode()
    with pytest.raises(pickle.UnpicklingError, match="torch.serialization"):
        protocol.deserialize_named_tensors(payload)
    assert not victim.exists()
    target = start_target(kind, model_dir)
    try:
        http(target.url, "/begin_weight_update", {})
        for fmt in (None, "flattened_bucket"):
            body = protocol.tensor_update_request(payload, 1, None, fmt)
            if kind == "serve":
                status, reply, _ = http(target.url, "/update_weights_from_tensor", body)
                assert status == 400 and "refusing to unpickle" in reply["message"]
            else:
                with pytest.raises((urllib.error.URLError, ConnectionError)):
                    http(target.url, "/update_weights_from_tensor", body)
                assert target.proc.wait(30) != 0
                break
        if kind == "serve":
            http(target.url, "/end_weight_update", {})
            assert gen(target.url, [1, 2], max_new_tokens=2)[0] == 200
    finally:
        target.stop()
    assert not victim.exists()


def test_flattened_and_verl_payloads_load_exactly(model_dir, tmp_path):
    named = list(hf_model(KW, seed=9).state_dict().items())
    for fmt in ("flattened_bucket", "local_serialized"):
        engine = EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
        server = EmbeddedServer(engine).start()
        try:
            http(server.url, "/begin_weight_update", {})
            if fmt == "flattened_bucket":
                flat = protocol.flatten_bucket(named)
                body = protocol.tensor_update_request(protocol.serialize_flattened_bucket(flat),
                                                      1, "v1", fmt)
            else:  # verl: each value its rank's own serialized tensor
                keep = [(n, t.clone()) for n, t in named]
                pairs = [(n, protocol.LocalSerializedTensor([protocol.dumps_for_sglang(t)]))
                         for n, t in keep]
                body = protocol.tensor_update_request(
                    base64.b64encode(protocol.dumps_for_sglang(pairs)).decode(), 1, "v1")
            status, reply, _ = http(server.url, "/update_weights_from_tensor", body)
            assert status == 200, reply
            http(server.url, "/end_weight_update", {})
            got = engine.hf_model().state_dict()
            for n, t in named:
                assert torch.equal(got[n], t), (fmt, n)
        finally:
            server.stop()


def test_flattened_bucket_is_read_by_sglangs_own_reader():
    """Where SGLang imports: its SafeUnpickler and FlattenedTensorBucket rebuild our bucket."""
    pytest.importorskip("sglang.srt.weight_sync.tensor_bucket")
    common = pytest.importorskip("sglang.srt.utils.common")
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    named = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)),
             ("c", torch.arange(3))]
    flat = protocol.flatten_bucket(named)
    got = common.MultiprocessingSerializer.deserialize(protocol.serialize_flattened_bucket(flat))
    rebuilt = FlattenedTensorBucket(flattened_tensor=got["flattened_tensor"],
                                    metadata=got["metadata"]).reconstruct_tensors()
    assert [(n, t.dtype) for n, t in rebuilt] == [(n, t.dtype) for n, t in named]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rebuilt, named))


# ---- sampling parameters ----------------------------------------------------------------------

def test_top_k_one_is_greedy_whatever_the_seed(target):
    greedy = gen(target.url, [4, 5, 6], max_new_tokens=6, temperature=0)[1]["output_ids"]
    for seed in (1, 2, 3):
        got = gen(target.url, [4, 5, 6], max_new_tokens=6, temperature=1.0, top_k=1,
                  sampling_seed=seed)[1]["output_ids"]
        assert got == greedy


def test_the_models_eos_ends_a_completion_unless_ignore_eos(target):
    serve_only(target, "the test sets the EOS of a running server")
    url = target.url
    greedy = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0)[1]["output_ids"]
    first = greedy[0]
    target.server.eos_ids = [first]  # the model's EOS is the first greedy token
    try:
        item = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0)[1]
        assert item["output_ids"] == [first]
        assert item["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
        item = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0, ignore_eos=True)[1]
        assert item["output_ids"] == greedy
    finally:
        target.server.eos_ids = []


def test_stop_tokens_min_new_tokens_and_stop_strings(target):
    url = target.url
    greedy = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0,
                 ignore_eos=True)[1]["output_ids"]
    first = greedy[0]
    # min_new_tokens: a stop token cannot end the completion before it.
    item = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0, stop_token_ids=[first],
               min_new_tokens=3)[1]
    assert first not in item["output_ids"][:3] and len(item["output_ids"]) >= 3
    # stop strings: cut after the token that completes one; trimmed from the text.
    text = "".join(CHARS[t] for t in greedy)
    stop = text[1:3]  # completed by the third token
    item = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0, stop=[stop, "#"])[1]
    cut = text.find(stop) + 2
    assert item["output_ids"] == greedy[:cut]
    assert item["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert item["text"] == text[:text.find(stop)]
    item = gen(url, [4, 5, 6], max_new_tokens=6, temperature=0, stop=stop,
               no_stop_trim=True)[1]
    assert item["text"] == text[:cut]


@pytest.mark.parametrize("sampling,needle", [
    ({"max_new_tokens": 10 ** 9}, "maximum context length"),
    ({"regex": "a+"}, "regex"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"top_k": 0}, "top_k"), ({"min_new_tokens": 9, "max_new_tokens": 3}, "min_new_tokens")])
def test_unsupported_or_out_of_range_sampling_is_a_400(target, sampling, needle):
    if needle in ("regex", "frequency_penalty"):
        serve_only(target, "SGLang applies it (the harness's stub engine refuses it)")
    status, reply, _ = gen(target.url, [1, 2], **sampling)
    assert status == 400 and needle in json.dumps(reply)


def test_a_prompt_as_long_as_the_context_is_a_400(target):
    ctx = target.context_len
    status, reply, _ = gen(target.url, [1] * ctx, max_new_tokens=1)
    assert status == 400 and "longer than the model's context length" in \
        reply["error"]["message"]


def test_long_generation_health_flush_and_abort(target):
    """A long request: /health_generate answers at once, /flush_cache is refused while it
    runs, /abort_request ends it with finish_reason abort, and the server serves on."""
    result = {}
    rid = "long-one"
    steps = target.context_len - 3

    def run():
        result["reply"] = http(target.url, "/generate", {
            "input_ids": [1, 2], "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": steps, "ignore_eos": True}})

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)  # under way
    t0 = time.monotonic()
    assert http(target.url, "/health_generate", timeout=10)[0] == 200
    assert time.monotonic() - t0 < 5
    assert http(target.url, "/flush_cache", {})[0] == 400
    assert http(target.url, "/abort_request", {"rid": rid})[0] == 200
    t.join(60)
    status, item, _ = result["reply"]
    assert status == 200 and item["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(item["output_ids"]) < steps
    # SGLang may still be finishing the health check's one-token request: flush soon succeeds.
    deadline = time.monotonic() + 10
    while http(target.url, "/flush_cache", {})[0] != 200:
        assert time.monotonic() < deadline, "the cache was never flushed"
        time.sleep(0.1)


# ---- the client against this contract ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["serve", "sglang"])
@pytest.mark.parametrize("transport", ["tensor", "distributed", "disk"])
def test_client_cycle_sessions_versions_and_release(kind, transport, model_dir, tmp_path):
    """The client's whole cycle against one server holding both weight sets in turn:
    introduce, push (tensor pushes as flattened buckets inside a session, distributed ones
    over a gloo group inside a session, disk ones as a directory), confirm through
    /model_info and a text /flush_cache, generate from each set; with release_memory the
    server hands its memory back and the next generate reloads the weights."""
    weights = {m: list(hf_model(KW, seed=s).state_dict().items())
               for m, s in (("policy", 3), ("momentum", 4))}
    ref = EmbeddedEngine(CFG)
    for m, named in weights.items():
        ref.update_weights(m, [named], version=1)
    target = start_target(kind, model_dir, process=True)  # a gloo group spans two processes
    client = Server(target.url)
    paths = []
    call = client.call
    client.call = lambda path, *a, **k: (paths.append((path, (a[0] if a else {}) or {})),
                                         call(path, *a, **k))[1]
    clients = [client]
    engine = SGLangEngine({"policy": clients, "momentum": clients},
                          make_transport(transport, 1 << 16, directory=str(tmp_path),
                                         hf_config=CFG, backend="gloo", timeout_s=120),
                          request_timeout_s=120, release_memory=True, log=lambda _: None)
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=3)
    try:
        assert client.version >= protocol.SESSION_SINCE
        for version in (1, 2):
            for m in ("policy", "momentum"):
                engine.update_weights(m, [weights[m]], version=version)
                got = engine.generate([[1, 2, 3]], 2, params, m)
                assert [c.token_ids for c in got[0]] == \
                    [c.token_ids for c in ref.generate([[1, 2, 3]], 2, params, m)[0]], m
            engine.release_memory()
            if kind == "serve":  # SGLang's would generate from undefined memory
                assert http(target.url, "/generate", {"input_ids": [1]})[0] == 400
        assert http(target.url, "/model_info")[1]["weight_version"] == "momentum:2"
    finally:
        engine.close()
        target.stop()
    names = [p for p, _ in paths]
    assert "/get_weight_version" not in names and "/flush_cache" in names
    assert names.index("/release_memory_occupation") < names.index("/resume_memory_occupation")
    if transport != "disk":
        loads = f"/update_weights_from_{transport}"
        for i, name in enumerate(names):  # every load inside a session
            if name == loads:
                assert "/begin_weight_update" in names[:i]
                opened = len(names) - 1 - names[:i][::-1].index("/begin_weight_update")
                assert "/end_weight_update" not in names[opened:i]
    if transport == "tensor":
        bodies = [b for p, b in paths if p == "/update_weights_from_tensor"]
        assert bodies and all(b["load_format"] == "flattened_bucket" for b in bodies)


@pytest.mark.parametrize("kind", ["serve", "sglang"])
def test_a_server_killed_mid_generation_is_a_one_line_rollout_error(kind, model_dir):
    target = start_target(kind, model_dir, process=True)
    client = Server(target.url)
    engine = SGLangEngine({"policy": [client], "momentum": [client]},
                          make_transport("tensor", 1 << 20, timeout_s=30),
                          request_timeout_s=5, log=lambda _: None)
    steps = target.context_len - 8
    killer = threading.Timer(1.5, target.proc.kill)
    killer.start()
    try:
        with pytest.raises(RolloutError) as e:
            engine.generate([[1, 2]], 1, SamplingParams(max_new_tokens=steps, seed=1,
                                                        stop_token_ids=[]), "policy")
        assert "\n" not in str(e.value)
    finally:
        killer.join()
        engine.close()
        target.stop()


# ---- waits, one-line errors, processes (issue 21) ---------------------------------------------

def test_waiting_for_a_server_says_what_it_waits_for_and_ends_in_one_line(monkeypatch):
    from megatron_mgrpo.parallel import free_port
    from megatron_mgrpo.rollout import servers

    monkeypatch.setattr(servers, "PROGRESS_S", 0.3)
    lines = []
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError) as e:
        Server(url, log=lines.append).wait_healthy(1.5)
    assert isinstance(e.value, RolloutError) and "\n" not in str(e.value)
    assert "not healthy after 2 s" in str(e.value) or "not healthy after 1 s" in str(e.value)
    assert lines and all(f"waiting for {url}/health" in line for line in lines)


def test_a_stalled_request_logs_while_it_waits(monkeypatch):
    from megatron_mgrpo.rollout import servers

    monkeypatch.setattr(servers, "PROGRESS_S", 0.3)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    lines = []
    try:
        with pytest.raises(ServerError, match="no answer"):
            Server(url, log=lines.append).call("/generate", {"input_ids": [1]}, timeout=1.2)
    finally:
        listener.close()
    assert lines and f"still waiting for {url}/generate" in lines[0]


def test_launch_without_sglang_is_one_line(tmp_path):
    import importlib.util

    from megatron_mgrpo.config.rollout import SGLangConfig
    from megatron_mgrpo.rollout.servers import launch

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed here")
    with pytest.raises(RolloutError, match="SGLang is not installed") as e:
        launch(SGLangConfig().launch_command, 1, "127.0.0.1", 0, str(tmp_path),
               str(tmp_path), 5)
    assert "\n" not in str(e.value)


def test_serve_on_a_busy_port_is_one_line_and_exit_2(model_dir):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        proc = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "serve", "--model",
                               model_dir, "--port", str(busy.getsockname()[1])],
                              capture_output=True, text=True, timeout=DEADLOCK_GUARD_S,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        busy.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen on" in lines[0], proc.stderr


CHILD = ("import subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
         "open(sys.argv[1], 'w').write(str(p.pid))\n"
         "time.sleep(600)\n")


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie is gone as far as the machine is concerned
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _wait_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and open(path).read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(open(path).read())


def test_launched_servers_and_their_children_never_outlive_the_trainer(tmp_path):
    from megatron_mgrpo.rollout.servers import ServerProcess

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # close(): the process group goes, the server's own child included.
    proc = ServerProcess(f"{{python}} {script} {tmp_path / 'a.pid'}", "127.0.0.1", 1, "m",
                         str(tmp_path / "a.log"))
    proc.start()
    grandchild = _wait_file(str(tmp_path / "a.pid"))
    proc.stop(grace=1.0)
    time.sleep(0.2)
    assert _gone(proc.popen.pid) and _gone(grandchild)
    # Interpreter exit without close(): atexit kills the group.
    command = "{python} " + f"{script} {tmp_path / 'b.pid'}"
    trainer = ("import sys\nfrom megatron_mgrpo.rollout.servers import ServerProcess\n"
               f"p = ServerProcess({command!r}, "
               f"'127.0.0.1', 1, 'm', {str(tmp_path / 'b.log')!r})\n"
               "p.start()\nprint(p.popen.pid, flush=True)\n"
               "import time, os\n"
               f"while not os.path.exists({str(tmp_path / 'b.pid')!r}): time.sleep(0.05)\n"
               "time.sleep(0.2)\n")
    out = subprocess.run([sys.executable, "-c", trainer], capture_output=True, text=True,
                         timeout=DEADLOCK_GUARD_S, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             sys.path)})
    assert out.returncode == 0, out.stderr
    server_pid = int(out.stdout.split()[0])
    grandchild = _wait_file(str(tmp_path / "b.pid"))
    time.sleep(0.5)
    assert _gone(server_pid) and _gone(grandchild)


def test_a_lost_server_is_a_one_line_rollout_error():
    server = EmbeddedServer(EmbeddedEngine(CFG, sets=("policy",))).start()
    client = Server(server.url)
    clients = [client]
    engine = SGLangEngine({"policy": clients, "momentum": clients},
                          make_transport("tensor", 1 << 20, timeout_s=30),
                          request_timeout_s=5, log=lambda _: None)
    server.stop()
    try:
        with pytest.raises(RolloutError) as e:
            engine.generate([[1, 2]], 1, SamplingParams(max_new_tokens=2, seed=1), "policy")
        assert "\n" not in str(e.value)
    finally:
        engine.close()


def test_an_sglang_older_than_0523_is_refused_in_one_line(monkeypatch):
    """The client speaks the contract this suite checks against 0.5.23's own server; an older
    server (no weight-update sessions) is named, not half-served."""
    from megatron_mgrpo.rollout import server as served

    monkeypatch.setattr(served, "SGLANG_VERSION", "0.5.22")
    server = EmbeddedServer(EmbeddedEngine(CFG, sets=("policy",))).start()
    try:
        with pytest.raises(RolloutError) as e:
            SGLangEngine({"policy": [Server(server.url)], "momentum": [Server(server.url)]},
                         make_transport("tensor", 1 << 20, timeout_s=30),
                         request_timeout_s=10, log=lambda _: None)
        assert str(e.value) == (f"{server.url} runs SGLang 0.5.22; this client needs SGLang "
                                ">= 0.5.23 (its weight-update sessions and /model_info)")
    finally:
        server.stop()
