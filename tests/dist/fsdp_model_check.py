"""torchrun script: FSDP2-sharded build_model gives the single-process loss and adapter gradients.

Usage: torchrun --nproc-per-node 2 tests/dist/fsdp_model_check.py MODEL_DIR=METHOD[,METHOD] ...
Every rank builds the unsharded reference too and compares; rank 0 prints OK. A METHOD ``lora:experts`` /
``qlora:experts`` also puts adapters on the MoE experts and router (expert_lora).
"""

import sys

import torch

from mft_components.distributed import destroy_distributed, end_worker, get_rank, init_distributed
from mft_components.models.lora import get_adapter_state_dict
from mft_components.models.parallelize import gather_state_dict
from mft_components.models import build_model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16).expand(2, 16).contiguous(),
            "sample_ids": torch.zeros_like(ids)}


def main(specs: list[str]) -> None:
    rank, world, device = init_distributed()
    for spec in specs:
        model_dir, methods = spec.rsplit("=", 1)
        for method in methods.split(","):
            check(model_dir, method, rank, world, device)
    destroy_distributed()


def check(model_dir: str, spec: str, rank: int, world: int, device) -> None:
    b = batch()
    method, _, targets = spec.partition(":")
    lora = {"target_modules": ["q_proj", "experts", "router"]} if targets == "experts" else None
    kwargs = {} if method == "full" else {"lora": lora}
    torch.manual_seed(0)
    ref = build_model(model_dir, method=method, dtype="fp32", **kwargs)
    torch.manual_seed(0)
    model = build_model(model_dir, method=method, dtype="fp32", distributed=True, device=device, **kwargs)
    # Give lora_b non-zero values (same on every rank) so gradients reach lora_a too.
    for m in (ref, model):
        torch.manual_seed(5)
        for name, p in m.named_parameters():
            if ".lora_b." in name:
                full = torch.randn(p.shape) * 0.1
                if hasattr(p, "_local_tensor"):
                    from torch.distributed.tensor import distribute_tensor
                    p.data.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
                else:
                    p.data.copy_(full)
    ref_losses, _ = ref(b)
    ref_losses.sum().backward()
    # Split the batch's rows over ranks as the data loader does; FSDP averages gradients, so scale by world.
    local = {k: v[rank::world] for k, v in b.items()}
    losses, _ = model(local)
    (losses.sum() * world).backward()
    total = losses.detach().sum()
    torch.distributed.all_reduce(total)
    assert torch.allclose(total, ref_losses.detach().sum(), rtol=1e-5, atol=1e-5), (total, ref_losses.sum())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads) and grads, (sorted(grads)[:4], sorted(ref_grads)[:4])
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), (n, (grads[n] - ref_grads[n]).abs().max())
    sd = gather_state_dict(model, adapter_only=True)
    if rank == 0:
        ref_sd = {k.removeprefix("hf_model."): v for k, v in get_adapter_state_dict(ref).items()}
        assert set(sd) == set(ref_sd), (sorted(sd)[:3], sorted(ref_sd)[:3])
        for k in sd:
            torch.testing.assert_close(sd[k], ref_sd[k])
        print(f"OK {model_dir} {spec} loss={total.item():.6f} grads={len(grads)}", flush=True)
    else:
        assert sd == {}


if __name__ == "__main__":
    main(sys.argv[1:])
    end_worker()
