"""The captured step (one CUDA graph) gives the eager step's losses and B, and a graph kept
for a model's next rounds gives what a fresh capture would.

The capture itself needs a GPU: those tests are skipped on CPU CI. The warm-up's undo,
which makes the first replay the first step, and the kept step's reset in place (moments,
step counts, the lr tensor) and reuse rules are checked on the CPU too. Only torch,
transformers and seedlora are imported (and pydantic, for the one test of client.local),
so the file runs on a GPU box without Flower (`pytest --noconftest tests/test_capture.py`).
"""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from seedlora import inject, load_trainable_state, set_chain_index, trainable_state
from seedlora.capture import (
    CapturedStep,
    KeptStep,
    Layout,
    _restore,
    _snapshot,
    forget,
    kept_for,
    kept_step,
)
from seedlora.grouped import group_siblings, ungroup

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU"
)


def tiny_qwen(device: str, kind: str) -> torch.nn.Module:
    """A 2-block Qwen2 (biases on q/k/v), adapted on every projection, grouped."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    inject(model, TARGETS, kind=kind, seed=1, rank=4, alpha=8.0)
    group_siblings(model)
    return model.train()


def test_restore_undoes_warmup_steps():
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1)
    before = _snapshot([p], opt)
    start = p.detach().clone()
    for _ in range(2):
        p.grad = torch.ones(5)
        opt.step()
    assert not torch.equal(p.detach(), start)
    _restore(before, [p], opt)
    torch.testing.assert_close(p.detach(), start, rtol=0, atol=0)
    state = opt.state[p]
    assert float(state["step"]) == 0 and state["exp_avg"].abs().sum() == 0
    # the next step is a fresh AdamW's first step
    fresh = torch.nn.Parameter(start.clone())
    fresh_opt = torch.optim.AdamW([fresh], lr=0.1)
    for q, o in ((p, opt), (fresh, fresh_opt)):
        q.grad = torch.full((5,), 0.5)
        o.step()
    torch.testing.assert_close(p.detach(), fresh.detach(), rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("kind", ["gaussian", "circulant", "random-block"])
def test_captured_step_matches_eager(kind):
    eager = tiny_qwen("cuda", kind)
    graphed = copy.deepcopy(eager)
    ids = [torch.randint(128, (2, 16), device="cuda", generator=None) for _ in range(4)]

    def adamw(model, capturable):
        params = [p for p in model.parameters() if p.requires_grad]
        return params, torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=capturable)

    params, opt = adamw(eager, False)
    want = []
    for batch in ids:
        opt.zero_grad(set_to_none=True)
        loss = eager(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        want.append(loss.detach())
    g_params, g_opt = adamw(graphed, True)
    step = CapturedStep(
        lambda b: graphed(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
        g_params,
        g_opt,
        {"input_ids": ids[0]},
        before_step=lambda: torch.nn.utils.clip_grad_norm_(g_params, 0.5),
    )
    assert step.fits({"input_ids": ids[1]}) and not step.fits({"input_ids": ids[0][:1]})
    got = [step({"input_ids": batch}).clone() for batch in ids]
    torch.cuda.synchronize()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for p, q in zip(params, g_params, strict=True):
        assert q.abs().sum() > 0
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tensor_adamw(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer:
    """What client.local gives a kept step: fused, capturable, the lr a float32 tensor."""
    lr = torch.tensor(1.0, device=device)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=True, capturable=True)


@pytest.mark.parametrize("lr", [2.0**-7, 1e-2])
def test_a_kept_adamw_begun_again_steps_like_a_fresh_one(lr):
    """Each round `begin` zeroes the moments and step counts in place and writes the lr
    into its tensor, so the kept optimizer steps like a fresh AdamW with a float lr:
    bitwise when lr is a float32 number, else within lr's float32 rounding."""
    torch.manual_seed(0)
    start = [torch.randn(6, 3), torch.randn(4)]
    grads = [[torch.randn_like(s) for s in start] for _ in range(3)]
    params = [nn.Parameter(s.clone()) for s in start]
    opt = tensor_adamw(params, "cpu")
    kept = KeptStep(params, opt, "config", Layout(nn.ParameterList(params)))
    for rnd, rnd_lr in enumerate([lr, lr / 4]):
        received = [s + rnd for s in start]  # the state a client receives, loaded in place
        with torch.no_grad():
            for p, r in zip(params, received, strict=True):
                p.copy_(r)
        kept.begin(rnd_lr)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(rnd_lr, rel=1e-7)
        fresh = [nn.Parameter(r.clone()) for r in received]
        fresh_opt = torch.optim.AdamW(fresh, lr=rnd_lr, weight_decay=0.1, fused=True)
        for g in grads:
            for ps, o in ((params, opt), (fresh, fresh_opt)):
                for p, gi in zip(ps, g, strict=True):
                    p.grad = gi.clone()
                o.step()
        for p, q, r in zip(params, fresh, received, strict=True):
            assert not torch.equal(p.detach(), r)  # it trained
            if lr == 2.0**-7:
                assert torch.equal(p.detach(), q.detach())
            else:
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_a_kept_step_needs_a_tensor_lr():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr as a tensor"):
        KeptStep([p], torch.optim.AdamW([p], lr=0.1), "config", Layout(nn.ParameterList([p])))


def test_a_kept_step_is_reused_until_what_its_graph_reads_changes():
    model = tiny_qwen("cpu", "gaussian")
    params = trained(model)
    made = []

    def optimizer():
        made.append(tensor_adamw(params, "cpu"))
        return made[-1]

    kept = kept_step(model, "config", params, optimizer)
    assert kept_for(model) is kept and kept.optimizer is made[0]
    group_siblings(model)  # client.local groups every round: the groups stay
    load_trainable_state(model, {k: v + 1 for k, v in trainable_state(model).items()})
    assert kept_step(model, "config", params, optimizer) is kept and len(made) == 1
    frozen = next(p for p in model.parameters() if not p.requires_grad)

    def regroup():
        ungroup(model)
        group_siblings(model)

    changes = {
        "config": lambda: None,
        "regrouped": regroup,
        "moved": lambda: setattr(frozen, "data", frozen.data.clone()),
        "new link": lambda: set_chain_index(model, 1),
    }
    for name, change in changes.items():
        change()
        config = "other" if name == "config" else "config"
        again = kept_step(model, config, params, optimizer)
        assert again is not kept, name
        assert kept_step(model, config, params, optimizer) is again, name
        kept = again
    assert len(made) == 1 + len(changes)
    other = copy.deepcopy(model)
    assert kept_step(other, "other", trained(other), optimizer) is not kept
    assert kept_for(model) is kept  # one kept step per model
    forget(model)
    assert kept_for(model) is None


def test_a_kept_step_goes_with_its_model():
    """The registry holds models weakly and a kept step holds no path back to its model,
    so a dropped model (a new link, a private copy) frees its graph and optimizer."""
    model = tiny_qwen("cpu", "circulant")
    params = trained(model)
    kept_step(model, "config", params, lambda: tensor_adamw(params, "cpu"))
    model_ref, kept_ref = weakref.ref(model), weakref.ref(kept_for(model))
    del model
    gc.collect()
    assert model_ref() is None and kept_ref() is None


@cuda
@pytest.mark.parametrize("lr", [2.0**-7, 1e-2])
def test_fused_adamw_with_a_tensor_lr_steps_as_with_a_float_lr(lr):
    torch.manual_seed(0)
    start = torch.randn(64, 8, device="cuda")
    params = [nn.Parameter(start.clone()) for _ in range(2)]
    opts = [
        torch.optim.AdamW([p], lr=x, weight_decay=0.1, fused=True, capturable=True)
        for p, x in zip(params, (lr, torch.tensor(lr, device="cuda")), strict=True)
    ]
    for _ in range(4):
        grad = torch.randn_like(start)
        for p, o in zip(params, opts, strict=True):
            p.grad = grad.clone()
            o.step()
    float_lr, tensor_lr = (p.detach() for p in params)
    assert not torch.equal(float_lr, start)
    if lr == 2.0**-7:
        assert torch.equal(tensor_lr, float_lr)
    else:
        torch.testing.assert_close(tensor_lr, float_lr, rtol=1e-6, atol=1e-7)


def lm_loss(model: nn.Module):
    return lambda b: model(input_ids=b["input_ids"], labels=b["input_ids"]).loss


def replay(step: CapturedStep, batches: list[torch.Tensor]) -> torch.Tensor:
    losses = torch.stack([step({"input_ids": b}).clone() for b in batches])
    torch.cuda.synchronize()
    return losses


@cuda
@pytest.mark.parametrize("kind", ["gaussian", "random-block"])
def test_a_kept_graph_replays_the_next_round_as_a_fresh_capture_would(kind):
    """Round 2 of a link: new B loaded in place, moments reset, a new lr; no capture, and
    the losses and B of a fresh capture with a fresh float-lr AdamW. A new link (new A)
    captures again."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = [torch.randint(128, (2, 16), device="cuda", generator=gen) for _ in range(3)]
    first = {"input_ids": ids[0]}
    model = tiny_qwen("cuda", kind)
    params = trained(model)

    def clip(ps):
        return lambda: torch.nn.utils.clip_grad_norm_(ps, 0.5)

    kept = kept_step(model, "config", params, lambda: tensor_adamw(params, "cuda"))
    kept.begin(1e-2)
    step = kept.ready(lm_loss(model), first, clip(params))
    replay(step, ids)
    torch.manual_seed(1)
    received = {k: 0.01 * torch.randn_like(v) for k, v in trainable_state(model).items()}
    load_trainable_state(model, received)
    assert kept_step(model, "config", params, lambda: tensor_adamw(params, "cuda")) is kept
    kept.begin(2.0**-8)
    assert kept.ready(lm_loss(model), first, clip(params)) is step and kept.captures == 1
    got = replay(step, ids)

    fresh = tiny_qwen("cuda", kind)
    load_trainable_state(fresh, received)
    f_params = trained(fresh)
    f_opt = torch.optim.AdamW(f_params, lr=2.0**-8, weight_decay=0.1, fused=True, capturable=True)
    want = replay(
        CapturedStep(lm_loss(fresh), f_params, f_opt, first, before_step=clip(f_params)), ids
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(trainable_state(model).items(), f_params, strict=True):
        assert not torch.equal(p, received[name].to(p))  # it trained
        torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-5)

    set_chain_index(model, 1)  # a new link: another A, B zeroed
    new = kept_step(model, "config", params, lambda: tensor_adamw(params, "cuda"))
    new.begin(1e-2)
    assert new is not kept and new.ready(lm_loss(model), first, clip(params)) is not step
    assert new.captures == 1 and torch.isfinite(replay(new.step, ids)).all()


class CausalLM:
    @staticmethod
    def loss(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


@cuda
def test_train_captures_once_per_model_and_its_second_round_equals_a_fresh_one():
    pytest.importorskip("pydantic", reason="client.local's RunConfig needs pydantic")
    from client import local
    from contract.config import RunConfig

    cfg = RunConfig.from_flower(
        {"step-mode": "graphed", "device": "cuda", "local-steps": 3, "batch-size": 2}
    )
    ids = torch.randint(128, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row} for row in ids]
    device = torch.device("cuda")
    model = tiny_qwen("cuda", "circulant")
    local.train(model, CausalLM(), data, cfg, device, data_seed=1, lr=1e-2)
    assert kept_for(model).captures == 1
    torch.manual_seed(1)
    received = {k: 0.01 * torch.randn_like(v) for k, v in trainable_state(model).items()}
    load_trainable_state(model, received)
    got = local.train(model, CausalLM(), data, cfg, device, data_seed=2, lr=3e-3)
    assert kept_for(model).captures == 1  # round 2 replayed round 1's graph

    fresh = tiny_qwen("cuda", "circulant")
    load_trainable_state(fresh, received)
    want = local.train(fresh, CausalLM(), data, cfg, device, data_seed=2, lr=3e-3)
    assert kept_for(fresh).captures == 1
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    for (name, p), q in zip(
        trainable_state(model).items(), trainable_state(fresh).values(), strict=True
    ):
        assert not torch.equal(p, received[name].to(p))
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
