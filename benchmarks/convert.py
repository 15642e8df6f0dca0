"""Weight conversion: throughput against plain safetensors reads, peak RSS against the largest
tensor (issue 4).

    python benchmarks/convert.py [--layers 6] [--hidden 2048] [--keep DIR]

Builds a synthetic Llama checkpoint (random bf16 tensors under HF names, two safetensors shards
and an index; about 0.8 GB at the defaults) and, each in a fresh process so peak RSS is its
own, times the tasks below; then again at twice the depth, same largest tensor, to show that
peak memory does not follow the model size:

  read        every tensor through safetensors.safe_open (the plain-read baseline)
  copy        the same files copied (shutil.copyfile): the floor for anything that reads and
              writes every byte once
  hf->mg      tools/convert_hf_to_megatron.py's function (dist checkpoint, bf16, TP=1)
  mg->hf      tools/convert_megatron_to_hf.py's function (safetensors shards, bf16)

Files are read once beforehand so every figure is measured against the page cache, not the
disk. Peak RSS is the child's high-water mark (VmHWM, restarted after its imports of torch and
megatron-core) minus its RSS at that point.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 32000


def hf_config(layers: int, hidden: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
            "num_key_value_heads": max(hidden // 512, 1), "head_dim": 128,
            "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}


def hf_shapes(c: dict) -> dict:
    """Written out by hand from transformers' LlamaForCausalLM, not from our own map."""
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)})
    return shapes


def write_synthetic(path: str, layers: int, hidden: int) -> int:
    """Two shards plus an index, as `save_pretrained` lays them out; returns the total bytes."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = hf_config(layers, hidden)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    names = list(hf_shapes(cfg).items())
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    files = [f"model-{k + 1:05d}-of-00002.safetensors" for k in range(2)]
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for fname, part in zip(files, halves):
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in part}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def warm_page_cache(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    # ru_maxrss survives exec (it would report the parent's peak); VmHWM is per address space
    # and writing 5 to clear_refs restarts it from the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(task: str, src: str, dst: str) -> None:
    """One measurement in this (fresh) process; prints a JSON result line."""
    # Their import cost belongs to the baseline, not to the task.
    for module in ("torch", "megatron.core"):
        importlib.import_module(module)
    from safetensors import safe_open

    from megatron_mgrpo.weights.convert import convert_hf_to_megatron, export_megatron_to_hf

    _reset_peak_rss()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if task == "read":
        with open(os.path.join(src, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        nbytes = 0
        for fname in files:
            with safe_open(os.path.join(src, fname), framework="pt") as f:
                for name in f.keys():
                    # get_tensor maps the file; clone() makes the read real, as ours is.
                    t = f.get_tensor(name).clone()
                    nbytes += t.numel() * t.element_size()
                    del t
    elif task == "copy":
        os.makedirs(dst)
        nbytes = 0
        for fname in sorted(os.listdir(src)):
            if fname.endswith(".safetensors"):
                shutil.copyfile(os.path.join(src, fname), os.path.join(dst, fname))
                nbytes += os.path.getsize(os.path.join(dst, fname))
    elif task == "hf->mg":
        nbytes = convert_hf_to_megatron(src, dst, log=lambda _: None)["bytes"]
    elif task == "mg->hf":
        nbytes = export_megatron_to_hf(src, dst, log=lambda _: None)["bytes"]
    else:
        raise SystemExit(f"unknown task {task!r}")
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "peak_rss_bytes": (peak - base) * 1024}))


def measure(task: str, src: str, dst: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, src, dst],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_all(work: str, layers: int, hidden: int) -> dict:
    """Build (or reuse) a synthetic checkpoint in `work` and measure every task on it."""
    hf, mg, back, copy = (os.path.join(work, d) for d in ("hf", "megatron", "hf_back", "copy"))
    for d in (mg, back, copy):
        shutil.rmtree(d, ignore_errors=True)
    if not os.path.isfile(os.path.join(hf, "model.safetensors.index.json")):
        write_synthetic(hf, layers, hidden)
    largest = max(math.prod(s) for s in hf_shapes(hf_config(layers, hidden)).values()) * 2
    warm_page_cache(hf)
    results = {"largest": largest, "read": measure("read", hf), "copy": measure("copy", hf, copy),
               "hf->mg": measure("hf->mg", hf, mg)}
    warm_page_cache(mg)
    results["mg->hf"] = measure("mg->hf", mg, back)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--keep", default="", help="work in this directory and keep it")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    work = args.keep or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    try:
        runs = {depth: run_all(os.path.join(work, f"L{depth}"), depth, args.hidden)
                for depth in (args.layers, 2 * args.layers)}
        base, deep = runs[args.layers], runs[2 * args.layers]
        largest = base["largest"]
        mib_s = {k: r["bytes"] / r["seconds"] / 2 ** 20 for k, r in base.items() if k != "largest"}
        figures = [
            ("convert.model_size", base["read"]["bytes"] / 2 ** 30, "GiB", None),
            ("convert.largest_tensor", largest / 2 ** 20, "MiB", None),
            ("convert.safetensors_read_throughput", mib_s["read"], "MiB/s", None),
            ("convert.file_copy_throughput", mib_s["copy"], "MiB/s", None),
            ("convert.hf_to_megatron_throughput", mib_s["hf->mg"], "MiB/s", None),
            ("convert.megatron_to_hf_throughput", mib_s["mg->hf"], "MiB/s", None),
            ("convert.hf_to_megatron_vs_read", mib_s["hf->mg"] / mib_s["read"], "ratio", None),
            ("convert.megatron_to_hf_vs_read", mib_s["mg->hf"] / mib_s["read"], "ratio", None),
            ("convert.hf_to_megatron_vs_copy", mib_s["hf->mg"] / mib_s["copy"], "ratio", None),
            ("convert.megatron_to_hf_vs_copy", mib_s["mg->hf"] / mib_s["copy"], "ratio", None),
            ("convert.safetensors_read_peak_rss_over_largest_tensor",
             base["read"]["peak_rss_bytes"] / largest, "ratio", None),
            ("convert.hf_to_megatron_peak_rss_over_largest_tensor",
             base["hf->mg"]["peak_rss_bytes"] / largest, "ratio", "<= 4"),
            ("convert.megatron_to_hf_peak_rss_over_largest_tensor",
             base["mg->hf"]["peak_rss_bytes"] / largest, "ratio", "<= 4"),
            # Twice the layers, same largest tensor: a streaming converter's peak stays put.
            ("convert.hf_to_megatron_peak_rss_double_depth_over_base",
             deep["hf->mg"]["peak_rss_bytes"] / base["hf->mg"]["peak_rss_bytes"], "ratio", None),
            ("convert.megatron_to_hf_peak_rss_double_depth_over_base",
             deep["mg->hf"]["peak_rss_bytes"] / base["mg->hf"]["peak_rss_bytes"], "ratio", None),
        ]
        for name, value, unit, goal in figures:
            line = {"name": name, "value": round(value, 3), "unit": unit}
            if goal:
                line["goal"] = goal
            print(json.dumps(line), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
