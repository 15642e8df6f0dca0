"""The KL term: the reference model (the frozen base, laid out like the policy) against
transformers' own model of the same weights, the `kl` metric at TP=2 and PP=2 against TP=1 (and
the momentum model as the reference at DP=2 against DP=1), and the loss against a hand value."""

import math
import os

import pytest
import torch

from tests.distributed import run_workers
from tests.test_hf_reference import ARCHS, dense_reference, hf_model


def reference_worker(model_dir, tp, pp, ids):
    from megatron_mgrpo.config.schema import (AlgorithmConfig, Config, ModelConfig,
                                              ParallelConfig)
    from megatron_mgrpo.session import Session

    cfg = Config(model=ModelConfig(load=model_dir),
                 parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                         micro_batch_size=2),
                 algorithm=AlgorithmConfig(kl_coef=0.1))
    with Session(cfg, "smoke") as session:
        assert session.reference_model is not None and session.reference_model.optimizer is None
        assert not any(p.requires_grad for p in session.reference_model.parameters())
        before = session.reference_logprobs(ids)
        with torch.no_grad():  # the policy moves; the reference must not
            for p in session.policy.parameters():
                p.add_(0.05)
        after = session.reference_logprobs(ids)
        policy_lp, _ = session.policy.logprobs_global({"input_ids": ids})
        return before, after, policy_lp


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_reference_logprobs_are_transformers_logprobs_of_the_base(tmp_path, layout):
    kw = ARCHS["qwen3"]
    model = hf_model(kw, seed=3)
    model.save_pretrained(str(tmp_path))
    ids = torch.randint(0, kw["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))
    want, _ = dense_reference(model, ids)
    tp, pp = layout
    for before, after, policy_lp in run_workers(reference_worker, tp * pp, str(tmp_path), tp, pp,
                                                ids):
        torch.testing.assert_close(before, want, atol=2e-5, rtol=1e-5)
        assert torch.equal(after, before)
        assert (policy_lp - want).abs().max() > 1e-2  # the policy did move


def smoke_config_for(base):
    """examples/tiny/smoke.yaml without its architecture: the base's config.json gives it."""
    import yaml

    with open("examples/tiny/smoke.yaml") as f:
        raw = yaml.safe_load(f)
    raw["model"] = {"params_dtype": raw["model"].get("params_dtype", "fp32")}
    path = os.path.join(base, f"smoke_{os.getpid()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def smoke_worker(base, extra):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.smoke import run_smoke

    cfg = load_config(smoke_config_for(base),
                      ["--model.load", base, "--training.steps", "3",
                       "--training.run_dir", "/tmp/mgrpo-kl-test",
                       "--parallel.micro_batch_size", "8", "--algorithm.kl_coef", "0.05",
                       *extra])
    return run_smoke(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base model to start from (megatron's random init differs between PP=1 and PP=2)."""
    out = str(tmp_path_factory.mktemp("kl_base"))
    hf_model(ARCHS["qwen3"], seed=4).save_pretrained(out)
    return out


def smoke_in_turn(base, extras):
    """Several smoke runs one after another in the same process(es), a Session each."""
    return [smoke_worker(base, extra) for extra in extras]


@pytest.fixture(scope="module")
def tp1(base):
    refs = ("base", "momentum")
    (runs,) = run_workers(smoke_in_turn, 1, base, [["--algorithm.kl_reference", ref]
                                                   for ref in refs])
    return dict(zip(refs, runs))


TWO_PROCESSES = {
    "base-tp2": ("base", ["--parallel.tensor_parallel", "2"]),
    "base-pp2": ("base", ["--parallel.pipeline_parallel", "2"]),
    # DP=2: the EMA sharded
    "momentum-dp2": ("momentum", ["--parallel.use_distributed_optimizer", "true"]),
}


@pytest.fixture(scope="module")
def two_processes(base):
    """The three layouts' runs, one after another in the same two processes."""
    ranks = run_workers(smoke_in_turn, 2, base, [["--algorithm.kl_reference", ref, *layout]
                                                 for ref, layout in TWO_PROCESSES.values()])
    return {name: [runs[i] for runs in ranks] for i, name in enumerate(TWO_PROCESSES)}


@pytest.mark.parametrize("layout", list(TWO_PROCESSES))
def test_kl_metric_at_two_processes_equals_tp1(tp1, two_processes, layout):
    want = tp1[TWO_PROCESSES[layout][0]]
    # Step 1 scores the batch with the weights the reference starts from: KL 0; then it grows.
    assert want[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < want[1]["kl"] < want[2]["kl"]
    for run in two_processes[layout]:
        for got, w in zip(run, want):
            assert got["kl"] == pytest.approx(w["kl"], rel=2e-3, abs=1e-9), got["step"]
            assert got["loss"] == pytest.approx(w["loss"], rel=2e-4, abs=2e-5), got["step"]


def test_the_two_references_differ_as_they_should(tp1):
    """The momentum model trails the policy by (1 - m) of its moves, the base not at all: the
    KL to the momentum model is the smaller one."""
    base, momentum = tp1["base"], tp1["momentum"]
    assert momentum[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < momentum[2]["kl"] < base[2]["kl"]


def test_the_policy_loss_with_kl_equals_the_hand_computed_value():
    """make_loss_fn on one fixed microbatch (3 completion tokens of 4, ratio 1, advantage 0.5,
    kl_coef 0.1): per token -A + 0.1 * (exp(d) - d - 1), d = ref - logp."""
    from megatron_mgrpo.config.schema import AlgorithmConfig
    from megatron_mgrpo.update import make_loss_fn

    logp = torch.tensor([[-9.0, -1.0, -2.0, -0.5]])
    micro = {"loss_mask": torch.tensor([[0.0, 1.0, 1.0, 1.0]]),
             "advantages": torch.tensor([0.5]), "old_logprobs": logp.clone(),
             "ref_logprobs": torch.tensor([[0.0, -1.5, -2.0, 0.0]])}
    loss_sum, n, metrics = make_loss_fn(AlgorithmConfig(kl_coef=0.1))(logp, None, micro)
    kl = [math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.5) - 0.5 - 1]  # 0.106531, 0, 0.148721
    assert float(loss_sum) == pytest.approx(3 * -0.5 + 0.1 * sum(kl), abs=1e-6)  # -1.474475
    assert float(n) == 3
    assert float(metrics["kl"]) == pytest.approx(sum(kl), abs=1e-6)  # a sum, per token mean / n
