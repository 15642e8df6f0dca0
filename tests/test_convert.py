"""HF <-> Megatron conversion tools against transformers and against megatron-core's own saves.

- HF -> Megatron -> HF is bitwise for tiny random Llama 3 (llama3 RoPE scaling), Qwen2 (QKV
  bias, tied embeddings) and Qwen3 (QK-norm) models saved by transformers in several shards.
- The converted checkpoint loaded at TP=1, TP=2 and PP=2 gives transformers' logits (also with
  one KV head at TP=2).
- What the converter writes is, chunk for chunk, what megatron-core writes when it saves the
  same model at TP=2.
- Bad input fails in one line and leaves nothing under the output name.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_workers
from tests.test_hf_reference import ARCHS, hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One KV head: at TP=2 each rank holds half of one "q q k v" group (megatron all-gathers it).
ARCHS = {**ARCHS, "llama_kv1": dict(ARCHS["llama"], num_attention_heads=4,
                                    num_key_value_heads=1, hidden_size=64)}


def hf_to_megatron(*args):
    from megatron_mgrpo.weights.convert import convert_hf_to_megatron

    return convert_hf_to_megatron(*args, log=lambda line: None)


def megatron_to_hf(src, out, model="policy", dtype=torch.float32, shard_bytes=5 * 2 ** 30):
    from megatron_mgrpo.weights.convert import export_megatron_to_hf

    return export_megatron_to_hf(src, out, model, dtype, shard_bytes=shard_bytes,
                                 log=lambda line: None)


def tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per architecture: the HF dir (3+ shards), its conversion (TP=2 chunks) and tokens."""
    out = {}
    for arch, kw in ARCHS.items():
        root = tmp_path_factory.mktemp(arch)
        model = hf_model(kw)
        model.save_pretrained(root / "hf", max_shard_size="20KB")
        (root / "hf" / "tokenizer.json").write_text("{}")  # travels with both conversions
        rec = hf_to_megatron(str(root / "hf"), str(root / "mcore"), 2, 1, torch.float32)
        ids = torch.randint(0, kw["vocab_size"], (2, 12),
                            generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        out[arch] = dict(hf=str(root / "hf"), mcore=str(root / "mcore"), record=rec, ids=ids,
                         logits=logits, root=root)
    return out


def read_all(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_megatron_hf_round_trip_is_bitwise(converted, arch):
    from transformers import AutoConfig

    c = converted[arch]
    assert len([f for f in os.listdir(c["hf"]) if f.endswith(".safetensors")]) >= 3
    assert os.path.isfile(os.path.join(c["mcore"], "tokenizer.json"))
    back = os.path.join(c["root"], "back")
    stats = megatron_to_hf(c["mcore"], back, shard_bytes=30_000)
    assert stats["shards"] > 1 and os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    src, got = read_all(c["hf"]), read_all(back)
    if ARCHS[arch].get("tie_word_embeddings"):
        src.pop("lm_head.weight", None)
    assert sorted(got) == sorted(src)
    for name in src:
        assert got[name].dtype == src[name].dtype and torch.equal(got[name], src[name]), name
    a = AutoConfig.from_pretrained(c["hf"], local_files_only=True).to_dict()
    b = AutoConfig.from_pretrained(back, local_files_only=True).to_dict()
    for key in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "tie_word_embeddings", "rope_scaling", "rope_parameters",
                "max_position_embeddings", "attention_bias", "hidden_act"):
        assert a.get(key) == b.get(key), key
    assert os.path.isfile(os.path.join(back, "tokenizer.json"))


def logits_worker(converted_items, tp, pp):
    """Logits of every architecture, from the HF dir and from the converted dir, gathered over
    TP (hooked off the output layer) on the last pipeline stage."""
    import torch.distributed as dist

    from megatron_mgrpo.config.schema import Config, ModelConfig, ParallelConfig
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.weights.pretrained import load_pretrained

    out = {}
    for arch, c in converted_items:
        for source in ("hf", "mcore"):
            cfg = Config(model=ModelConfig(load=c[source], make_vocab_size_divisible_by=128),
                         parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                                 micro_batch_size=2))
            ctx = init_parallel(cfg.parallel)
            policy = MegatronPolicy(cfg, ctx)
            load_pretrained(policy, c[source])
            seen = []
            if ctx.is_last_stage:
                policy.chunks[-1].output_layer.register_forward_hook(
                    lambda mod, inp, output: seen.append(output[0].detach()))
            policy.logprobs({"input_ids": c["ids"]}, with_entropy=False)
            if ctx.is_last_stage:
                local = seen[0].transpose(0, 1)  # [S, B, V/tp] -> [B, S, V/tp]
                parts = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
                out[(arch, source)] = torch.cat(parts, -1)[..., :policy.model_cfg.vocab_size]
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_converted_checkpoint_gives_transformers_logits(converted, tp, pp):
    items = [(a, {k: v for k, v in c.items() if k in ("hf", "mcore", "ids")})
             for a, c in sorted(converted.items())]
    results = run_workers(logits_worker, tp * pp, items, tp, pp)
    last = results[-1]
    for arch, c in converted.items():
        for source in ("hf", "mcore"):
            torch.testing.assert_close(last[(arch, source)], c["logits"], atol=2e-5, rtol=1e-5,
                                       msg=lambda m: f"{arch} from {source}: {m}")


def megatron_save_worker(path, kw):
    from megatron.core import dist_checkpointing

    from megatron_mgrpo.config.schema import Config, ModelConfig, ParallelConfig
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.weights.pretrained import load_pretrained

    cfg = Config(model=ModelConfig(load=kw), parallel=ParallelConfig(tensor_parallel=2))
    policy = MegatronPolicy(cfg, init_parallel(cfg.parallel))
    load_pretrained(policy, kw)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save({"model": policy.chunks[0].sharded_state_dict()}, path)


def test_layout_on_disk_is_megatrons_own(converted, tmp_path):
    """Keys, global shapes, dtypes and chunks equal those of megatron-core saving at TP=2
    (qwen3: every kind of tensor; untied output layer)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_mgrpo.weights.dist_checkpoint import stored_tensors

    c = converted["qwen3"]
    run_workers(megatron_save_worker, 2, str(tmp_path / "ref"), c["hf"])

    def chunks(path):
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
        return {k: (tuple(v.size), v.properties.dtype,
                    sorted((tuple(ch.offsets), tuple(ch.sizes)) for ch in v.chunks))
                for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}

    ours, ref = chunks(os.path.join(c["mcore"], "dist_checkpoint")), chunks(str(tmp_path / "ref"))
    # megatron pads the vocabulary for its TP (make_vocab_size_divisible_by); we store it as is
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert ours.pop(key)[0][0] == ARCHS["qwen3"]["vocab_size"]
        ref.pop(key)
    assert ours == ref
    assert set(stored_tensors(str(tmp_path / "ref"))) >= set(ours)


def test_export_of_momentum_from_a_converted_model_is_refused(converted, tmp_path):
    from megatron_mgrpo.weights.files import ConversionError

    with pytest.raises(ConversionError, match="no momentum model"):
        megatron_to_hf(converted["llama"]["mcore"], str(tmp_path / "x"), model="momentum")


def _break(hf_dir, tmp_path, how):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    if how == "arch":
        cfg["model_type"] = "mistral"
    elif how == "shape":
        cfg["intermediate_size"] += 16
    elif how == "shard":
        os.remove(bad / sorted(set(index["weight_map"].values()))[-1])
    elif how == "act":
        cfg["hidden_act"] = "gelu"
    (bad / "config.json").write_text(json.dumps(cfg))
    return str(bad)


@pytest.mark.parametrize("how,tp,message", [
    ("arch", 1, "model_type 'mistral' is not supported"),
    ("shape", 1, "has shape .* but config.json implies"),
    ("shard", 1, "shard\\(s\\) model-\\d+-of-\\d+\\.safetensors .* are missing"),
    ("act", 1, "hidden_act 'gelu' is not supported"),
    ("none", 4, "--tp: got 4; accepted: a divisor of num_attention_heads=6"),
])
def test_bad_input_is_one_line_and_leaves_no_output(converted, tmp_path, how, tp, message):
    import re

    src = _break(converted["llama"]["hf"], tmp_path, how)
    out = tmp_path / "out"
    r = tool("convert_hf_to_megatron.py", "--hf-dir", src, "--out", str(out), "--tp", str(tp))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_hf_to_megatron: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_failure_midway_leaves_no_output(converted, tmp_path, monkeypatch):
    """A read error after half the tensors were written: no directory looks complete."""
    from megatron_mgrpo.weights import hf_io

    real = hf_io.HFCheckpoint.__getitem__
    calls = {"n": 0}

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk went away")
        return real(self, name)

    monkeypatch.setattr(hf_io.HFCheckpoint, "__getitem__", flaky)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_megatron(converted["qwen2"]["hf"], str(tmp_path / "out"), 1, 1, torch.float32)
    assert calls["n"] > 5 and os.listdir(tmp_path) == []


def test_existing_output_needs_force(converted, tmp_path):
    (tmp_path / "out").mkdir()
    r = tool("convert_hf_to_megatron.py", "--hf-dir", converted["qwen2"]["hf"], "--out",
             str(tmp_path / "out"))
    assert r.returncode != 0 and "exists; pass --force" in r.stderr
    r = tool("convert_hf_to_megatron.py", "--hf-dir", converted["qwen2"]["hf"], "--out",
             str(tmp_path / "out"), "--force", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["dtype"] == "bfloat16" and record["tensors"] > 0
