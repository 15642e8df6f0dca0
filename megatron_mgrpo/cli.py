"""The `mgrpo` command.

    mgrpo train CONFIG [--resume] [--section.key value ...]   the M-GRPO loop
    mgrpo eval CONFIG [--checkpoint DIR] [--benchmarks a,b] [--section.key value ...]
                              validation accuracy and benchmark scores of a checkpoint
    mgrpo eval [CONFIG] --model HF_DIR --benchmarks math500,aime24,...   an HF model's scores
    mgrpo smoke CONFIG [--section.key value ...]   update steps on a fixed synthetic batch
    mgrpo serve --model HF_DIR [--host H] [--port P]  an SGLang-protocol rollout server (CPU)
    mgrpo plan CONFIG [--gpus N] [--json]          memory per GPU of the layout (does it fit?)
    mgrpo config CONFIG [--section.key value ...]  print the resolved config (YAML)
    mgrpo config --help-fields                     every config field with its docstring

Run under torchrun for more than one process; every rank runs the same command. A config
error is one line on stderr and exit code 2, before torch.distributed or megatron-core is
imported.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_mgrpo.config import Config, ConfigError, dump_config, field_docs, load_config
from megatron_mgrpo.data.prompts import DataError
from megatron_mgrpo.data.tokenizer import TokenizerError
from megatron_mgrpo.errors import CheckpointError, RolloutError, RunStopped

OVERRIDES = """\
config overrides:
  --section.key VALUE, --section.key=VALUE
                        set any config field over the file's value, e.g.
                        --optimizer.lr 1e-5 --rollout.num_policy_rollouts 8
                        --eval.benchmarks '[math500, aime24]' --model.rope_scaling.factor 8;
                        values are YAML (null, true, 1e-5, [a, b], {k: v});
                        `mgrpo config --help-fields` lists every field,
                        `mgrpo config CONFIG [overrides]` prints the result"""


def _world_size() -> Optional[int]:
    import os

    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else 1


def _help_fields() -> str:
    import dataclasses
    import typing

    lines = []
    for f in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[f.name]
        docs = field_docs(section)
        lines.append(f"{f.name}:")
        for sub in dataclasses.fields(section):
            doc = " ".join(docs.get(sub.name, "").split())
            default = (sub.default if sub.default is not dataclasses.MISSING
                       else sub.default_factory())
            lines.append(f"  {sub.name} = {default!r}\n      {doc}")
    return "\n".join(lines)


def _plan(args, overrides: List[str]) -> int:
    import os

    from megatron_mgrpo.plan import format_plan, plan_memory

    shipped = load_config(args.config, overrides, validate=False)
    # The servers a job attaches to are known only once it runs (the slurm launchers pass
    # them): a placeholder lets the rest of the config be checked.
    if shipped.rollout.backend == "sglang" and not (shipped.sglang.urls or shipped.sglang.launch):
        overrides = [*overrides, "--sglang.urls", '["http://rollout-server:30000"]']
    p = shipped.parallel
    gpus = args.gpus or p.num_gpus or int(os.environ.get(
        "WORLD_SIZE", p.tensor_parallel * p.pipeline_parallel * p.context_parallel))
    cfg = load_config(args.config, overrides, world_size=gpus)
    plan = plan_memory(cfg, gpus, args.gpu_memory_gib, args.rollout_servers, args.server_tp)
    print(plan.to_json() if args.json else format_plan(plan))
    for problem in plan.problems():
        print(f"mgrpo plan: does not fit: {problem}", file=sys.stderr)
    return 0 if plan.fits else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mgrpo", description="M-GRPO self-supervised RL on megatron-core",
        epilog="Any config field can be overridden as --section.key value "
               "(see `mgrpo config --help-fields`).")
    sub = parser.add_subparsers(dest="command", required=True)
    with_overrides = dict(epilog=OVERRIDES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train = sub.add_parser("train", help="train with M-GRPO (or srt / ttrl / rlvr)",
                           usage="mgrpo train CONFIG [--resume] [--section.key VALUE ...]",
                           **with_overrides)
    train.add_argument("config", help="YAML config file")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in training.run_dir")
    ev = sub.add_parser("eval", help="validation and benchmark scores (pass@1, maj@k, pass@k) "
                                     "of a checkpoint or an HF model",
                        usage="mgrpo eval [CONFIG] [--checkpoint DIR | --model HF_DIR] "
                              "[--benchmarks a,b] [--section.key VALUE ...]", **with_overrides)
    ev.add_argument("config", nargs="?",
                    help="YAML config file, right after `eval` (optional with --model)")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None,
                        help="checkpoint directory (default: the newest in training.run_dir; "
                             "none there: the model.load weights)")
    source.add_argument("--model", default=None,
                        help="an HF model directory, sampled as it is (no Megatron model)")
    ev.add_argument("--benchmarks", default=None,
                    help="comma-separated benchmarks (sets eval.benchmarks): math500, aime24, "
                         "aime25, gpqa, gpqa_diamond, livecodebench")
    smoke = sub.add_parser("smoke", help="M-GRPO update steps on a fixed synthetic batch",
                           usage="mgrpo smoke CONFIG [--section.key VALUE ...]", **with_overrides)
    smoke.add_argument("config", help="YAML config file")
    srv = sub.add_parser("serve", help="an SGLang-protocol rollout server on the embedded "
                                       "engine (CPU, laptops, tests)")
    srv.add_argument("--model", required=True, help="HF model directory (local files only)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default loopback; 0.0.0.0 exposes it)")
    srv.add_argument("--port", type=int, default=30000)
    srv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    srv.add_argument("--weight-version", default="default",
                     help="the version reported until the first weight update")
    plan = sub.add_parser("plan", help="memory per GPU of a config's layout, before queueing",
                          usage="mgrpo plan CONFIG [--gpus N] [--rollout-servers N] "
                                "[--server-tp N] [--json] [--section.key VALUE ...]",
                          **with_overrides)
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("--gpus", type=int, default=None,
                      help="training GPUs (default: parallel.num_gpus, else WORLD_SIZE, else "
                           "TP x PP x CP)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0,
                      help="memory of one GPU (default 80: H100-80GB)")
    plan.add_argument("--rollout-servers", type=int, default=None,
                      help="SGLang servers (default: sglang.num_servers, else as many as "
                           "sglang.urls or sglang.launch, else 1)")
    plan.add_argument("--server-tp", type=int, default=None,
                      help="GPUs per SGLang server, its --tp (default: sglang.server_tp)")
    plan.add_argument("--json", action="store_true", help="one JSON object instead of text")
    show = sub.add_parser("config", help="print the resolved config",
                          usage="mgrpo config [CONFIG] [--section.key VALUE ...] | "
                                "mgrpo config --help-fields", **with_overrides)
    show.add_argument("config", nargs="?", help="YAML config file")
    show.add_argument("--help-fields", action="store_true",
                      help="list every field with its documentation")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and (len(argv) == 1 or argv[1].startswith("-")):
        # No CONFIG: hold its place, or argparse would take the value of the first
        # `--section.key value` override for it.
        argv.insert(1, "")
    args, overrides = parser.parse_known_args(argv)
    if getattr(args, "config", None) == "":
        args.config = None

    if args.command == "serve":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        import os

        from megatron_mgrpo.rollout.server import CannotListen, serve

        if not os.path.isfile(os.path.join(args.model, "config.json")):
            print(f"mgrpo serve: {args.model} is not an HF model directory (no config.json)",
                  file=sys.stderr)
            return 2
        try:
            serve(args.model, args.host, args.port, args.dtype, args.weight_version)
        except CannotListen as e:
            print(f"mgrpo serve: {e} (is another server on that port? pick one with --port)",
                  file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "plan":
            return _plan(args, overrides)
        if args.command == "config":
            if args.help_fields:
                print(_help_fields())
                return 0
            print(dump_config(load_config(args.config, overrides, world_size=_world_size())),
                  end="")
            return 0
        if getattr(args, "resume", False):
            overrides = [*overrides, "--training.resume", "true"]
        if args.command == "eval":
            if args.config is None and args.model is None:
                parser.error("eval needs a CONFIG, or --model HF_DIR")
            if args.benchmarks is not None:
                names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
                overrides = [*overrides, "--eval.benchmarks", "[" + ", ".join(names) + "]"]
            if args.model is not None:
                import os

                if not os.path.isfile(os.path.join(args.model, "config.json")):
                    raise ConfigError(f"--model: no HF model directory (config.json) at "
                                      f"{args.model!r}")
                overrides = [*overrides, "--model.load", args.model]
        cfg = load_config(args.config, overrides, world_size=_world_size())
        # Everything a config can be refused for, before torch.distributed and megatron-core.
        from megatron_mgrpo.config.preflight import check_run

        if args.command == "eval" and args.model is not None:
            if not cfg.eval.benchmarks:
                raise ConfigError("eval.benchmarks: got []; accepted: benchmarks to run (e.g. "
                                  "--benchmarks math500,aime24)")
        else:
            check_run(cfg, args.command, getattr(args, "checkpoint", None))
        if args.command == "train":
            from megatron_mgrpo.trainer import train

            train(cfg)
            return 0
        if args.command == "eval" and args.model is not None:
            from megatron_mgrpo.evaluation.run import evaluate_model_dir

            evaluate_model_dir(cfg, args.model)
            return 0
        if args.command == "eval":
            from megatron_mgrpo.evaluation.run import evaluate_checkpoint

            evaluate_checkpoint(cfg, args.checkpoint)
            return 0
        if args.command == "smoke":
            from megatron_mgrpo.smoke import run_smoke

            run_smoke(cfg)
            return 0
    except ConfigError as e:
        print(f"mgrpo: config error: {e}", file=sys.stderr)
        return 2
    except (DataError, TokenizerError) as e:
        print(f"mgrpo: data error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"mgrpo: {e}", file=sys.stderr)
        return e.exit_code
    except CheckpointError as e:
        print(f"mgrpo: checkpoint error: {e}", file=sys.stderr)
        return 1
    except RolloutError as e:
        print(f"mgrpo: rollout error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mgrpo: interrupted", file=sys.stderr)
        return 130
    finally:
        # Only where a run set up process groups: importing megatron-core to tear down
        # nothing cost a refused config seconds.
        parallel = sys.modules.get("megatron_mgrpo.parallel")
        if args.command in ("train", "eval", "smoke") and parallel is not None:
            parallel.destroy_parallel()
    return 1


if __name__ == "__main__":  # dist_checkpointing spawns workers: entry points need the guard
    sys.exit(main())
