"""FP8 rollout weights (`rollout.weight_format: fp8`): the quantiser against hand-computed codes
and a naive tile-by-tile reference, the checkpoint writer, and FP8 updates over every SGLang
transport into `mgrpo serve` (the push from a Megatron policy is in test_weight_push.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mgrpo.rollout.base import WeightUpdateError
from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from megatron_mgrpo.rollout.server import EmbeddedServer
from megatron_mgrpo.rollout.servers import launch
from megatron_mgrpo.weights import fp8
from megatron_mgrpo.weights.hf_io import HFCheckpoint
from tests.test_hf_reference import hf_model
from tests.test_sglang_backend import CFG, KW, PARAMS, PROMPTS, SERVE, assert_same, make_engine
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E4M3 = torch.float8_e4m3fn


def reference_fp8(w: torch.Tensor, block: int) -> torch.Tensor:
    """What an FP8 server computes with: each tile scaled so its largest magnitude is 448,
    rounded to E4M3, scaled back. Tile by tile, independently of `weights.fp8`."""
    w = w.float()
    if block == 0:
        s = w.abs().max().clamp(min=1e-12) / 448
        return (w / s).to(E4M3).float() * s
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], block):
        for j in range(0, w.shape[1], block):
            tile = w[i:i + block, j:j + block]
            s = tile.abs().max().clamp(min=1e-12) / 448
            out[i:i + block, j:j + block] = (tile / s).to(E4M3).float() * s
    return out


def expected_weights(named, block):
    """The engine's weights after an FP8 update of `named`: FP8 for the layers' projections,
    bf16 for everything else."""
    return {n: reference_fp8(t, block) if n.startswith("model.layers.") and
            n.endswith("_proj.weight") else t.to(torch.bfloat16).float() for n, t in named}


def test_quantize_matches_hand_computed_codes():
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0],
                      [4.0, 0.0, 0.0, 0.0]])
    q, scale = fp8.quantize(w, block_size=2)
    # left tile: amax 4 -> scale 4/448, codes 112, -224, 448, 0 (all exact in E4M3);
    # right tile: amax 3 -> scale 3/448; 0.5 * 448/3 = 74.67 rounds to 72 (E4M3 steps of 8
    # between 64 and 128), 3 -> 448.
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    assert q.float().tolist() == [[112, -224, 72, 448], [448, 0, 0, 0]]
    torch.testing.assert_close(scale, torch.tensor([[4 / 448, 3 / 448]]))
    back = fp8.dequantize(q, scale, 2)
    torch.testing.assert_close(back, torch.tensor([[1.0, -2.0, 72 * 3 / 448, 3.0],
                                                   [4.0, 0.0, 0.0, 0.0]]))
    # one scale for the tensor: amax 4; 3 -> 336, halfway between 320 and 352 (steps of 32
    # above 256): ties go to the even mantissa, 320 (1.010b x 2^8)
    q1, s1 = fp8.quantize(w, block_size=0)
    assert s1.shape == () and s1.item() == pytest.approx(4 / 448)
    assert q1.float().tolist() == [[112, -224, 56, 320], [448, 0, 0, 0]]


@pytest.mark.parametrize("block", [0, 4, 128])
def test_quantize_error_bound_and_reference(block):
    """|w - dq| <= 2^-4 |w| + 2^-10 s per element (3 mantissa bits; subnormal step 2^-9 of the
    tile's scale s), and the result is the naive reference's bit for bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 150, generator=g) * torch.logspace(-3, 1, 150)  # columns of all sizes
    q, scale = fp8.quantize(w, block)
    assert scale.shape == (() if block == 0 else (-(-37 // block), -(-150 // block)))
    back = fp8.dequantize(q, scale, block)
    assert torch.equal(back, reference_fp8(w, block))
    if block:  # 1 x 2 tiles of 37 x 150 could be 75 or 128 wide: the size must be given
        with pytest.raises(ValueError, match="no block size"):
            fp8.dequantize(q, scale)
    s = scale.reshape(1, 1) if block == 0 else scale.repeat_interleave(block, 0) \
        .repeat_interleave(block, 1)[:37, :150]
    err = (back - w).abs()
    assert bool((err <= 2 ** -4 * w.abs() + 2 ** -10 * s + 1e-12).all())
    assert err.max() > 0  # FP8 really rounds: not a copy


def test_stream_groups_a_weight_with_its_scale_and_the_receiver_insists():
    named = [("model.embed_tokens.weight", torch.randn(10, 8)),
             ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)),
             ("model.layers.0.self_attn.q_proj.bias", torch.randn(8)),
             ("model.layers.0.input_layernorm.weight", torch.randn(8))]
    groups = list(fp8.quantize_stream(named, 4))
    assert [[(n, t.dtype) for n, t in g] for g in groups] == [
        [("model.embed_tokens.weight", torch.bfloat16)],
        [("model.layers.0.self_attn.q_proj.weight", E4M3),
         ("model.layers.0.self_attn.q_proj.weight_scale_inv", torch.float32)],
        [("model.layers.0.self_attn.q_proj.bias", torch.bfloat16)],
        [("model.layers.0.input_layernorm.weight", torch.bfloat16)]]
    flat = [item for g in groups for item in g]
    got = dict(fp8.dequantize_bucket(flat, 4))
    assert list(got) == [n for n, _ in named]
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                       reference_fp8(named[1][1], 4))
    with pytest.raises(ValueError, match="its scale .* is not in the same bucket"):
        fp8.dequantize_bucket(flat[:2], 4)
    with pytest.raises(ValueError, match="a scale came without its FP8 weight"):
        fp8.dequantize_bucket(flat[2:3], 4)
    # the engine says so as an update error, before copying anything
    engine = EmbeddedEngine(CFG)
    with pytest.raises(WeightUpdateError, match="not in the same bucket"):
        engine.load_tensors("policy", [("model.layers.0.mlp.up_proj.weight",
                                        torch.zeros(96, 64, dtype=E4M3))])
    # block scales into an engine that was not told its FP8 tile size
    q, scale = fp8.quantize(torch.randn(96, 64), 32)
    with pytest.raises(WeightUpdateError, match="no block size"):
        engine.load_tensors("policy", [("model.layers.0.mlp.up_proj.weight", q),
                                       ("model.layers.0.mlp.up_proj.weight_scale_inv", scale)])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_tiny"))
    hf_model(KW, seed=5).save_pretrained(out, safe_serialization=True)
    return out


def test_fp8_checkpoint_written_and_served(model_dir, tmp_path):
    out = str(tmp_path / "fp8")
    run = subprocess.run([sys.executable, "tools/quantize_fp8.py", "--src", model_dir, "--out",
                          out, "--block-size", "32"], capture_output=True, text=True, cwd=ROOT,
                         timeout=DEADLOCK_GUARD_S)
    assert run.returncode == 0, run.stderr
    assert "14 of 26 tensors in FP8" in run.stdout  # 2 layers x 7 projections; biases stay
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "activation_scheme": "dynamic",
                                             "weight_block_size": [32, 32]}
    src = dict(hf_model(KW, seed=5).state_dict())
    ckpt = HFCheckpoint(out)
    assert ckpt["model.layers.1.mlp.down_proj.weight"].dtype == E4M3
    assert ckpt.shape("model.layers.1.mlp.down_proj.weight_scale_inv") == (2, 3)  # 64 x 96
    assert ckpt["model.norm.weight"].dtype == torch.bfloat16
    ckpt.close()
    # an FP8 checkpoint loads dequantised (no FP8 kernels needed) and matches the reference
    engine = EmbeddedEngine.from_pretrained(out, sets=("policy",))
    got = engine.hf_model("policy").state_dict()
    for name, want in expected_weights(
            [(n, t) for n, t in src.items() if n != "lm_head.weight"], 32).items():
        assert torch.equal(got[name], want), name
    # refused: writing over it, quantising it again
    again = subprocess.run([sys.executable, "tools/quantize_fp8.py", "--src", out, "--out",
                            str(tmp_path / "fp8b")], capture_output=True, text=True, cwd=ROOT,
                           timeout=DEADLOCK_GUARD_S)
    assert again.returncode == 2 and "already an FP8 checkpoint" in again.stderr
    assert "Traceback" not in again.stderr
    exists = subprocess.run([sys.executable, "tools/quantize_fp8.py", "--src", model_dir,
                             "--out", out], capture_output=True, text=True, cwd=ROOT,
                             timeout=DEADLOCK_GUARD_S)
    assert exists.returncode == 2 and "pass --force" in exists.stderr


def _fp8_buckets(named, block, per_bucket):
    groups = list(fp8.quantize_stream(named, block))
    return [[item for g in groups[i:i + per_bucket] for item in g]
            for i in range(0, len(groups), per_bucket)]


@pytest.mark.parametrize("transport", ["tensor", "disk"])
def test_fp8_update_over_http(transport, tmp_path):
    named = list(hf_model(KW, seed=6).state_dict().items())
    config = {**CFG, "quantization_config": fp8.quantization_config(16)}
    servers = [EmbeddedServer(EmbeddedEngine(config, sets=("policy",))).start()]
    engine = make_engine(servers, transport, "swap", tmp_path)
    try:
        engine.update_weights("policy", _fp8_buckets(named, 16, 3), version=2)
        engine.generate([[1, 2]], 1, PARAMS, "policy")  # the swap placement loads on demand
        got = servers[0].engine.hf_model().state_dict()
        for name, want in expected_weights(named, 16).items():
            assert torch.equal(got[name], want), name
    finally:
        engine.close()
        servers[0].stop()


def test_fp8_update_over_a_broadcast_group_to_a_launched_server(model_dir, tmp_path):
    """The distributed transport: FP8 tensors cross a gloo group (as bytes) into another
    process, then generation uses them."""
    from megatron_mgrpo.rollout.servers import Server
    from megatron_mgrpo.rollout.sglang_engine import SGLangEngine
    from megatron_mgrpo.rollout.transports import make_transport

    named = list(hf_model(KW, seed=6).state_dict().items())
    servers = launch(SERVE, 1, "127.0.0.1", 0, model_dir, str(tmp_path / "logs"),
                     DEADLOCK_GUARD_S)
    engine = SGLangEngine({"policy": servers, "momentum": servers},
                          make_transport("distributed", 1 << 20, backend="gloo",
                                         timeout_s=DEADLOCK_GUARD_S),
                          request_timeout_s=DEADLOCK_GUARD_S, launch_timeout_s=DEADLOCK_GUARD_S,
                          log=lambda _: None)
    try:
        engine.update_weights("policy", _fp8_buckets(named, 0, 4), version=3)
        reference = EmbeddedEngine(CFG)
        reference.update_weights("policy", [list(expected_weights(named, 0).items())], 1)
        assert_same(engine.generate(PROMPTS, 2, PARAMS, "policy"),
                    reference.generate(PROMPTS, 2, PARAMS, "policy"))
        assert Server(servers[0].url).call("/model_info")["weight_version"] \
            == "policy:3"
    finally:
        engine.close()  # stops the servers it launched


def test_sglang_reads_the_format_as_we_do():
    """Where SGLang is installed: its FP8 config parser takes our quantization_config as a
    serialized FP8 checkpoint with our tiles, and its own block dequantiser turns our codes
    and scales into the weights our receivers load."""
    pytest.importorskip("sglang.srt.managers.io_struct")
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant

    block = Fp8Config.from_config(fp8.quantization_config(128))
    assert (block.is_checkpoint_fp8_serialized, block.weight_block_size,
            block.activation_scheme) == (True, [128, 128], "dynamic")
    assert Fp8Config.from_config(fp8.quantization_config(0)).weight_block_size is None
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    q, scale = fp8.quantize(w, 128)
    assert torch.equal(block_quant_dequant(q, scale, [128, 128], torch.float32),
                       fp8.dequantize(q, scale, 128))
