"""The Triton kernels of every generated module, one file per family.

The renderer (:mod:`lintx_triton.codegen.render`) joins these files behind a generated header that
defines the spec's compile-time constants (``D``, ``M``, ``NORMALIZE``, ...: :mod:`.constants` lists
them with example values, for readers and linters) and the feature map's Triton functions (``phi`` /
``phi_vjp`` of an elementwise map, ``phi_proj`` / ``phi_proj_vjp`` of a projected one, ``poly_pre_sel`` /
``poly_pre_vjp`` / ``poly_pre_dparams`` / ``poly_index`` of a polynomial one). Of each file
it keeps what follows the line ``# %% kernels``: the imports above it are for editors and linters
only. A generated module is one plain Python file (``lx.emit`` returns it); phi(q) and phi(k) exist
only in registers: every kernel recomputes them from the q / k tiles it loads.

    helpers.py      products (_mm, _mm_wide), row loads and stores, where a program's tokens are
    elementwise.py  _phi / _store_phi_vjp of an elementwise map            (one of these three is joined)
    projected.py    _phi / _store_phi_vjp of a projected map (x' W on chip)
    polynomial.py   the same of a polynomial map, and by feature block (_phi_blk, _phi_vjp_acc, _phi_vjp_store):
                    NMB blocks of BM features, built from exact one-hot selections of x' = [x, 1]
    single_block.py the blocked names for the other two (NMB = 1)
    forward.py      chunk sums, the scan over chunks, the outputs (fused or chunked)
    backward.py     g, dq, (dk, dv)
    decode.py       one token of the RNN form
    hybrid.py       LoLCATs' sliding-window softmax + linear hybrid (window=): forward, backward, decode

Notation (FLA's): ``i_`` program indices, ``o_`` offset vectors, ``m_`` masks, ``p_`` pointers,
``b_`` on-chip blocks; ``BT`` chunk length, ``BV`` value block. One name per quantity in every layer:
the state ``S`` and its normalizer sum ``z`` (``S0``, ``z0`` the initial state, ``ST``, ``zT`` the
final one, ``dS``, ``dz`` their gradients), the feature map's parameters ``fq``, ``fk`` (for queries and keys;
``fm_params`` the one head's slice a feature helper reads) and their gradients ``dfq``, ``dfk``.
Layouts: q ``[B, T, H, D]``; k ``[B, T, HKV, D]``, v ``[B, T, HKV, DV]`` (HKV divides H: grouped-query
heads read their kv head in place, nothing is repeated); o, do ``[B, T, H, DV]``; den, g ``[B, H, T]``
fp32; chunk states S ``[B*HKV, NT, M, DV]``, z ``[B*HKV, NT, M]`` fp32; initial and final states
``[N, HKV, M, DV]`` / ``[N, HKV, M]`` fp32, N = B, or the number of sequences when packed (B = 1,
``cu_seqlens``: chunks never cross a sequence boundary).

The algorithm, for one (batch, head), chunks of BT tokens, a = phi(q), b = phi(k):
  S_c = S0 + sum of b^T v over the chunks before c         (inter-chunk state)
  num = a @ S_c + tril(a @ b^T) @ v                        (fp32 accumulation)
  den = a . z_c + rowsum(tril(a @ b^T))                    (fp32, never rounded)
  o   = scale * num / (scale * den + eps)
The *fused* path carries (S, z) through the chunks in one program per (value block, batch*head); the
*chunked* path computes per-chunk sums in parallel, scans them (cheap: M x DV per chunk), then computes
every chunk's output in parallel. A blocked map (NMB > 1) sums every product over its feature blocks; its
fused path keeps the running state in a scratch buffer, a block at a time. The backward is chunk-parallel: it recomputes S_c with the forward
scan, runs the same scan in reverse for dS_c, and forms dq, dk, dv per chunk; phi's vector-Jacobian
product is fused into the store of dq and dk.
"""
