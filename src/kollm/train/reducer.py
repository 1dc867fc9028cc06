"""The data-parallel gradient all-reduce, overlapped with the backward pass (the ddp path of kollm.train.loop).

The loop does not use the DistributedDataParallel wrapper (its objectives reach into the decoder and the head
rather than calling the model's forward), so it reduces gradients itself. Waiting for the whole backward pass and
then summing every gradient leaves the network idle while the GPU computes and the GPU idle while the network
sums. `GradReducer` does what DDP's reducer does: the trainable parameters are grouped into buckets of about
`bucket_mb` megabytes, and a bucket's summed all-reduce is launched (asynchronously) as soon as the backward pass
has produced every gradient in it, while the backward pass goes on with the layers below.

Collectives must be issued in the same order on every rank, so buckets are launched strictly in bucket order
(a bucket that is ready waits for the buckets before it). The first buckets follow the reverse order of the
parameters, which is roughly the order gradients arrive in; where it is not (a tied embedding gets its gradient
last, though it comes first), the first step records the order gradients really arrived in, rank 0's order is
broadcast, and the buckets are rebuilt from it for every later step, as DDP does after its first iteration.

With gradient accumulation only the last micro-batch's backward reduces (`arm` before it): the earlier ones
accumulate locally, as under DDP's `no_sync`. Parameters that got no gradient in a step are reduced as zeros
when the step finishes, so every rank issues the same collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _buckets(params: Sequence[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """Indices into `params`, in the given order, cut into runs of at most about `cap_bytes` of one dtype."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i in range(len(params)):
        p = params[i]
        if not buckets or size >= cap_bytes or p.dtype != dtype:
            buckets.append([])
            size, dtype = 0, p.dtype
        buckets[-1].append(i)
        size += p.numel() * p.element_size()
    return buckets


class GradReducer:
    """Sums the gradients of `params` over the default process group while the backward pass runs."""

    def __init__(self, params: Sequence[torch.Tensor], *, bucket_mb: float = 25.0):
        self.params = list(params)
        self.cap = int(bucket_mb * 2**20)
        self.buckets = _buckets(self.params[::-1], self.cap)
        self.buckets = [[len(self.params) - 1 - i for i in b] for b in self.buckets]  # back to indices of params
        self._bucket_of: dict[int, int] = {}
        self._index_buckets()
        self._armed = False
        self._arrivals: list[int] | None = []  # the first step's order of arrival, then None (buckets rebuilt)
        self._missing: list[int] = []
        self._next = 0
        self._work: list[tuple[dist.Work, torch.Tensor, int]] = []
        self._arrived = 0
        self.launch_points: list[int] = []  # per bucket launched inside the backward pass: gradients arrived by then
        index = {id(p): i for i, p in enumerate(self.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, i=index[id(p)]: self._ready(i)) for p in params]

    def _index_buckets(self) -> None:
        self._bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}

    def arm(self) -> None:
        """The next backward pass is the step's last: reduce as gradients arrive."""
        self._armed = True
        self._missing = [len(b) for b in self.buckets]
        self._next = 0
        self._work = []
        self._arrived = 0
        self.launch_points = []

    def _ready(self, i: int) -> None:
        if not self._armed:
            return
        if self._arrivals is not None:
            self._arrivals.append(i)
        self._arrived += 1
        self._missing[self._bucket_of[i]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)
            self.launch_points.append(self._arrived)

    def _launch(self, b: int) -> None:
        grads = [self._grad(i) for i in self.buckets[b]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._work.append((dist.all_reduce(flat, async_op=True), flat, b))
        self._next = b + 1

    def _grad(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def finish(self) -> None:
        """After the last backward: launch what is left (gradients that never came), wait, write the sums back."""
        while self._next < len(self.buckets):
            self._launch(self._next)
        for work, flat, b in self._work:
            work.wait()
            offset = 0
            for i in self.buckets[b]:
                p = self.params[i]
                summed = flat[offset : offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += p.numel()
        self._work = []
        self._armed = False
        if self._arrivals is not None:
            self._rebuild(self._arrivals)
            self._arrivals = None

    def _rebuild(self, arrivals: list[int]) -> None:
        """Buckets in the order gradients arrived (rank 0's order, so that every rank builds the same ones)."""
        order = list(dict.fromkeys(arrivals))
        order += [i for i in reversed(range(len(self.params))) if i not in set(order)]  # never got a gradient
        shared: list[object] = [order]
        dist.broadcast_object_list(shared, src=0)
        order = shared[0]  # type: ignore[assignment]
        self.buckets = [[order[j] for j in b] for b in _buckets([self.params[i] for i in order], self.cap)]
        self._index_buckets()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
