"""The captured step (one CUDA graph) gives the eager step's losses and B.

The capture itself needs a GPU: those tests are skipped on CPU CI. The warm-up's undo,
which makes the first replay the first step, is checked on the CPU too. Only torch,
transformers and seedlora are imported, so the file runs on a GPU box without Flower
(`pytest --noconftest tests/test_capture.py`).
"""

import copy

import pytest
import torch

from seedlora import inject
from seedlora.capture import _restore, _snapshot
from seedlora.grouped import group_siblings

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
    from seedlora.capture import CapturedStep

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
