"""Sibling projections packed into one tensor and run as one matmul in compiled inference graphs
(:mod:`moe_fx.deliver.graph.sibling_linears`): values, names and checkpoints unchanged; the graph's calls of one
input folded while its weights are still read from the model (an in-place update is seen); graphs with gradients
untouched; ``moe_fx.compile`` matches eager."""

from __future__ import annotations

import torch

import moe_fx
from moe_fx.deliver.graph.sibling_linears import fuse_sibling_linears, pack_sibling_linears
from moe_fx.formats.checkpoint import save_checkpoint
from tests.tiny_models import tiny_model


def _model(**overrides):
    torch.manual_seed(0)
    return tiny_model("qwen3_moe", **overrides).eval()


def test_packing_keeps_values_names_and_checkpoints(tmp_path) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = pack_sibling_linears(model)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert groups >= model.config.num_hidden_layers
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[n], t) for n, t in before.items())
    ptr = q.data_ptr()
    assert pack_sibling_linears(model) == groups and q.data_ptr() == ptr  # idempotent: no second copy
    save_checkpoint(model, tmp_path / "out", report=False)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(reloaded.state_dict()[n], t) for n, t in before.items())


def _compiled_with_pass(model, counts):
    def backend(gm, _inputs):
        counts.append(fuse_sibling_linears(gm, model))
        return gm.forward

    return torch.compile(model, backend=backend, fullgraph=True)


def test_fused_graph_reads_the_model_weights() -> None:
    model = _model()
    pack_sibling_linears(model)
    counts = []
    compiled = _compiled_with_pass(model, counts)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        got = compiled(ids).logits
        want = model(ids).logits
        assert counts == [2 * model.config.num_hidden_layers]  # q, k, v -> one call in every layer
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        model.model.layers[0].self_attn.k_proj.weight.mul_(0.5)  # in place: the graph's stacked view sees it
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_unpacked_or_foreign_weights_stay() -> None:
    model = _model()  # not packed: no two weights are adjacent rows of one tensor
    counts = []
    with torch.no_grad():
        _compiled_with_pass(model, counts)(torch.randint(0, model.config.vocab_size, (1, 3)))
    assert counts == [0]


def test_moe_fx_compile_fuses_without_gradients_only(monkeypatch) -> None:
    """``moe_fx.compile``'s backend rewrites graphs traced without gradients (the top-k swap runs, and folds nothing
    on the CPU; q/k/v fold), matching eager; ``fused=False`` and graphs with gradients are left alone."""
    from moe_fx.deliver import compile as compile_module

    model = _model(num_hidden_layers=1)  # one layer: three inductor compiles (one with gradients) are the test's time
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    seen = []
    original = compile_module.InductorBackend.__call__

    def spy(self, gm, inputs):
        out = original(self, gm, inputs)
        seen.append(dict(self.rewrites))
        return out

    swaps = []
    monkeypatch.setattr(compile_module.InductorBackend, "__call__", spy)
    monkeypatch.setattr(compile_module, "replace_topk", lambda gm: swaps.append(gm) or 0)
    with torch.no_grad():
        want = model(ids).logits
        torch._dynamo.reset()
        got = moe_fx.compile(model)(ids).logits
        torch._dynamo.reset()
        moe_fx.compile(model, fused=False)(ids)
    torch._dynamo.reset()
    loss = moe_fx.compile(model, experts_implementation="batched_mm")(ids).logits.logsumexp(-1).mean()  # gradients
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(swaps) == 1 and [s["linear"] for s in seen] == [2 * model.config.num_hidden_layers, 0, 0]
    loss.backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
