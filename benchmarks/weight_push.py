"""Weight push throughput to a rollout server, against memcpy bandwidth in the same run.

    python benchmarks/weight_push.py [--model-mb 1000] [--buckets 16,64,256,1024]
                                     [--transports tensor,disk,distributed]

A ~1 GB bf16 Qwen2-style model (random init) is served by `mgrpo serve` in a separate process,
as an SGLang server would be; the SGLang client pushes the full weight set through each
transport and bucket size (streamed, no host copy: one pass, as the trainer does), including
the version handshake around it. Figures: GB/s of tensor data per push (best of `--repeats`),
and that over the bandwidth of one large `copy_` in this process (the memcpy bound: every
transport copies each byte at least once on each side). Prints one JSON object per figure.

On CPU: `tensor` = shared memory named by file (the tensors are cloned before each push, so the
move into shared memory is timed as a trainer's fresh tensors would pay it), measured twice in
the same run: as flattened buckets (`push_tensor_flattened_*`: one uint8 tensor per bucket in
SGLang's `FlattenedTensorBucket` layout, the client's default) and as per-tensor payloads
(`push_tensor_per_tensor_*`: one shared-memory file and pickled tensor per parameter); `disk` =
safetensors written to and read from a temporary directory; `distributed` = a gloo broadcast
over loopback TCP. On a GPU these become CUDA IPC and NCCL with SGLang proper.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def emit(name, value, unit, **extra):
    print(json.dumps({"name": name, "value": round(float(value), 4), "unit": unit, **extra}),
          flush=True)


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_model(directory: str, model_mb: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    # 32 layers of hidden 1024: ~16.8M parameters each, bf16; plus the embedding.
    layers = max(1, (model_mb * 2 ** 20 // 2 - 32000 * 1024) // 16_800_000)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                      tie_word_embeddings=True, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    return named, sum(t.numel() * t.element_size() for _, t in named)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-mb", type=int, default=1000)
    ap.add_argument("--buckets", default="16,64,256,1024", help="bucket sizes in MiB")
    ap.add_argument("--transports", default="tensor,disk,distributed")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from megatron_mgrpo.rollout.servers import launch
    from megatron_mgrpo.rollout.sglang_engine import SGLangEngine
    from megatron_mgrpo.rollout.transports import make_transport
    from megatron_mgrpo.weights.push import bucketize

    work = tempfile.mkdtemp(prefix="push_bench_")
    named, total = build_model(os.path.join(work, "model"), args.model_mb)
    bound = memcpy_gbps(min(total, 1 << 30))
    emit("model_bytes", total / 1e9, "GB")
    emit("memcpy_bandwidth", bound, "GB/s")
    serve = (f"{sys.executable} -m megatron_mgrpo.cli serve --model {{model}} --host {{host}} "
             "--port {port} --dtype bfloat16")
    servers = launch(serve, 1, "127.0.0.1", 0, os.path.join(work, "model"),
                     os.path.join(work, "logs"), 600)
    try:
        variants = []
        for kind in args.transports.split(","):
            variants += [("tensor", "tensor_flattened", True),
                         ("tensor", "tensor_per_tensor", False)] if kind == "tensor" \
                else [(kind, kind, True)]
        for kind, label, flattened in variants:
            for mb in [int(x) for x in args.buckets.split(",")]:
                transport = make_transport(kind, mb * 2 ** 20, os.path.join(work, "pushed"),
                                           backend="gloo", timeout_s=600, flattened=flattened)
                # Separate placement without a host copy: the stream goes straight through.
                engine = SGLangEngine({"policy": servers, "momentum": list(servers)},
                                      transport, host_copy=False, log=lambda _: None)
                best = float("inf")
                for r in range(args.repeats):
                    fresh = [(n, t.clone()) for n, t in named]  # a trainer's new tensors
                    t = _timed(lambda f=fresh, r=r: engine.update_weights(
                        "policy", bucketize(f, mb * 2 ** 20), version=r))
                    best = min(best, t)
                    del fresh
                transport.close()
                gbps = total / best / 1e9
                emit(f"push_{label}_{mb}MB", gbps, "GB/s", tensors=len(named))
                emit(f"push_{label}_{mb}MB_over_memcpy", gbps / bound, "ratio")
    finally:
        for s in servers:
            s.process.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
