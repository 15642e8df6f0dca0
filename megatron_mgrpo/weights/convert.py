"""HF <-> Megatron conversion, tensor by tensor, with everything checked before a byte is written.

- `convert_hf_to_megatron(hf_dir, out_dir, tp, pp, dtype)`: an HF model directory (Llama 3,
  Qwen2/2.5, Qwen3; safetensors) -> a directory holding the HF `config.json`, the tokenizer
  files and `dist_checkpoint/`, a megatron-core dist checkpoint of the weights that the trainer
  loads at any TP/PP (`model.load: out_dir`). `tp` only chooses how tensors are chunked on disk
  (ranks of that TP read just their own chunks); `pp` is checked against the layer count.
- `export_megatron_to_hf(source, out_dir, model, dtype)`: a training checkpoint (policy or its
  momentum model) or a converted directory -> an HF directory (safetensors shards + index,
  config.json, tokenizer files) that `AutoModelForCausalLM.from_pretrained` loads offline.

Both read one tensor at a time and write it before reading the next (`safetensors_io`,
`dist_checkpoint`), through the same name map as the live weight push (`hf_map`). Output goes to
`<out>.tmp` and is renamed into place only when complete; a failure removes it (and with
`overwrite`, leaves the old output as it was).

Tensors keep the dtype they are stored in (`dtype=None`, the tools' `--dtype source`): a round
trip changes no bit, and a source that mixes dtypes (bf16 weights, fp32 norms) keeps the mix.
A dtype casts every tensor to it. config.json's `torch_dtype` says the dtype that holds most
bytes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_mgrpo.config.schema import ConfigError, ModelConfig
from megatron_mgrpo.weights.files import (ConversionError, copy_tokenizer, staged_dir,
                                          write_json)

DIST_SUBDIR = "dist_checkpoint"
RECORD = "conversion.json"
# The tools' --dtype: "source" keeps every tensor's stored dtype (the default: a round trip
# changes nothing); a dtype name casts every tensor to it.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
DTYPE_CHOICES = ("source", "bf16", "fp32", "fp16", "bfloat16", "float32", "float16")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(text: str) -> Optional[torch.dtype]:
    """A --dtype value: None for "source" (keep), else the dtype it names."""
    if text == "source":
        return None
    if text not in DTYPES:
        raise ConversionError(f"--dtype: got {text!r}; accepted: {' | '.join(DTYPE_CHOICES)}")
    return DTYPES[text]


def _dtype_name(dtypes: Dict[str, torch.dtype], shapes: Dict[str, Tuple[int, ...]]) -> str:
    """config.json's torch_dtype for tensors of these dtypes: the one that holds most bytes
    (all of them, unless the source mixed dtypes)."""
    held: Dict[torch.dtype, int] = {}
    for name, dtype in dtypes.items():
        held[dtype] = held.get(dtype, 0) + math.prod(shapes[name]) * dtype.itemsize
    main = max(held, key=lambda d: held[d])
    return _DTYPE_NAMES.get(main, str(main).replace("torch.", ""))
# Tensors HF checkpoints may carry that are not weights of the model (recomputed at load).
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


# ---- shared ---------------------------------------------------------------------------------

class Progress:
    """A line every ~10% of the bytes, with throughput (long conversions say where they are)."""

    def __init__(self, total_bytes: int, label: str, log: Callable[[str], None]):
        self.total, self.label, self.log = max(total_bytes, 1), label, log
        self.done, self.next_mark, self.t0 = 0, 0.1, time.time()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.done / self.total >= self.next_mark or self.done >= self.total:
            dt = max(time.time() - self.t0, 1e-9)
            self.log(f"[{self.label}] {100 * self.done / self.total:3.0f}%  "
                     f"{self.done / 2 ** 30:.2f} GiB  {self.done / 2 ** 20 / dt:.0f} MiB/s")
            while self.next_mark <= self.done / self.total:
                self.next_mark += 0.1


# ---- HF -> Megatron -------------------------------------------------------------------------

def inspect_hf(hf_dir: str, tp: int = 1, pp: int = 1):
    """(ModelConfig, HFCheckpoint) of an HF directory, after checking that this project can
    convert it at this layout: the architecture, TP against heads, PP against layers, and every
    tensor's presence, shape and dtype against config.json. Raises ConversionError."""
    from megatron_mgrpo.config.schema import Config, ParallelConfig
    from megatron_mgrpo.models.architecture import model_config_from_hf, read_hf_config
    from megatron_mgrpo.weights.hf_io import HFCheckpoint
    from megatron_mgrpo.weights.hf_map import hf_shapes

    if not os.path.exists(hf_dir):
        raise ConversionError(f"{hf_dir!r}: no such directory (give an HF model directory)")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir!r} is not a directory (give an HF model directory)")
    try:
        hf_cfg = read_hf_config(hf_dir)
        _check_supported(hf_cfg)
        m = model_config_from_hf(hf_cfg)
        Config(model=m, parallel=ParallelConfig(tensor_parallel=tp,
                                                pipeline_parallel=pp)).validate()
        hf = HFCheckpoint(hf_dir)
    except ConfigError as e:
        # Say it in the tool's terms: --tp/--pp, not the trainer's config fields.
        message = str(e)
        for field, flag in (("model.load: ", ""), ("model.hf_config: ", ""),
                            ("parallel.tensor_parallel", "--tp"),
                            ("parallel.pipeline_parallel", "--pp"), ("model.num_", "num_")):
            message = message.replace(field, flag)
        raise ConversionError(message) from None
    want = hf_shapes(m)
    missing = [n for n in want if n not in hf]
    if missing:
        raise ConversionError(f"{hf_dir}: tensor {missing[0]!r} is missing"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                              f" for a {m.architecture} model with this config.json")
    extra = [n for n in hf if n not in want and not n.endswith(_IGNORABLE_SUFFIXES)
             and not (n == "lm_head.weight" and m.tie_word_embeddings)]
    if extra:
        raise ConversionError(f"{hf_dir}: tensor {extra[0]!r} is not part of a "
                              f"{m.architecture} model with this config.json (refusing to drop "
                              f"it{f'; {len(extra) - 1} more' if len(extra) > 1 else ''})")
    for name, shape in want.items():
        if hf.shape(name) != shape:
            raise ConversionError(f"{hf_dir}: {name} has shape {list(hf.shape(name))}, but "
                                  f"config.json implies {list(shape)}")
        try:
            is_float = hf.dtype(name).is_floating_point
        except ConfigError as e:
            raise ConversionError(str(e)) from None
        if not is_float:
            raise ConversionError(f"{hf_dir}: {name} has dtype {hf.dtype(name)}, not a float")
    return m, hf


def _check_supported(hf_cfg: Dict) -> None:
    act = hf_cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r} is not supported (accepted: silu)")
    if hf_cfg.get("mlp_bias"):
        raise ConversionError("mlp_bias: true is not supported (Llama 3 / Qwen have none)")
    if hf_cfg.get("use_sliding_window"):
        raise ConversionError("use_sliding_window: true is not supported (full attention only)")


def convert_hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                           dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                           log: Callable[[str], None] = print) -> Dict[str, object]:
    """`dtype` None keeps each tensor's dtype in the source (a fused tensor takes its parts'
    common dtype); a dtype casts every tensor to it."""
    from megatron_mgrpo.weights.dist_checkpoint import write_dist_checkpoint
    from megatron_mgrpo.weights.hf_map import hf_shapes, hf_to_megatron, megatron_shapes

    t0 = time.time()
    m, hf = inspect_hf(hf_dir, tp, pp)
    shapes = megatron_shapes(m)
    # Each Megatron tensor's dtype, from the headers alone (the map run on meta tensors).
    meta = {n: torch.empty(hf.shape(n), dtype=hf.dtype(n), device="meta") for n in hf_shapes(m)}
    dtypes = {name: (t.dtype if dtype is None else dtype)
              for name, t in hf_to_megatron(meta, m)}
    total = sum(math.prod(s) * dtypes[n].itemsize for n, s in shapes.items())
    progress = Progress(total, "hf->megatron", log)

    def load(name: str) -> torch.Tensor:
        ((_, tensor),) = hf_to_megatron(hf, m, names=[name])
        progress.add(tensor.numel() * dtypes[name].itemsize)
        return tensor

    kept = _dtype_name(dtypes, shapes)
    try:
        with staged_dir(out_dir, overwrite) as tmp:
            stats = write_dist_checkpoint(os.path.join(tmp, DIST_SUBDIR), shapes, m.num_layers,
                                          load, dtypes, tp=tp)
            config = dict(_read_json(os.path.join(hf_dir, "config.json")))
            config["torch_dtype"] = config["dtype"] = kept
            write_json(os.path.join(tmp, "config.json"), config)
            copy_tokenizer(hf_dir, tmp)
            record = {"source": os.path.abspath(hf_dir), "direction": "hf->megatron",
                      "format": "megatron-core dist_checkpointing (torch_dist)",
                      "dtype": kept if len(set(dtypes.values())) == 1 else f"mixed, mostly {kept}",
                      "dtype_source": "kept" if dtype is None else "cast",
                      "chunked_for": {"tp": tp, "pp": pp},
                      "architecture": m.architecture, "tensors": stats["tensors"],
                      "bytes": stats["bytes"], "seconds": round(time.time() - t0, 3)}
            write_json(os.path.join(tmp, RECORD), record)
    finally:
        hf.close()
    return record


# ---- Megatron -> HF -------------------------------------------------------------------------

def open_megatron(path: str, model: str = "policy") -> Tuple[str, str, ModelConfig,
                                                           Optional[str], str]:
    """Resolve a run directory (its newest checkpoint), a `checkpoints/step_*` directory or a
    converted directory to (dist checkpoint dir, key prefix, ModelConfig, directory holding
    the tokenizer and the source config.json, description)."""
    from megatron_mgrpo.checkpoint import latest_step, read_trainer_state, step_dir
    from megatron_mgrpo.models.architecture import complete, model_config_from_hf, read_hf_config
    from megatron_mgrpo.weights.dist_checkpoint import PREFIX_MOMENTUM

    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise ConversionError(f"{path!r}: {what} (give a run directory, a checkpoints/step_* "
                              "directory or the output of convert_hf_to_megatron.py)")
    if os.path.isfile(os.path.join(path, DIST_SUBDIR, "metadata.json")):
        if model == "momentum":
            raise ConversionError(f"{path!r} is a converted model: it has no momentum model")
        m = model_config_from_hf(read_hf_config(path))
        return os.path.join(path, DIST_SUBDIR), "", m, path, f"{path} (converted)"
    ckpt = path
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        last = latest_step(path)
        if last is None:
            raise ConversionError(f"no checkpoint in {path!r} (expected a run directory with "
                                  "checkpoints/latest, a checkpoints/step_* directory, or the "
                                  "output of convert_hf_to_megatron.py)")
        ckpt = step_dir(path, last)
    state = read_trainer_state(ckpt)
    if "config" not in state:
        raise ConversionError(f"{ckpt!r} holds no run config (saved by an older version)")
    cfg = _config_from_text(state["config"])
    if model == "momentum" and cfg.algorithm.mode != "mgrpo":
        raise ConversionError(f"the run's mode is {cfg.algorithm.mode!r}: it has no momentum "
                              "model")
    # The architecture saved with the checkpoint: the base directory may have moved since.
    m = (model_config_from_hf(state["hf_config"]) if "hf_config" in state
         else complete(cfg.model))
    prefix = PREFIX_MOMENTUM if model == "momentum" else ""
    return ckpt, prefix, m, cfg.model.load, f"{ckpt} ({model}, step {state['step']})"


def _config_from_text(text: str):
    import tempfile

    from megatron_mgrpo.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name, validate=False)
    finally:
        os.unlink(f.name)


def export_megatron_to_hf(source: str, out_dir: str, model: str = "policy",
                          dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                          shard_bytes: int = 5 * 2 ** 30,
                          log: Callable[[str], None] = print) -> Dict[str, object]:
    """Write the policy (or momentum model) of `source` as an HF directory: safetensors (one
    file, or shards of at most `shard_bytes`), always with `model.safetensors.index.json`.
    `dtype` None keeps each tensor's stored dtype; a dtype casts every tensor to it."""
    from megatron_mgrpo.weights.dist_checkpoint import checkpoint_key
    from megatron_mgrpo.models.architecture import hf_config_dict, read_hf_config
    from megatron_mgrpo.weights.dist_checkpoint import DistCheckpointReader
    from megatron_mgrpo.weights.hf_map import hf_shapes, megatron_shapes, megatron_to_hf_tensors
    from megatron_mgrpo.weights.push import bucketize
    from megatron_mgrpo.weights.safetensors_io import StreamingWriter, nbytes

    t0 = time.time()
    ckpt, prefix, m, source_dir, what = open_megatron(source, model)
    reader = DistCheckpointReader(ckpt, prefix)
    mg_shapes = megatron_shapes(m)
    absent = [n for n in mg_shapes if not reader.has(n)]
    if absent:
        raise ConversionError(f"{ckpt}: no tensor for {absent[0]} "
                              f"({'momentum model' if prefix else 'policy'})")
    # Each HF tensor's dtype: the stored one of the Megatron tensor it comes from, or `dtype`.
    hf_dtype = {}
    for name, shape in mg_shapes.items():
        stored = reader.stored[checkpoint_key(name, prefix)[0]][1]
        for hf_name, _ in megatron_to_hf_tensors(name, torch.empty(shape, device="meta"), m):
            hf_dtype[hf_name] = stored if dtype is None else dtype
    shapes = hf_shapes(m)
    layout = [(n, s, hf_dtype[n]) for n, s in shapes.items()]
    if shard_bytes < 1:
        raise ConversionError(f"shard size: got {shard_bytes} bytes; accepted: > 0")
    shards = list(bucketize(layout, shard_bytes, nbytes=lambda e: nbytes(e[1], e[2])))
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    shard_of = {n: i for i, shard in enumerate(shards) for n, _, _ in shard}
    total = sum(nbytes(s, d) for _, s, d in layout)
    progress = Progress(total, "megatron->hf", log)
    with staged_dir(out_dir, overwrite) as tmp:
        writers = []
        try:
            for f, shard in zip(names, shards):
                writers.append(StreamingWriter(os.path.join(tmp, f), shard))
            for name in mg_shapes:
                vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
                full = reader.read(name, rows=m.vocab_size if vocab else None)
                for hf_name, t in megatron_to_hf_tensors(name, full, m):
                    t = t.to(hf_dtype[hf_name])
                    writers[shard_of[hf_name]].write(hf_name, t)
                    progress.add(t.numel() * t.element_size())
                # Both names would keep this tensor alive through the next (maybe largest) read.
                full = t = None
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:  # no open file left on the disk being cleaned up
                w.discard()
            raise
        # Written for one file too: tools that read the index find every layout the same way.
        write_json(os.path.join(tmp, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total},
                    "weight_map": {n: names[i] for n, i in sorted(shard_of.items())}})
        # Keep the source's other fields (special token ids, ...); ours win on the architecture,
        # which is what the tensors were laid out for.
        config = {}
        if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
            config = read_hf_config(source_dir)
        config.update(hf_config_dict(m))
        kept = _dtype_name(hf_dtype, shapes)
        config["torch_dtype"] = config["dtype"] = kept
        write_json(os.path.join(tmp, "config.json"), config)
        copy_tokenizer(source_dir, tmp)
    return {"source": what, "tensors": len(layout), "bytes": total, "shards": len(shards),
            "dtype": kept if len(set(hf_dtype.values())) == 1 else f"mixed, mostly {kept}",
            "seconds": round(time.time() - t0, 3)}


def _read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)
