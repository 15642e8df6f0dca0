"""The SGLang rollout client over real HTTP on loopback, against the embedded server.

The reference for every completion is the in-process embedded engine with the same weights and
seed: a completion's random stream depends on (seed, prompt, j) only, so the tokens through any
number of servers, requests, retries and restarts must be the same tokens (log-probs equal up
to float noise from different batch padding).
"""

import os
import signal
import sys
import time

import pytest
import torch

from megatron_mgrpo.config import ConfigError, load_config
from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.models.architecture import hf_config_dict
from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import SamplingParams, WeightsNotReadyError, WeightUpdateError
from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from megatron_mgrpo.rollout.server import EmbeddedServer
from megatron_mgrpo.rollout.servers import Server, launch
from megatron_mgrpo.rollout.sglang_engine import RolloutError, SGLangEngine
from megatron_mgrpo.rollout.transports import make_transport
from tests import DEADLOCK_GUARD_S
from tests.test_hf_reference import hf_model

KW = dict(architecture="qwen2", vocab_size=40, hidden_size=64, intermediate_size=96,
          num_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
          tie_word_embeddings=True)
CFG = hf_config_dict(ModelConfig(**KW))
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11], [5, 6, 7], [12, 13, 14]]
PARAMS = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_token_ids=[0],
                        seed=21)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = f"{sys.executable} -m megatron_mgrpo.cli serve --model {{model}} --host {{host}} " \
        "--port {port}"


@pytest.fixture(scope="module")
def weights():
    return {"policy": list(hf_model(KW, seed=3).state_dict().items()),
            "momentum": list(hf_model(KW, seed=4).state_dict().items())}


@pytest.fixture(scope="module")
def reference(weights):
    ref = EmbeddedEngine(CFG)
    for m, named in weights.items():
        ref.update_weights(m, [named], version=1)
    return ref


def assert_same(got, want):
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    assert [[c.finish_reason for c in g] for g in got] == \
        [[c.finish_reason for c in g] for g in want]
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                       atol=2e-5, rtol=1e-5)


def in_process_servers(k):
    return [EmbeddedServer(EmbeddedEngine(CFG, sets=("policy",))).start() for _ in range(k)]


def buckets(named, size):
    return [named[i:i + size] for i in range(0, len(named), size)]


def make_engine(servers, transport="tensor", placement="swap", tmp=None, **kw):
    clients = [Server(s.url) for s in servers]
    if placement == "swap":
        groups = {"policy": clients, "momentum": clients}
    else:
        half = len(clients) // 2
        groups = {"policy": clients[:half], "momentum": clients[half:]}
    tr = make_transport(transport, 1 << 20, directory=str(tmp or ""), backend="gloo",
                        timeout_s=60)
    kw.setdefault("max_prompts_per_request", 4)
    return SGLangEngine(groups, tr, request_timeout_s=60, log=lambda _: None, **kw)


@pytest.mark.parametrize("transport,placement", [("tensor", "swap"), ("disk", "swap"),
                                                 ("tensor", "separate")])
def test_generate_both_sets_over_http_equals_the_embedded_engine(weights, reference, tmp_path,
                                                                 transport, placement):
    servers = in_process_servers(2)
    engine = make_engine(servers, transport, placement, tmp_path)
    try:
        for m, named in weights.items():
            engine.update_weights(m, buckets(named, 5), version=1)
        assert engine.weight_version("policy") == engine.weight_version("momentum") == 1
        for m in engine.generation_order(["policy", "momentum"]):
            assert_same(engine.generate(PROMPTS, 3, PARAMS, m), reference.generate(
                PROMPTS, 3, PARAMS, m))
        # The servers say which weights they hold; in the swap placement the last set sampled.
        held = {Server(s.url).call("/model_info")["weight_version"] for s in servers}
        assert held <= {"policy:1", "momentum:1"} and len(held) == (
            1 if placement == "swap" else 2)
    finally:
        engine.close()
        for s in servers:
            s.stop()


def test_swap_order_costs_one_load_when_the_momentum_model_did_not_move(weights):
    """Six steps; the policy moves every step, the momentum model every 2nd: sampling the set
    the servers hold first needs 1 load on unchanged-momentum steps, 2 otherwise."""
    servers = in_process_servers(1)
    engine = make_engine(servers)
    try:
        engine.update_weights("policy", [weights["policy"]], 0)
        engine.update_weights("momentum", [weights["momentum"]], 0)
        loads = []
        for step in range(1, 7):
            before = engine.stats["loads"]
            for m in engine.generation_order(["policy", "momentum"]):
                engine.generate(PROMPTS[:2], 1, PARAMS, m)
            loads.append(engine.stats["loads"] - before)
            engine.update_weights("policy", [weights["policy"]], step)
            if step % 2 == 0:
                engine.update_weights("momentum", [weights["momentum"]], step)
        # Step 1 holds nothing yet: two loads. Then the pushes of step s decide step s+1.
        assert loads == [2, 1, 2, 1, 2, 1]
    finally:
        engine.close()
        servers[0].stop()


@pytest.mark.parametrize("transport", ["tensor", "disk"])
def test_bucketed_update_equals_a_one_shot_update(weights, tmp_path, transport):
    servers = in_process_servers(2)
    engine = make_engine(servers, transport, "separate", tmp_path)
    try:
        engine.update_weights("policy", buckets(weights["policy"], 1), 3)  # one tensor each
        engine.update_weights("momentum", [weights["policy"]], 3)  # the same, in one piece
        a = servers[0].engine.hf_model().state_dict()
        b = servers[1].engine.hf_model().state_dict()
        for name, t in weights["policy"]:
            assert torch.equal(a[name], t) and torch.equal(b[name], t), name
    finally:
        engine.close()
        for s in servers:
            s.stop()


def test_a_broken_off_update_is_never_stamped(weights):
    servers = in_process_servers(2)
    engine = make_engine(servers, placement="separate", host_copy=False)  # streamed through
    policy_server = engine.groups["policy"][0]
    try:
        engine.update_weights("policy", [weights["policy"]], 1)

        def stream():
            yield weights["policy"][:3]
            raise RuntimeError("the trainer died mid-push")

        with pytest.raises(RuntimeError, match="mid-push"):
            engine.update_weights("policy", stream(), 2)
        assert engine.weight_version("policy") is None
        assert policy_server.call("/model_info")["weight_version"] == "policy:2:partial"
        with pytest.raises(WeightsNotReadyError):
            engine.generate(PROMPTS, 1, PARAMS, "policy")
        # A server refuses a bucket that does not fit; the set stays unusable.
        bad = [("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))]
        with pytest.raises(WeightUpdateError, match="shape"):
            engine.update_weights("policy", [bad], 3)
        # Incomplete (buckets missing): the server will not stamp it.
        with pytest.raises(WeightUpdateError, match="without"):
            engine.update_weights("policy", [weights["policy"][:4]], 4)
        assert policy_server.call("/model_info")["weight_version"].endswith(":partial")
        engine.update_weights("policy", buckets(weights["policy"], 7), 5)
        assert engine.weight_version("policy") == 5
        assert engine.generate(PROMPTS, 1, PARAMS, "policy")
    finally:
        engine.close()
        for s in servers:
            s.stop()


def test_a_dead_attached_server_is_dropped_and_its_requests_redone(weights, reference):
    servers = in_process_servers(2)
    engine = make_engine(servers, max_prompts_per_request=1)
    try:
        for m, named in weights.items():
            engine.update_weights(m, [named], 1)
        servers[1].stop()
        assert_same(engine.generate(PROMPTS, 2, PARAMS, "policy"),
                    reference.generate(PROMPTS, 2, PARAMS, "policy"))
        assert engine.stats["dropped"] == 1 and not engine.groups["policy"][1].alive
        servers[0].stop()
        with pytest.raises(RolloutError, match="no policy server is left|could not be made"):
            engine.generate(PROMPTS, 2, PARAMS, "policy")
    finally:
        engine.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_tiny"))
    hf_model(KW, seed=0).save_pretrained(out, safe_serialization=True)
    return out


def test_launched_servers_survive_a_kill_and_a_hang_mid_step(weights, reference, model_dir,
                                                             tmp_path):
    """Two `mgrpo serve` processes fed over a gloo broadcast group; one is killed while a
    step's requests are in flight, later the other hangs (SIGSTOP): each is detected (dropped
    connection, timeout), restarted on its port, given the current weights again, and the
    batch comes back whole and equal to the reference."""
    servers = launch(SERVE, 2, "127.0.0.1", 0, model_dir, str(tmp_path / "logs"), 120)
    groups = {"policy": servers, "momentum": servers}
    tr = make_transport("distributed", 1 << 20, backend="gloo", timeout_s=60)
    engine = SGLangEngine(groups, tr, request_timeout_s=60, max_prompts_per_request=1,
                          launch_timeout_s=120, log=lambda _: None)
    try:
        for m, named in weights.items():
            engine.update_weights(m, buckets(named, 6), version=1)
        many = PROMPTS * 4
        want = reference.generate(many, 2, PARAMS, "momentum")

        def fail_on_third_request(server, how):
            """Server's 3rd /generate of the step finds it killed (or stopped)."""
            call, seen = server.call, []

            def wrapped(path, *a, **k):
                if path == "/generate":
                    seen.append(path)
                    if len(seen) == 3:
                        os.killpg(server.process.popen.pid, how)
                return call(path, *a, **k)
            server.call = wrapped
            return lambda: setattr(server, "call", call)

        undo = fail_on_third_request(servers[0], signal.SIGKILL)
        assert_same(engine.generate(many, 2, PARAMS, "momentum"), want)
        undo()
        assert engine.stats["restarts"] == 1 and all(s.alive for s in servers)

        engine.request_timeout_s = 3.0
        undo = fail_on_third_request(servers[1], signal.SIGSTOP)
        assert_same(engine.generate(many, 2, PARAMS, "momentum"), want)
        undo()
        assert engine.stats["restarts"] == 2
        assert {s.call("/model_info")["weight_version"] for s in servers} == \
            {"momentum:1"}
    finally:
        engine.close()
    time.sleep(0.2)
    for s in servers:
        assert s.process.popen.poll() is not None  # nothing left running


def test_a_server_that_dies_while_starting_or_never_answers_is_one_clear_error(tmp_path):
    from megatron_mgrpo.parallel import free_port
    from megatron_mgrpo.rollout.servers import ServerError

    with pytest.raises(ServerError, match="exited with code 3 while starting; its log"):
        launch('{python} -c "import sys; sys.exit(3)" {port}', 1, "127.0.0.1", 0, "m",
               str(tmp_path), 60)
    with pytest.raises(ServerError, match="not healthy after 1 s"):
        Server(f"http://127.0.0.1:{free_port()}").wait_healthy(1.0)


def test_serve_refuses_a_directory_that_is_not_a_model(tmp_path):
    from megatron_mgrpo.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2


def test_sglang_config_is_checked(model_dir):
    base = os.path.join(ROOT, "examples/tiny/config.yaml")
    sg = ["--model.load", model_dir, "--rollout.backend", "sglang"]
    with pytest.raises(ConfigError, match="sglang.urls"):
        load_config(base, sg)
    with pytest.raises(ConfigError, match="sglang.momentum_urls"):
        load_config(base, sg + ["--sglang.urls", '["http://a:1"]', "--sglang.placement",
                                "separate"])
    with pytest.raises(ConfigError, match="one or the other"):
        load_config(base, sg + ["--sglang.urls", '["http://a:1"]', "--sglang.launch", "1"])
    with pytest.raises(ConfigError, match="sglang.transport"):
        load_config(base, sg + ["--sglang.launch", "1", "--sglang.transport", "nfs"])
    cfg = load_config(base, sg + ["--sglang.launch", "2", "--sglang.placement", "separate"])
    assert cfg.sglang.launch == 2


def test_request_bodies_are_sglang_request_types():
    """Every body the client sends, decoded as SGLang's HTTP server decodes it: JSON on the
    wire, then pydantic validation into its own `io_struct` request types (what FastAPI does
    for each endpoint), and the generate request normalised as its tokenizer manager does."""
    pytest.importorskip("sglang.srt.managers.io_struct")
    import json

    import pydantic
    from sglang.srt.managers import io_struct
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    named = [("w", torch.zeros(2, 3))]
    payload = protocol.serialize_named_tensors(named)
    bodies = [
        (io_struct.GenerateReqInput, protocol.generate_request([[1, 2], [3]], [7, None], PARAMS)),
        (io_struct.UpdateWeightsFromTensorReqInput,
         protocol.tensor_update_request(payload, 2, "p:1")),
        (io_struct.UpdateWeightFromDiskReqInput, protocol.disk_update_request("/d", "p:1")),
        (io_struct.UpdateWeightsFromDistributedReqInput,
         protocol.distributed_update_request(named, "g", "p:1")),
        (io_struct.InitWeightsUpdateGroupReqInput,
         protocol.init_group_request("127.0.0.1", 1234, 1, 2, "g", "nccl")),
        (io_struct.UpdateWeightVersionReqInput, protocol.version_request("p:1"))]
    decoded = {}
    for cls, body in bodies:
        wire = json.loads(json.dumps(body))
        obj = pydantic.TypeAdapter(cls).validate_python(wire)
        for key, value in body.items():
            got = getattr(obj, key)
            if key == "serialized_named_tensors":  # base64 on the wire, bytes inside SGLang
                value = [__import__("base64").b64decode(v) for v in value]
            assert got == value, (cls.__name__, key, got, value)
        decoded[cls] = obj
    # A field name we mistyped would be rejected, not dropped (the check above can fail).
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(io_struct.UpdateWeightFromDiskReqInput).validate_python(
            {"model_pth": "/d"})

    gen = decoded[io_struct.GenerateReqInput]
    gen.normalize_batch_and_arguments()
    assert gen.batch_size == 2 and not gen.is_single
    for sampling, seed in zip(gen.sampling_params, [7, None]):
        sp = SGLangSampling(**sampling)
        sp.verify(vocab_size=40)
        assert (sp.sampling_seed, sp.max_new_tokens, sp.stop_token_ids, sp.no_stop_trim) == (
            seed, PARAMS.max_new_tokens, set(PARAMS.stop_token_ids), True)
    try:
        from sglang.srt.entrypoints.api_contract import generate_contract_error
    except ImportError:  # older SGLang: the pydantic validation above is the whole check
        pass
    else:
        assert generate_contract_error(json.loads(json.dumps(bodies[0][1]))) is None


def test_tensor_payload_read_by_sglang_deserializer(tmp_path):
    """SGLang's own `MultiprocessingSerializer`, in another process (as its scheduler is), reads
    back the exact tensors of our `/update_weights_from_tensor` payload."""
    pytest.importorskip("sglang.srt.managers.io_struct")
    import subprocess

    named = [("model.layers.0.mlp.down_proj.weight", torch.randn(5, 7)),
             ("lm_head.weight", torch.randn(3, 4).to(torch.bfloat16))]
    payload = protocol.serialize_named_tensors(named)
    child = ("import sys, torch\n"
             "from sglang.srt.utils.common import MultiprocessingSerializer\n"
             "named = MultiprocessingSerializer.deserialize(sys.stdin.read())\n"
             "torch.save([(n, t.clone()) for n, t in named], sys.argv[1])\n")
    out = tmp_path / "named.pt"
    subprocess.run([sys.executable, "-c", child, str(out)], input=payload, text=True,
                   check=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)
    got = torch.load(out)
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, a), (_, b) in zip(got, named):
        assert a.dtype == b.dtype and torch.equal(a, b)
