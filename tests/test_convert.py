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

import pytest
import torch

from tests.distributed import in_turn, run_workers
from tests.tool_files import read_all, tool
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


@pytest.fixture(scope="module")
def logits_at_layouts(converted):
    """The logits at TP=1 (one process), then at TP=2 and PP=2 one after the other in the
    same two processes: (tp, pp) -> the ranks' results."""
    items = [(a, {k: v for k, v in c.items() if k in ("hf", "mcore", "ids")})
             for a, c in sorted(converted.items())]
    out = {(1, 1): run_workers(logits_worker, 1, items, 1, 1)}
    ranks = run_workers(in_turn, 2, logits_worker, [(items, 2, 1), (items, 1, 2)])
    out[2, 1], out[1, 2] = ([runs[i] for runs in ranks] for i in range(2))
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_converted_checkpoint_gives_transformers_logits(logits_at_layouts, converted, tp, pp):
    results = logits_at_layouts[tp, pp]
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


# --- dtypes, the index file and one-line errors through the tools' main() --------------------

def tool_main(name, *args):
    """tools/<name>.py's main(), in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def one_line_failure(capsys, name, *args):
    """The tool exits with code 2 and one line `name: ...` on stderr (its last line; progress
    lines may come before it), no traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        tool_main(name, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: ") and "Traceback" not in err, err
    return lines[0]


def safetensors_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def test_default_round_trip_keeps_each_dtype_bitwise_and_writes_the_index(tmp_path, capsys):
    """No --dtype: fp32 stays fp32 (bitwise), and a mixed source (bf16 weights, fp32 norms)
    keeps each tensor's dtype; one-file exports carry model.safetensors.index.json."""
    for case in ("fp32", "mixed"):
        model = hf_model(ARCHS["qwen2"])
        if case == "mixed":
            model = model.to(torch.bfloat16)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.data = p.data.float()
        hf, mcore, back = (tmp_path / case / d for d in ("hf", "mcore", "back"))
        model.save_pretrained(hf)
        assert safetensors_files(hf) == ["model.safetensors"]
        src = read_all(hf)
        src.pop("lm_head.weight", None)  # tied
        record = tool_main("convert_hf_to_megatron", "--hf-dir", hf, "--out", mcore)
        main_dtype = "float32" if case == "fp32" else "bfloat16"
        assert record["dtype_source"] == "kept"
        assert record["dtype"] == (main_dtype if case == "fp32" else "mixed, mostly bfloat16")
        assert json.loads((mcore / "config.json").read_text())["torch_dtype"] == main_dtype
        stats = tool_main("convert_megatron_to_hf", "--ckpt", mcore, "--out", back)
        assert stats["shards"] == 1 and safetensors_files(back) == ["model.safetensors"]
        got = read_all(back)
        assert sorted(got) == sorted(src)
        for name in src:
            assert got[name].dtype == src[name].dtype and torch.equal(got[name], src[name]), name
        assert json.loads((back / "config.json").read_text())["torch_dtype"] == main_dtype

        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {n: "model.safetensors" for n in sorted(src)}
        total = sum(t.numel() * t.element_size() for t in src.values())
        assert index["metadata"]["total_size"] == total == stats["bytes"]
        with open(back / "model.safetensors", "rb") as f:  # the data is exactly that size
            header_len = int.from_bytes(f.read(8), "little")
        assert os.path.getsize(back / "model.safetensors") == 8 + header_len + total
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(back, local_files_only=True,
                                                      torch_dtype="auto")
        assert next(loaded.parameters()).dtype == getattr(torch, main_dtype)


def test_dtype_flag_casts(tmp_path):
    model = hf_model(ARCHS["llama"])
    model.save_pretrained(tmp_path / "hf")
    src = read_all(tmp_path / "hf")
    # --dtype bfloat16 on the way in; the export then keeps the stored bf16.
    record = tool_main("convert_hf_to_megatron", "--hf-dir", tmp_path / "hf", "--out",
                       tmp_path / "mcore", "--dtype", "bfloat16")
    assert record["dtype"] == "bfloat16" and record["dtype_source"] == "cast"
    tool_main("convert_megatron_to_hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "back")
    got = read_all(tmp_path / "back")
    for name in src:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], src[name].to(torch.bfloat16)), name
    # --dtype on the way out: fp32 checkpoint -> bf16 HF directory.
    tool_main("convert_hf_to_megatron", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "m32")
    stats = tool_main("convert_megatron_to_hf", "--ckpt", tmp_path / "m32", "--out",
                      tmp_path / "b16", "--dtype", "bf16")
    assert stats["dtype"] == "bfloat16"
    got = read_all(tmp_path / "b16")
    assert all(torch.equal(got[n], src[n].to(torch.bfloat16)) for n in src)


@pytest.fixture
def small_hf(tmp_path):
    hf = tmp_path / "hf"
    hf_model(ARCHS["llama"]).save_pretrained(hf)
    return hf


def test_unwritable_output_is_one_line(small_hf, tmp_path, capsys, monkeypatch):
    """A read-only output directory (as root, which ignores permissions, the refusal the kernel
    would give is simulated)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        from megatron_mgrpo.weights import files

        real = files.os.makedirs

        def refuse(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(files.os, "makedirs", refuse)
    try:
        line = one_line_failure(capsys, "convert_hf_to_megatron", "--hf-dir", small_hf,
                                "--out", ro / "out")
        assert line == (f"convert_hf_to_megatron: cannot write the output: {ro / 'out.tmp'}: "
                        "Permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_force_onto_a_regular_file_is_one_line(small_hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a model")
    line = one_line_failure(capsys, "convert_hf_to_megatron", "--hf-dir", small_hf, "--out",
                            out, "--force")
    assert line == (f"convert_hf_to_megatron: {str(out)!r} exists and is not a directory; "
                    "remove it or choose another output path (--force only replaces a "
                    "directory)")
    assert out.read_text() == "not a model"
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # no out.tmp


def _rewrite_header(path, change):
    """Rewrite a safetensors file's JSON header through `change(header)`, data untouched."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


@pytest.mark.parametrize("how,message", [
    ("shape", r"tensor 'model\.norm\.weight': its byte range \[\d+, \d+\] holds \d+ bytes, but "
              r"shape \[65\] in F32 needs 260: a corrupt or lying header"),
    ("overlap", r"starts at byte \d+ of the data, expected \d+ \(overlap between tensors\)"),
    ("truncated", r"truncated \(\d+ bytes, the header needs \d+\)"),
])
def test_a_lying_or_truncated_safetensors_file_is_one_line(small_hf, tmp_path, capsys, how,
                                                           message):
    import re

    path = small_hf / "model.safetensors"
    if how == "shape":
        _rewrite_header(path, lambda h: h["model.norm.weight"].update(shape=[65]))
    elif how == "overlap":
        def shift(h):
            begin, end = h["model.norm.weight"]["data_offsets"]
            h["model.norm.weight"]["data_offsets"] = [begin - 4, end - 4] if begin else [4, end + 4]
        _rewrite_header(path, shift)
    else:
        raw = path.read_bytes()
        path.write_bytes(raw[:-100])
    out = tmp_path / "out"
    for tool, flag in (("convert_hf_to_megatron", "--hf-dir"), ("quantize_fp8", "--src")):
        line = one_line_failure(capsys, tool, flag, small_hf, "--out", out)
        assert str(path) in line and re.search(message, line), line
        assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_missing_input_is_one_line(tmp_path, capsys):
    nope = tmp_path / "nope"
    for tool, flag in (("convert_hf_to_megatron", "--hf-dir"), ("convert_megatron_to_hf", "--ckpt"),
                       ("quantize_fp8", "--src")):
        line = one_line_failure(capsys, tool, flag, nope, "--out", tmp_path / "out")
        assert line.startswith(f"{tool}: {str(nope)!r}: no such directory"), line
    assert os.listdir(tmp_path) == []


def test_a_failed_force_leaves_the_old_output_whole(small_hf, tmp_path, capsys, monkeypatch):
    """A read error midway through a --force conversion: the old output stays as it was, and
    nothing else is left beside it."""
    from megatron_mgrpo.weights import hf_io

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real = hf_io.HFCheckpoint.__getitem__
    calls = {"n": 0}

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk went away")
        return real(self, name)

    monkeypatch.setattr(hf_io.HFCheckpoint, "__getitem__", flaky)
    line = one_line_failure(capsys, "convert_hf_to_megatron", "--hf-dir", small_hf, "--out", out,
                            "--force")
    assert line == "convert_hf_to_megatron: disk went away"
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["hf", "out"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root with mount rights only; skipped elsewhere)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        busy = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
        if busy.returncode != 0:  # a file left open there: detach it anyway, and say so
            subprocess.run(["umount", "-l", str(mount)], check=True)
            pytest.fail(f"a file was left open on the full disk ({busy.stderr.strip()})")


def test_a_full_disk_is_one_line_and_leaves_nothing(small_hf, tmp_path, full_disk, capsys):
    """torch.save reports a full disk as `unexpected pos N vs M`: the tools say what it is."""
    line = one_line_failure(capsys, "convert_hf_to_megatron", "--hf-dir", small_hf, "--out",
                            full_disk / "mcore")
    assert line.startswith(f"convert_hf_to_megatron: {full_disk / 'mcore.tmp'}")
    assert "No space left on device" in line
    tool_main("convert_hf_to_megatron", "--hf-dir", small_hf, "--out", tmp_path / "mcore")
    line = one_line_failure(capsys, "convert_megatron_to_hf", "--ckpt", tmp_path / "mcore",
                            "--out", full_disk / "back")
    assert line == (f"convert_megatron_to_hf: {full_disk / 'back.tmp' / 'model.safetensors'}: "
                    "No space left on device")
    assert os.listdir(full_disk) == []


def test_a_damaged_checkpoint_is_one_line(small_hf, tmp_path, capsys):
    tool_main("convert_hf_to_megatron", "--hf-dir", small_hf, "--out", tmp_path / "mcore")
    dist = tmp_path / "mcore" / "dist_checkpoint"
    victim = max((f for f in os.listdir(dist) if f.endswith(".distcp")),
                 key=lambda f: os.path.getsize(dist / f))
    (dist / victim).write_bytes((dist / victim).read_bytes()[:100])
    line = one_line_failure(capsys, "convert_megatron_to_hf", "--ckpt", tmp_path / "mcore",
                            "--out", tmp_path / "back")
    assert line.startswith(f"convert_megatron_to_hf: {dist}: cannot read "), line
    assert line.endswith("a damaged checkpoint?")
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.tmp").exists()
