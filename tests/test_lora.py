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
