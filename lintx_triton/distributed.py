r"""Context parallelism: one long sequence split across the ranks of a ``torch.distributed`` group.

Rank i of ``group`` (``dist.get_rank(group) == i``) holds the i-th contiguous shard of the sequence:
``q, k, v [B, T_i, H, *]`` are positions ``[T_0 + ... + T_{i-1}, T_0 + ... + T_i)`` of the whole.
The shards may have different lengths (``T_i = 0`` included); B, H, D, DV, the feature map and every
other argument must be the same on every rank. Per call:

1. every rank runs :func:`lintx_triton.linear_attention` on its shard from a zero state (rank 0 from
   the global ``initial_state``) and keeps only the final state ``X_i = (S, z)``, [B, HKV, M, DV] and
   [B, HKV, M] in fp32 (HKV = k's heads: grouped-query heads share a state): B HKV M (DV + 1) numbers,
   independent of T;
2. one ``all_gather`` of the flattened states; rank i forms its exclusive prefix
   ``P_i = X_0 + ... + X_{i-1}`` (``P_0`` = the initial state) and the total ``X_0 + ... + X_{W-1}``
   (the global final state, for ``return_state``);
3. every rank runs :func:`lintx_triton.linear_attention` on its shard again with ``initial_state=P_i``:
   exactly the output of one call over the whole sequence, up to the order of fp32 sums.

The backward mirrors it: gradients flow into ``P_i`` and the total, one ``all_gather`` of
``(dP_r, dTotal_r)`` per call, and rank j receives ``dX_j = sum_{r > j} dP_r + sum_r dTotal_r``, the
state gradient of every later position; the global ``initial_state`` gets its whole gradient on rank 0.

Cost: step 1 is :func:`lintx_triton.linear_attention_state`: the chunk sums of phi(k)^T v and phi(k)
and their scan, no queries and no output; its backward is one per-token kernel for dk, dv. Step 3 is
a full call. Plus two small collectives (a third, tiny one with ``check=True``).

Not supported: ``causal=False`` (the global sum of states would have to be added to a non-causal call,
which :func:`lintx_triton.linear_attention` does not take as ``initial_state``); packed sequences
(``cu_seqlens``), whose state must not flow across sequence boundaries. Both raise ``ValueError``.

Composing with data parallelism and FSDP: the context-parallel group is orthogonal to the
data-parallel one. With a 2-D device mesh ``("dp", "cp")``, the ranks of one "cp" row hold the pieces
of the same sequences and the "dp" rows hold different batches; pass ``group=mesh["cp"].get_group()``
here. Parameters are replicated over "cp" as well as "dp", and each cp rank's gradient covers only its
own tokens, so the parameter gradients must be reduced over both: when dp x cp is the whole world,
plain ``fully_shard(model)`` (FSDP2's default mesh is every rank) or ``DDP(model)`` does it; with
more mesh dimensions (tensor or pipeline parallel) shard over the flattened ``mesh["dp", "cp"]``.
Both average over the ranks, so with equal pieces a per-rank mean loss gives the mean over all tokens.

Examples::

    >>> # torchrun --nproc-per-node 8: 2 data-parallel replicas x 4 pieces of each sequence
    >>> import torch.distributed as dist, lintx_triton as lx
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from torch.distributed.fsdp import fully_shard
    >>> mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "cp"))
    >>> cp = mesh["cp"].get_group()
    >>> i, n = dist.get_rank(cp), dist.get_world_size(cp)
    >>> x = load_batch(replica=mesh.get_local_rank("dp"))   # [B, T, E], the same on the 4 ranks of a row
    >>> x = x[:, i * T // n : (i + 1) * T // n]              # this rank's contiguous piece
    >>> model = fully_shard(model)                           # gradients reduced over dp and cp
    >>> q, k, v = project(x)                                 # [B, T / 4, H, D] each
    >>> o = lx.distributed.linear_attention(q, k, v, group=cp)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import api, feature_maps

__all__ = ["linear_attention"]


def _gather(x: Tensor, group, world: int) -> Tensor:
    """all_gather of one tensor per rank -> ``[W, *x.shape]`` (not differentiable)."""
    out = x.new_zeros((world, *x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


class _PrefixStates(torch.autograd.Function):
    """Each rank's flattened local state ``[N]`` -> its exclusive prefix and the group's total.

    ``init`` (rank 0 only; ``None`` for zeros) is the first rank's prefix, the state before the whole
    sequence; rank 0's ``local`` already includes it (step 1 ran from it), so it reaches the others
    through the gather.
    """

    @staticmethod
    def forward(ctx, local: Tensor, init: Optional[Tensor], group, rank: int, world: int):
        ctx.group, ctx.rank, ctx.world = group, rank, world
        states = _gather(local, group, world)  # [W, N]
        if rank == 0:
            prefix = init.clone() if init is not None else torch.zeros_like(local)
        else:
            prefix = states[:rank].sum(0)
        return prefix, states.sum(0)

    @staticmethod
    def backward(ctx, dprefix: Tensor, dtotal: Tensor):
        # autograd materializes a missing gradient as zeros, so every rank gathers the same shapes
        grads = _gather(torch.stack([dprefix, dtotal]), ctx.group, ctx.world)  # [W, 2, N]
        # X_j feeds the prefix of every later rank and the total on every rank
        dlocal = grads[ctx.rank + 1 :, 0].sum(0) + grads[:, 1].sum(0)
        dinit = dprefix if ctx.rank == 0 and ctx.needs_input_grad[1] else None
        return dlocal, dinit, None, None, None


def _group_of(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "lx.distributed.linear_attention needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (a group of one process is fine), or use "
            "lx.linear_attention for a sequence on one device"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group")
    return rank, world


def _check_group(error, state_shape, device, group, world):
    """Every rank learns whether any rank failed its local checks or holds a different state shape.

    One all_gather of 6 integers: without it a rank that raised would leave the others waiting in the
    state gather forever, different B, H, M or DV would fail inside the collective or hang there, and a
    rank without gradients would skip the backward's collective."""
    meta = torch.tensor([0 if error is None else 1, *state_shape], dtype=torch.int64, device=device)
    rows = _gather(meta, group, world).tolist()
    failed = [r for r, row in enumerate(rows) if row[0]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(
            f"lx.distributed.linear_attention: rank(s) {failed} of the group rejected their inputs (their "
            f"own error says why); every rank raises so that none waits in a collective"
        )
    shapes = {r: row[1:5] for r, row in enumerate(rows)}
    if any(s != shapes[0] for s in shapes.values()):
        listing = ", ".join(f"rank {r}: {s}" for r, s in shapes.items())
        raise ValueError(
            "lx.distributed.linear_attention: every rank of the group must hold the same B, H, M (feature "
            "width) and DV, only the shard length T may differ (shard dim 1 of q, k, v [B, T, H, *]); got "
            f"state shapes [B, H, M, DV] {listing}"
        )
    grads = [row[5] for row in rows]
    if any(g != grads[0] for g in grads):
        raise ValueError(
            "lx.distributed.linear_attention: either every rank of the group or none must need gradients (the "
            f"backward runs a collective); q, k, v or initial_state require grad on rank(s) "
            f"{[r for r, g in enumerate(grads) if g]} only"
        )


def _check_supported(causal, kwargs):
    if not causal:
        raise ValueError(
            "lx.distributed.linear_attention supports causal=True only: non-causal attention would add the "
            "group's total state to every position, which lx.linear_attention cannot take as an initial "
            "state; gather the sequence and call lx.linear_attention(..., causal=False)"
        )
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError(
            "lx.distributed.linear_attention does not take packed sequences (cu_seqlens): the state passed "
            "between ranks would flow across sequence boundaries; shard one sequence per batch row"
        )


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    causal: bool = True,
    initial_state: Optional[tuple[Tensor, Tensor]] = None,
    return_state: bool = False,
    check: bool = True,
    **kwargs,
):
    r"""Causal linear attention over a sequence sharded across the ranks of ``group``.

    Every rank of the group must call it with its shard (collectives inside, forward and backward);
    the result on each rank is that rank's slice of one :func:`lintx_triton.linear_attention` call over
    the whole sequence. Differentiable in q, k, v and ``initial_state``: the backward gathers too, so
    either every rank or none has inputs that require grad, and each backpropagates through its
    output (or the returned state); an empty shard is still tied into the graph.

    Args:
        q (torch.Tensor): this rank's queries ``[B, T_i, H, D]``, positions
            ``[T_0 + ... + T_{i-1}, T_0 + ... + T_i)`` of the sequence, i = ``dist.get_rank(group)``.
            T_i may differ between ranks and may be 0.
        k (torch.Tensor): keys ``[B, T_i, H, D]``.
        v (torch.Tensor): values ``[B, T_i, H, DV]``.
        group (ProcessGroup | None): the context-parallel group. Default: ``None``, the default group.
            A group of one runs a single local call.
        causal (bool): must be ``True`` (the default); ``False`` raises ``ValueError``.
        initial_state (tuple[torch.Tensor, torch.Tensor] | None): ``(S_0 [B, H, M, DV], z_0 [B, H, M])``
            float32, the state before the whole sequence. Read on rank 0 of the group, ignored on the
            others; its gradient, from every rank, lands on rank 0's tensors. Default: ``None`` (zeros).
        return_state (bool): also return the final state of the whole sequence, the same on every rank.
            Default: ``False``.
        check (bool): first all-gather 6 integers so that a rank with bad input, with a different
            B, H, M or DV, or alone in (not) requiring gradients, makes every rank raise ``ValueError``
            instead of leaving the others waiting in a collective. On CUDA this is a host
            synchronization per call; pass ``False`` once the shapes are known to agree.
            Default: ``True``.
        **kwargs: passed to :func:`lintx_triton.linear_attention` (``feature_map``, ``normalize``,
            ``scale``, ``eps``, ``backend``, ...); the same on every rank. A feature map with
            parameters (random features) must hold the same ones on every rank: build it from one
            seed, or broadcast them. Only the state shape is checked.

    Returns:
        o (torch.Tensor): ``[B, T_i, H, DV]``, and ``(S_T, z_T)`` of the whole sequence when ``return_state``.

    Cost: one call over the shard plus its state alone (the chunk sums; see the module docstring), plus
    one all_gather of W states forward and of 2 W backward.

    Examples::

        >>> import torch, torch.distributed as dist, lintx_triton as lx
        >>> dist.init_process_group("gloo")                 # e.g. under torchrun --nproc-per-node 4
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> g = torch.Generator().manual_seed(0)            # the same whole sequence on every rank
        >>> q, k, v = (torch.randn(2, 1000, 4, 32, generator=g) for _ in range(3))
        >>> piece = slice(rank * 1000 // world, (rank + 1) * 1000 // world)
        >>> o = lx.distributed.linear_attention(q[:, piece], k[:, piece], v[:, piece])
        >>> torch.allclose(o, lx.linear_attention(q, k, v)[:, piece], atol=1e-5)
        True
    """
    rank, world = _group_of(group)
    if world == 1:
        _check_supported(causal, kwargs)  # the same errors as on more ranks
        return api.linear_attention(q, k, v, initial_state=initial_state, return_state=return_state, **kwargs)
    error, state_shape = None, (-1, -1, -1, -1)
    tensors = [t for t in (q, k, v) + tuple(initial_state or ()) if isinstance(t, Tensor)]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    try:
        _check_supported(causal, kwargs)
        init = initial_state if rank == 0 else None
        # every check of the full call, then the state alone (no queries, no output)
        fm = feature_maps.resolve(kwargs.get("feature_map", "elu"))
        api._check_inputs(q, k, v, fm, True, init, kwargs.get("scale", 1.0), kwargs.get("eps", 1e-6),
                          kwargs.get("backend", "auto"))
        S, z = api.linear_attention_state(k, v, feature_map=fm, initial_state=init,
                                          backend=kwargs.get("backend", "auto"))
        state_shape = tuple(S.shape)
    except (TypeError, ValueError) as e:
        error = e
    if check:
        device = q.device if isinstance(q, Tensor) else torch.device("cpu")
        _check_group(error, (*state_shape, int(needs_grad)), device, group, world)
    elif error is not None:
        raise error
    B, H, M, DV = S.shape
    n = B * H * M * DV
    flat0 = None
    if init is not None:
        flat0 = torch.cat([init[0].reshape(-1), init[1].reshape(-1)])
    local = torch.cat([S.reshape(-1), z.reshape(-1)])
    if needs_grad and not local.requires_grad:
        # an empty shard's state depends on nothing: tie it to the inputs (an exact 0), so that this rank
        # runs the backward collective too. Not to an initial state that ranks > 0 ignore: it gets no gradient
        # unless nothing else can carry the tie
        own = [t for t in (q, k, v) + tuple(init or ()) if isinstance(t, Tensor) and t.requires_grad]
        local = local + sum(t.reshape(-1)[:0].sum() for t in own or [t for t in tensors if t.requires_grad])
    prefix, total = _PrefixStates.apply(local, flat0, group, rank, world)
    unflat = lambda x: (x[:n].view(B, H, M, DV), x[n:].view(B, H, M))  # noqa: E731
    o = api.linear_attention(q, k, v, initial_state=unflat(prefix), **kwargs)
    if o.shape[1] == 0 and prefix.requires_grad:
        # an empty shard's output must still lead back to the prefix, or this rank's backward would skip
        # the collective that the other ranks wait in
        o = o + prefix[:0].sum()
    return (o, unflat(total)) if return_state else o
