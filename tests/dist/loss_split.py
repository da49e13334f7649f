"""2-rank check (torchrun, gloo) for mft_components/loss/, launched by tests/test_loss.py.

- The 2 ranks x 2 micro-batches split of a global batch gives the same step loss, gradients and metrics as the
  single-process reference, for every loss mode (counts really all-reduced over the process group).
- chunked_cross_entropy with a DTensor lm_head weight (sharded on dim 0) matches the plain-tensor result,
  values and gradients.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh

from mft_components.distributed import end_worker
from mft_components.loss import chunked_cross_entropy
from tests.test_loss import ALL_MODES, make_global_batch, make_loss, make_params, reference_loss, token_losses_of


def check_split(rank: int, world: int) -> None:
    micro_batches = make_global_batch(num_micro_batches=4)
    mine = micro_batches[rank::world]
    for mode in ALL_MODES:
        proj, lm_head = make_params()
        loss_fn = make_loss(mode, [0.5, 2.0, 1.0] if mode in ("task", "task_sample") else None)
        counts = loss_fn.step_counts(mine)
        for batch in mine:
            share = loss_fn(token_losses_of(batch, proj, lm_head), batch, counts)
            (share * world).backward()
        for p in (proj, lm_head):  # what FSDP does with the gradients: average over ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        metrics = loss_fn.step_metrics()

        ref_proj, ref_head = make_params()
        ref = reference_loss(micro_batches, ref_proj, ref_head, mode, list(loss_fn.task_weights().values()))
        ref.backward()
        torch.testing.assert_close(torch.tensor(metrics["loss"], dtype=torch.float32), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(proj.grad, ref_proj.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lm_head.grad, ref_head.grad, rtol=1e-5, atol=1e-6)
        total_tokens = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
        assert sum(v for k, v in metrics.items() if k.startswith("tokens/")) == total_tokens


def check_dtensor_weight(world: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (2, 9), generator=g)
    labels[0, :4] = -100
    plain = weight.clone().requires_grad_()
    sharded = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    ref = chunked_cross_entropy(hidden, plain, labels, chunk_size=4)
    (ref_gh,) = torch.autograd.grad(ref.sum(), (hidden,), retain_graph=True)
    ref.sum().backward(inputs=[plain])
    out = chunked_cross_entropy(hidden, sharded, labels, chunk_size=4)
    (gh,) = torch.autograd.grad(out.sum(), (hidden,), retain_graph=True)
    out.sum().backward(inputs=[sharded])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    check_split(rank, world)
    check_dtensor_weight(world)
    dist.barrier()
    if rank == 0:
        print("loss_split OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()
