"""LoRALinear against plain torch references: identity at init, merge, NF4 error bounds, PEFT naming."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

from mft_components.models.lora import (
    LoRALinear,
    NF4Linear,
    adapter_to_peft_state_dict,
    get_adapter_state_dict,
    merge_lora_state_dict,
    merge_lora_weights,
    nf4_block_sizes,
    peft_adapter_config,
    peft_to_adapter_state_dict,
    set_trainable_params,
)


def _lora(bias=True, quantize=False, rslora=False):
    torch.manual_seed(0)
    m = LoRALinear(64, 32, rank=4, alpha=8, bias=bias, use_rslora=rslora)
    with torch.no_grad():
        m.weight.copy_(torch.randn(32, 64) * 0.1)
        if bias:
            m.bias.copy_(torch.randn(32))
    if quantize:
        from mft_components.models.lora import quantize_nf4
        m.weight = torch.nn.Parameter(quantize_nf4(m.weight.detach()), requires_grad=False)
    return m


def test_nf4_block_sizes():
    assert nf4_block_sizes(4096 * 4096) == (64, 256)  # real models keep torchao's defaults
    assert nf4_block_sizes(32 * 64) == (64, 4)  # 32 blocks -> 8 shardable scaler blocks
    assert nf4_block_sizes(100) is None


def test_init_is_base_exactly():
    m = _lora()
    x = torch.randn(3, 5, 64)
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))
    assert m.scaling == 2.0 and _lora(rslora=True).scaling == 8 / math.sqrt(4)


def test_forward_formula_and_merge():
    m = _lora()
    torch.nn.init.normal_(m.lora_b.weight)
    x = torch.randn(7, 64)
    ref = F.linear(x, m.weight, m.bias) + m.scaling * (x @ m.lora_a.weight.T @ m.lora_b.weight.T)
    torch.testing.assert_close(m(x), ref)
    seq = torch.nn.Sequential(m)
    merged_sd = merge_lora_state_dict(
        {"0.weight": m.weight.detach(), "0.bias": m.bias.detach()}, get_adapter_state_dict(seq), m.scaling)
    merge_lora_weights(seq)
    assert type(seq[0]) is torch.nn.Linear
    torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_sd["0.weight"], seq[0].weight.detach())


def test_qlora_within_nf4_error_and_grads_reach_adapter():
    plain, q = _lora(), _lora(quantize=True)
    assert isinstance(q.weight, NF4Tensor)
    x = torch.randn(16, 64)
    err = (q(x) - plain(x)).abs().max() / plain(x).abs().max()
    assert 0 < err < 0.1  # 4-bit weights: a few percent
    q.lora_b.weight.data.normal_()
    q(x).square().sum().backward()
    assert q.lora_a.weight.grad is not None and q.lora_b.weight.grad.abs().sum() > 0
    # NF4Linear computes the same base matmul
    n = NF4Linear(64, 32, bias=True)
    n.weight, n.bias = q.weight, q.bias
    torch.testing.assert_close(n(x), q.base_forward(x))


def test_trainable_and_peft_names():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), _lora())
    set_trainable_params(model, "lora")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.lora_a.weight", "1.lora_b.weight"]
    sd = {"hf_model.model.layers.0.self_attn.q_proj.lora_a.weight": torch.zeros(1),
          "hf_model.model.layers.0.self_attn.q_proj.lora_b.weight": torch.ones(1),
          "hf_model.model.norm.weight": torch.ones(1)}
    peft_sd = adapter_to_peft_state_dict(sd)
    assert sorted(peft_sd) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert sorted(peft_to_adapter_state_dict(peft_sd)) == sorted(k.removeprefix("hf_model.") for k in sd if "lora" in k)
    cfg = peft_adapter_config("/m", 4, 8, 0.0, ["v_proj", "q_proj"], use_rslora=True)
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["use_rslora"] is True


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(4, 4, rank=0, alpha=1)


def _frozen_weight_copies(saved: list[torch.Tensor], weights: list[NF4Tensor]) -> list[tuple]:
    """Saved tensors in a floating dtype with the full shape of a frozen NF4 weight (or its transpose): a dense
    copy kept from forward to backward. The NF4 weights themselves (4-bit blocks behind a wrapper of that shape)
    are what QLoRA keeps, and allowed."""
    shapes = {tuple(w.shape) for w in weights} | {tuple(w.shape)[::-1] for w in weights}
    return [(tuple(t.shape), t.dtype) for t in saved
            if not isinstance(t, NF4Tensor) and t.is_floating_point() and tuple(t.shape) in shapes]


@pytest.mark.parametrize("compiled", [False, True])
def test_qlora_keeps_no_dense_weight_for_backward(tmp_path, compiled):
    """QLoRA's frozen NF4 weights are dequantised again in backward, never kept dense from forward to backward,
    eager or with whole decoder layers compiled (aot_eager: AOTAutograd partitions forward and backward as for
    inductor; torchao's linear_nf4 there saved a bf16 copy of every weight). Losses and gradients as eager."""
    from mft_components.models.parallelize import compile_layers
    from mft_components.models import build_model, prepare_batch
    from tests.test_models import _batch, _count_graphs, _randomise_lora_b
    from tests.tiny_models import make_tiny_model_dir
    from tests.tolerances import assert_close_rounding

    model_dir = make_tiny_model_dir(tmp_path / "m", family="llama", vocab_size=1024)
    batch = _batch(rows=2)  # 2 x 12 tokens: no activation of 24 rows has a weight's shape (32, 64 or 128 rows)
    runs = []
    for compile_now in sorted({False, compiled}):
        torch.manual_seed(0)
        model = build_model(model_dir, method="qlora", lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj"]},
                            dtype="bf16", attn_implementation="sdpa")
        _randomise_lora_b(model)
        weights = [p for p in model.parameters() if isinstance(p, NF4Tensor)]
        assert len(weights) == 14  # every decoder linear: LoRA's q_proj bases and NF4Linear elsewhere
        if compile_now:
            graphs = _count_graphs()
            compile_layers(model, whole=True, backend="aot_eager")
        saved = []

        def keep(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            losses, _ = model(prepare_batch(batch, torch.device("cpu"), model.config))
        losses.sum().backward()
        if compile_now:
            assert graphs() >= 1 and sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
        assert saved and _frozen_weight_copies(saved, weights) == []
        runs.append((losses.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (ref_loss, ref_grads) = runs[-1], runs[0]
    assert grads.keys() == ref_grads.keys() and grads
    # bf16 activations: a different fusion may round each intermediate differently, once per layer's reduction
    assert_close_rounding(loss, ref_loss, torch.bfloat16, n=2 * 64)
    for name in grads:
        assert_close_rounding(grads[name], ref_grads[name], torch.bfloat16, n=2 * 64, msg=name)


def test_nf4_linear_matches_dequantised_matmul():
    """nf4_linear: the matmul with torchao's dequantised weight, forward and input gradient, and no weight grad."""
    from mft_components.models.lora import nf4_linear, quantize_nf4

    torch.manual_seed(0)
    weight = quantize_nf4(torch.randn(32, 64, dtype=torch.bfloat16))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = nf4_linear(x, weight)
    ref = F.linear(ref_x, weight.get_original_weight())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)
