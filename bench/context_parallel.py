"""What context parallelism costs a rank: lx.distributed.linear_attention over W ranks against one call on its shard.

    python bench/context_parallel.py --world 2 --tokens 2048     # gloo on this CPU (torch backend)

Spawns W processes (gloo; nccl and CUDA when --device cuda), each holding ``--tokens`` tokens of one
sequence, and prints the median forward+backward time of: the context-parallel call, the same with
a full first pass (the output discarded, as before ``lx.linear_attention_state`` existed), and one
plain call over the rank's shard.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import click
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _rank(rank, world, store, tokens, H, D, device, backend, reps):
    torch.set_num_threads(1)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    import lintx_triton as lx
    import lintx_triton.api as api

    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, tokens, H, D, generator=g).to(dev).requires_grad_() for _ in range(3))

    def cp():
        o = lx.distributed.linear_attention(q, k, v, backend=backend, check=False)
        torch.autograd.grad(o.sum(), (q, k, v))

    def one():
        o = lx.linear_attention(q, k, v, backend=backend)
        torch.autograd.grad(o.sum(), (q, k, v))

    state_alone = api.linear_attention_state

    def full_first_pass(k, v, feature_map="elu", initial_state=None, backend="auto"):
        return api.linear_attention(k, k, v, feature_map=feature_map, initial_state=initial_state,
                                    return_state=True, backend=backend)[1]

    def cp_full():
        api.linear_attention_state = full_first_pass
        try:
            cp()
        finally:
            api.linear_attention_state = state_alone

    times = {"cp": [], "cp, full first pass": [], "one call on the shard": []}
    for _ in range(2):  # interleaved rounds
        for name, f in zip(times, (cp, cp_full, one)):
            for _ in range(reps):
                dist.barrier()
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                f()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    if rank == 0:
        row = ", ".join(f"{n} {statistics.median(t) * 1e3:.1f}" for n, t in times.items())
        print(f"{world} ranks x {tokens} tokens, H={H}, D=DV={D}, fp32, backend={backend}, {device}: "
              f"forward+backward median ms: {row}", flush=True)
    dist.destroy_process_group()


@click.command()
@click.option("--world", default=2, show_default=True)
@click.option("--tokens", default=2048, show_default=True, help="tokens per rank")
@click.option("--H", "H", default=4, show_default=True)
@click.option("--D", "D", default=64, show_default=True)
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--backend", default="torch", type=click.Choice(["auto", "triton", "torch"]))
@click.option("--reps", default=5, show_default=True)
def main(world, tokens, H, D, device, backend, reps):
    store = tempfile.mktemp()
    torch.multiprocessing.spawn(_rank, args=(world, store, tokens, H, D, device, backend, reps), nprocs=world)


if __name__ == "__main__":
    main()
