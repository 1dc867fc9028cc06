"""kollm.train.reducer on 2 gloo processes: the bucketed all-reduce sums gradients exactly as a plain all-reduce
after the backward pass would, launches its buckets from inside the backward pass (all of them once the first
step has taught it the order gradients arrive in), reduces a parameter
that got no gradient as zeros, and with gradient accumulation reduces only the armed (last) backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kollm.train.reducer import GradReducer

STEPS = 3


class Tied(nn.Module):
    """An embedding whose weight is also the output head, 4 linear layers used in the reverse of their order of
    registration (so the parameters' reverse order is not the order their gradients arrive in), and a parameter
    the forward pass never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        self.unused = nn.Parameter(torch.ones(7))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in reversed(self.layers):
            h = torch.tanh(layer(h))
        return (h @ self.embed.weight.T).logsumexp(-1).sum()


def _batch(rank: int, step: int, micro: int) -> torch.Tensor:
    return torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(100 * rank + 10 * step + micro))


def _worker(rank: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = Tied()
    params = list(model.parameters())
    reducer = GradReducer(params, bucket_mb=4 * 32 * 33 / 2**20)  # about one linear layer per bucket
    launched = []
    grads = []
    for step in range(STEPS):
        for micro in range(2):  # two micro-batches: only the second backward reduces
            if micro == 1:
                reducer.arm()
            model(_batch(rank, step, micro)).backward()
        reducer.finish()
        launched.append(reducer.launch_points)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({"grads": grads, "launched": launched, "buckets": len(reducer.buckets)}, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reducer")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp / "out.pt")), nprocs=2, join=True)
    return torch.load(tmp / "out.pt")


def test_the_sums_equal_a_plain_all_reduce_after_backward(reduced):
    torch.manual_seed(0)
    model = Tied()
    for step in range(STEPS):
        for rank in range(2):  # one process, both ranks' micro-batches: the sum the reducer must produce
            for micro in range(2):
                model(_batch(rank, step, micro)).backward()
        for n, p in model.named_parameters():
            got = reduced["grads"][step][n]
            if p.grad is None:  # never used: reduced as zeros
                assert n == "unused" and torch.equal(got, torch.zeros_like(got))
            else:
                assert torch.allclose(got, p.grad, atol=1e-5), (step, n)
        model.zero_grad(set_to_none=True)


def test_buckets_launch_during_the_backward_pass(reduced):
    """Each bucket holds one layer (weight and bias); the gradients that arrive are those of the layers (2 each)
    and the embedding (1). Listed: how many had arrived when each bucket was launched."""
    first, *later = reduced["launched"]
    assert reduced["buckets"] == 6  # 4 layers, the embedding, the unused parameter
    # the first step's buckets follow the parameters' reverse order: the first bucket is the layer used first in
    # the forward pass, whose gradients arrive last of the layers; the others wait for it
    assert first == [8, 8, 8, 8, 9]
    # later steps use the order gradients arrived in (rank 0's): each layer's bucket starts as soon as its two
    # gradients are in; the unused parameter's bucket (last, on its own) starts at `finish`
    assert later == [[2, 4, 6, 8, 9]] * (STEPS - 1)


def test_buckets_hold_about_25_mb_of_one_dtype():
    params = [nn.Parameter(torch.zeros(2**20)) for _ in range(20)]  # 4 MiB each
    params[10].data = params[10].data.bfloat16()
    reducer = GradReducer(params)
    sizes = [[params[i].dtype for i in b] for b in reducer.buckets]
    assert [len(s) for s in sizes] == [7, 2, 1, 7, 3]  # reverse order: 9 fp32 (7 reach 28 MiB), 1 bf16, 10 fp32
    assert all(len(set(s)) == 1 for s in sizes)
    reducer.remove()
