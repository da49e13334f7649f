"""CUDA-only checks of the GPU paths (issue 13); every test skips with its reason on a machine without CUDA.

Run on the GPU machine with ``bash bench/gpu_check.sh`` (docs/gpu.md says how). In bf16 on CUDA:
each packed-attention backend's per-token losses and LoRA gradients match sdpa's; ``auto`` picks flex_attention
and ``compile: auto`` compiles whole layers, whose losses and gradients match eager's with no graph per packing;
QLoRA and activation checkpointing under compile match their eager / unchecked runs; liger-kernel's fused linear
cross entropy and kernels match mft's chunked cross entropy and transformers' modules; a prepared training step
(forward, loss, backward, clipping, the non-finite guard, fused AdamW) never makes the host wait for the device;
and the recipe runs on CUDA with a shipped config's defaults.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only paths of issue 13)")
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="needs liger-kernel (pip install 'mft[gpu]')")

VOCAB = 512
ROW = 256
CUDA = torch.device("cuda")
LORA = {"rank": 8, "alpha": 16, "target_modules": "all-linear"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: the decoder layer's forward is one code object for all of them, and dynamo
    keeps at most 8 graphs per code object (recompile_limit); past that it runs layers eagerly without a word, and
    a later test's 'compiled' run would be an eager one. (torch's on-disk caches still make recompiling cheap.)"""
    import torch._dynamo

    torch._dynamo.reset()
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("gpu") / "llama", family="llama", vocab_size=VOCAB)


def packings(n=4, rows=2, seed=0):
    """Micro-batches of `rows` rows of ROW tokens, each packed differently (one ends in an all-padding row)."""
    from mft_components.data.dataset import Sample
    from mft_components.data.packing import collate, pack_samples

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lengths = rng.integers(5, ROW, size=int(rng.integers(2, 9)))
        samples = [Sample(rng.integers(0, VOCAB, int(k)).astype(np.int32), rng.random(int(k)) < 0.7, j % 2)
                   for j, k in enumerate(lengths)]
        packed = [[samples[j] for j in r] for r in pack_samples(samples, ROW)][:rows]
        out.append(collate(packed + [None] * (rows - len(packed)), pad_to=ROW))
    return out


def build(model_dir, **kwargs):
    from mft_components.models import build_model

    torch.manual_seed(0)
    model = build_model(model_dir, lora=kwargs.pop("lora", LORA), dtype="bf16", device=CUDA, **kwargs)
    # compile: auto lets a run fall back to eager on a compile error; a test comparing compiled with eager must not
    torch._dynamo.config.suppress_errors = False
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so their gradients flow through attention
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, 0.02)
    model.train()
    return model


def losses_and_grads(model, batches, **forward_kwargs):
    from mft_components.models import prepare_batch

    out = []
    for batch in batches:
        token_losses, _ = model(prepare_batch(batch, CUDA, model.config), **forward_kwargs)
        token_losses.float().sum().backward()
        out.append((token_losses.detach().float(),
                    {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return out


def assert_close_bf16(runs, reference):
    """Per-token losses within bf16 rounding of each other, gradients within 5% in norm."""
    for (loss, grads), (ref_loss, ref_grads) in zip(runs, reference):
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
        assert grads.keys() == ref_grads.keys() and grads
        for name, g in grads.items():
            ref = ref_grads[name]
            assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name


def graph_counter():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("attn", ["flex_attention", "varlen_attn", "sdpa_varlen", "eager", "flash_attention_2"])
def test_backends_match_sdpa(model_dir, attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    batches = packings()
    reference = losses_and_grads(build(model_dir, attn_implementation="sdpa", compile=False), batches)
    runs = losses_and_grads(build(model_dir, attn_implementation=attn, compile=False), batches)
    assert_close_bf16(runs, reference)


def test_flex_flash_backend_where_it_runs(model_dir, capsys):
    """Where this torch offers flex_attention's FlashAttention backend (BACKEND=FLASH, flash-attn's CuTe kernels,
    Hopper or Blackwell) and its probe matched the Triton backend, auto uses it: losses and gradients as sdpa's,
    compiled layers included. Elsewhere auto prints why not, and this test skips with that reason."""
    from mft_components.models.attention import flex_flash_options

    options, how = flex_flash_options(CUDA)
    if options is None:
        pytest.skip(f"flex_attention keeps its {how}")
    batches = packings()
    reference = losses_and_grads(build(model_dir, attn_implementation="sdpa", compile=False), batches)
    model = build(model_dir)  # auto, compile: auto
    assert "flex_attention with a block-causal BlockMask per micro-batch, FlashAttention backend" in capsys.readouterr().out
    assert_close_bf16(losses_and_grads(model, batches), reference)


@pytest.mark.parametrize("attn", ["auto", "varlen_attn"])
def test_compiled_layers_match_eager_without_a_graph_per_packing(model_dir, attn, capsys):
    batches = packings(n=5)
    eager = losses_and_grads(build(model_dir, attn_implementation=attn, compile=False), batches)
    graphs = graph_counter()
    model = build(model_dir, attn_implementation=attn)  # compile: auto
    out = capsys.readouterr().out
    if attn == "auto":
        assert "[mft] attention: auto on cuda: flex_attention" in out
    assert model.compile_scope == "layers" and "whole decoder layers" in out
    assert_close_bf16(losses_and_grads(model, batches), eager)
    # layer 0 (input without gradient) and the others, flex's compiled BlockMask construction, and for
    # varlen_attn one dynamic recompile (cu_seqlens change length); a graph per packing would make 10 or more
    assert graphs() <= 4, torch._dynamo.utils.counters["stats"]


@pytest.mark.parametrize("attn", ["auto", "varlen_attn"])
def test_prepared_step_never_waits_for_the_device(model_dir, attn):
    """forward, loss, backward, clipping, the non-finite guard and fused AdamW of a step whose micro-batches came
    through prepare_batch: no CUDA call in it synchronises (torch's sync debug mode raises on the first)."""
    from mft_components.loss import TaskWeightedLoss
    from mft_components.training.guards import NonFiniteGuard
    from mft_components.models import prepare_batch

    model = build(model_dir, attn_implementation=attn)
    loss_fn = TaskWeightedLoss(mode="task")
    loss_fn.setup(["a", "b"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    guard = NonFiniteGuard(optimizer, ["a", "b"])
    assert guard.deferred
    steps = [packings(n=2, seed=s) for s in range(3)]
    for step, host_batches in enumerate(steps, start=1):
        host_batches = [{k: v.pin_memory() for k, v in b.items()} for b in host_batches]  # the loader pins
        waits = "error" if step == 3 else "default"  # steps 1-2 compile and create the optimizer state
        torch.cuda.set_sync_debug_mode(waits)
        try:
            counts = loss_fn.step_counts(host_batches, device=CUDA)
            for batch in [prepare_batch(b, CUDA, model.config) for b in host_batches]:
                token_losses, aux = model(batch, **loss_fn.ce_kwargs)
                loss_fn(token_losses, batch, counts, aux_loss=aux).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            guard.update(step, loss_fn.step_loss(), grad_norm, [b["task_ids"] for b in host_batches])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    guard.check()
    assert torch.isfinite(torch.tensor(loss_fn.step_metrics()["loss"]))


def test_recipe_runs_on_cuda_with_shipped_defaults(tmp_path, request, capsys):
    """configs/llama_lora.yaml as shipped (attention auto, compile auto, fused AdamW with the deferred non-finite
    guard), a tiny Llama, two tiny tasks: the run chooses flex_attention and whole-layer compile, logs finite losses
    and tokens/s, and saves an adapter."""
    import runpy

    import yaml

    from tests.test_recipes import _write_tasks

    tokenizer = REPO_ROOT / ".device" / "tok"
    if not tokenizer.is_dir():
        tokenizer = request.getfixturevalue("smollm2_dir")
    model = make_tiny_model_dir(tmp_path / "model", family="llama", tokenizer_dir=tokenizer)
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "llama_lora.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["model"]["model_dir"] = str(model)
    cfg["tokenizer"]["path"] = str(model)
    cfg["data"].update(data_paths=_write_tasks(tmp_path / "data"), seq_len=128, valid_ratio=0.1)
    cfg.update(max_steps=6, log_every_n_steps=3, eval_every_n_steps=3, save_every_n_steps=None, resume=None,
               tensorboard=False, gradient_accumulation_steps=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    recipe_main = runpy.run_path(str(REPO_ROOT / "recipes" / "lora_finetune_distributed.py"), run_name="gpu")["recipe_main"]
    recipe_main(["--config", str(path)])
    out = capsys.readouterr().out
    assert "[mft] attention: auto on cuda: flex_attention" in out and "[mft] compile: whole decoder layers" in out
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in train)
    assert Path(tmp_path / "out" / "step_6" / "adapter_model.safetensors").is_file()


def test_qlora_compiled_matches_eager(model_dir):
    batches = packings(n=3)
    eager = losses_and_grads(build(model_dir, method="qlora", compile=False), batches)
    compiled = losses_and_grads(build(model_dir, method="qlora"), batches)
    assert_close_bf16(compiled, eager)


def test_selective_checkpointing_under_compile_matches(model_dir):
    """Selective activation checkpointing inside compiled layers (the CPU tests check every mode eagerly)."""
    batches = packings(n=2)
    reference = losses_and_grads(build(model_dir, compile=False), batches)
    assert_close_bf16(losses_and_grads(build(model_dir, activation_checkpointing="selective"), batches), reference)


@needs_liger
@pytest.mark.parametrize("trainable_weight", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_liger_cross_entropy_matches_chunked(trainable_weight, softcap):
    from mft_components.loss import chunked_cross_entropy

    g = torch.Generator(device=CUDA).manual_seed(0)
    hidden = torch.randn(3, 100, 64, device=CUDA, generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(1000, 64, device=CUDA, generator=g) * 0.2).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (3, 100), device=CUDA, generator=g)
    labels[:, :30] = -100
    results = []
    for kernel in ("chunked", "liger"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(trainable_weight)
        losses = chunked_cross_entropy(h, w, labels, chunk_size=64, softcap=softcap, kernel=kernel)
        (losses * torch.linspace(0.5, 1.5, losses.numel(), device=CUDA)).sum().backward()
        results.append((losses.detach(), h.grad.float(), w.grad.float() if trainable_weight else None))
    (loss, gh, gw), (ref, ref_gh, ref_gw) = results[1], results[0]
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    assert (gh - ref_gh).norm() <= 0.02 * ref_gh.norm()
    if trainable_weight:
        assert (gw - ref_gw).norm() <= 0.02 * ref_gw.norm()


@needs_liger
def test_liger_kernels_match_transformers_modules(model_dir):
    batches = packings(n=2)
    reference = losses_and_grads(build(model_dir, compile=False), batches)
    runs = losses_and_grads(build(model_dir, compile=False, liger=True), batches, cross_entropy="liger")
    assert_close_bf16(runs, reference)
