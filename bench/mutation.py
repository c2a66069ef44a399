"""Mutation testing of the kernel sources and the launchers (issue #20): a declared list of mutants, each applied in
a private copy of the repository, the kernel-family tests run against it.

Why a project script and not mutmut or cosmic-ray (bench/MUTATION.md has the numbers): mutmut 3 skips every
decorated function, so it mutates no ``@triton.jit`` kernel, and its trampolines would also break the renderer,
which joins the kernel files as text; cosmic-ray rewrites files on disk (that part works) but enumerates every
operator and number, 5011 mutants in these seven files, about 80 hours at a minute each on 2 cores, and has no
off-by-one, dropped-term or swapped-argument operators. Here each mutant is a reviewable line: a file, the exact
source text, its replacement, a kind and an id. The text must occur exactly once in its file, else the run stops
before it starts (``--check`` does only that), so the list cannot rot silently when the sources change.

Usage::

    python bench/mutation.py --out bench/out/mutation.json              # every mutant, 2 jobs
    python bench/mutation.py --examples 15 --out /tmp/m.json            # fewer Hypothesis examples: faster
    python bench/mutation.py --ids out-causal-strict,dq-drop-scale      # a few
    python bench/mutation.py --ids scan-z-every-block --explicit-only   # the tests' @example cases alone
    python bench/mutation.py --ids-from bench/out/mutation.json --tests tests    # survivors, the whole suite
    python bench/mutation.py --check                                    # each applies to exactly one place

Each mutant runs in its own copy (``--workdir``; one copy per job, the mutated file restored after each run) with
``PYTHONPATH`` set to the copy (checked: ``lintx_triton`` must import from there, not from an editable install),
a fresh kernel cache (``LINTX_TRITON_CACHE_DIR``, ``TRITON_CACHE_DIR``), no bytecode written (a mutant of the same
size and second as the original would otherwise reuse a stale ``.pyc``) and Hypothesis's ``ci`` profile without
the shrink phase (a failure is reported at its first example: a kill is all we need; ``--examples`` changes its
count). Each mutant may name test files to run first (``first``: where a kill is likely); the set is the same. Outcomes: ``killed`` (pytest
exit 1, or 2: the mutant broke collection), ``crashed`` (the test process died of a signal: an out-of-bounds
access), ``survived`` (exit 0), ``timeout``, ``error`` (anything else: the machinery, not the mutant). The score:
(killed + crashed + timeout) / mutants. The JSON is rewritten after every mutant, so an interrupted run keeps what it did;
``--resume`` skips the mutants a JSON already has.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("comparison", "arithmetic", "off-by-one", "dropped-term", "wrong-index", "swapped-argument")

# The kernel-family tests, cheapest broad ones first (``-x``: a kill stops at the first failure), less the cases
# on the PyTorch backend (``-k "not torch"``: ids with ``torch``), which call no kernel and no launcher.
DEFAULT_TESTS = (
    "tests/test_forward.py", "tests/test_backward.py", "tests/test_varlen_gqa.py", "tests/test_decode.py",
    "tests/test_state.py", "tests/test_learnable.py", "tests/test_feature_maps.py", "tests/test_codegen.py",
    "tests/test_polynomial.py", "tests/test_hybrid_triton.py", "-k", "not torch",
)

K = "lintx_triton/codegen/kernels/"
HELPERS, ELEMENTWISE, PROJECTED = K + "helpers.py", K + "elementwise.py", K + "projected.py"
POLY = K + "polynomial.py"
FORWARD, BACKWARD, DECODE = K + "forward.py", K + "backward.py", K + "decode.py"
HYBRID = K + "hybrid.py"
LAUNCH = "lintx_triton/ops/launch.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    kind: str
    file: str
    find: str  # the exact source text; must occur exactly once in ``file``
    replace: str
    first: tuple = ()  # test files likely to kill it, run before the others (a kill stops at the first failure)

    def tests(self, tests) -> list:
        """``tests`` with this mutant's ``first`` files moved to the front (when they are among them)."""
        tests = list(tests)
        front = [t for t in self.first if t in tests]
        return front + [t for t in tests if t not in front]

    def apply(self, text: str) -> str:
        n = text.count(self.find)
        if n != 1:
            raise MutantError(f"mutant {self.id}: its text occurs {n} times in {self.file} (expected exactly once); "
                              f"update its entry in bench/mutation.py to the current source:\n{self.find!r}")
        return text.replace(self.find, self.replace)


class MutantError(ValueError):
    pass


FWD_T, BWD_T, GQA_T = "tests/test_forward.py", "tests/test_backward.py", "tests/test_varlen_gqa.py"
DEC_T = "tests/test_decode.py"
LRN_T, FM_T = "tests/test_learnable.py", "tests/test_feature_maps.py"
PLY_T = "tests/test_polynomial.py"
HYB_T = "tests/test_hybrid_triton.py"
# Where a file's mutants start looking (``first`` of a mutant adds to it): no effect on the outcome, only on how
# soon a kill comes.
FILE_FIRST = {BACKWARD: (BWD_T,), DECODE: (DEC_T,), PROJECTED: (LRN_T, FM_T), POLY: (PLY_T,), HYBRID: (HYB_T,)}


def _m(id, kind, file, find, replace, first=()):
    assert kind in KINDS, kind
    first = tuple(first) + tuple(t for t in FILE_FIRST.get(file, ()) if t not in first)
    return Mutant(id, kind, file, find, replace, first)


MUTANTS: tuple[Mutant, ...] = (
    # ---- helpers.py: row loads and stores, where a program's tokens are
    _m("load-rows-mask-or", "comparison", HELPERS,
       "mask=m_t[:, None] & m_c[None, :], other=0.0)", "mask=m_t[:, None] | m_c[None, :], other=0.0)"),
    _m("store-rows-no-row-mask", "dropped-term", HELPERS,
       "tl.store(p, x.to(ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])",
       "tl.store(p, x.to(ptr.dtype.element_ty), mask=m_c[None, :])"),
    _m("seq-batched-bos-off-by-one", "off-by-one", HELPERS,
       "return i_n.to(tl.int64) * T, T", "return i_n.to(tl.int64) * (T - 1), T"),
    _m("seq-varlen-length-no-bos", "dropped-term", HELPERS,
       "return bos, tl.load(cu + i_n + 1).to(tl.int64) - bos", "return bos, tl.load(cu + i_n + 1).to(tl.int64)",
       first=(GQA_T,)),
    _m("chunk-varlen-index-of-sequence", "wrong-index", HELPERS,
       "return bos, T_n, i_n, tl.load(cmap + 2 * i_c + 1)", "return bos, T_n, i_n, tl.load(cmap + 2 * i_c)",
       first=(GQA_T,)),
    _m("den-offset-batched-swap", "swapped-argument", HELPERS,
       "return (i_b.to(tl.int64) * H + i_h) * T", "return (i_h.to(tl.int64) * H + i_b) * T"),
    _m("den-offset-varlen-no-bos", "dropped-term", HELPERS,
       "return i_h.to(tl.int64) * T + bos", "return i_h.to(tl.int64) * T", first=(GQA_T,)),
    # ---- elementwise.py
    _m("phi-feature-mask-le", "off-by-one", ELEMENTWISE,
       "m_f = tl.arange(0, BM) < M", "m_f = tl.arange(0, BM) <= M"),
    _m("phi-no-row-mask", "dropped-term", ELEMENTWISE,
       "return tl.where(m_t[:, None] & m_f[None, :], phi(x), 0.0)", "return tl.where(m_f[None, :], phi(x), 0.0)"),
    # ---- projected.py
    _m("w-block-row-stride", "wrong-index", PROJECTED,
       "tl.load(fm_params + o_k[:, None] * M + o_m[None, :]", "tl.load(fm_params + o_k[:, None] * D + o_m[None, :]"),
    _m("bias-row-off-by-one", "off-by-one", PROJECTED,
       "b_b = tl.load(fm_params + D * M + o_m", "b_b = tl.load(fm_params + (D - 1) * M + o_m"),
    _m("half-norm-plus", "arithmetic", PROJECTED,
       "return u, 0.5 * n[:, None], b_b", "return u, 0.5 + n[:, None], b_b"),
    _m("proj-vjp-drop-norm-term", "dropped-term", PROJECTED,
       "tl.trans(_w_block(fm_params, o_k, m_k))) + dn * xs) * IN_SCALE",
       "tl.trans(_w_block(fm_params, o_k, m_k)))) * IN_SCALE"),
    _m("proj-vjp-du-no-row-mask", "dropped-term", PROJECTED,
       "du = tl.where(m_t[:, None] & m_f, du, 0.0)", "du = tl.where(m_f, du, 0.0)"),
    _m("proj-dfm-bias-dropped", "dropped-term", PROJECTED,
       "tl.atomic_add(dfm + D * M + o_m, tl.sum(du, 0), mask=o_m < M)", "pass"),
    _m("proj-dfm-w-in-x-lt", "comparison", PROJECTED,
       "_mm_dw(tl.trans(xs), du), mask=m_k[:, None] & m_f)", "_mm_dw(tl.trans(xs), du), mask=m_k[:, None] & ~m_f)"),
    # ---- forward.py: chunk sums
    _m("sums-token-mask-le", "off-by-one", FORWARD,
       "o_t = i_t * BT + tl.arange(0, BT)\n"
       "    m_t = o_t < T_n\n"
       "    o_m = i_mb * BM + tl.arange(0, BM)",
       "o_t = i_t * BT + tl.arange(0, BT)\n"
       "    m_t = o_t <= T_n\n"
       "    o_m = i_mb * BM + tl.arange(0, BM)"),
    _m("sums-bwd-group-loop-from-1", "off-by-one", FORWARD,
       "for i_g in range(0, H // HKV):", "for i_g in range(1, H // HKV):"),
    _m("sums-bwd-query-head-index", "wrong-index", FORWARD,
       "i_h = i_hk * (H // HKV) + i_g\n            row0", "i_h = i_hk * HKV + i_g\n            row0", first=(GQA_T,)),
    _m("sums-bwd-rden-mul", "arithmetic", FORWARD,
       "b_rden = tl.where(m_t, 1.0 / tl.load(den + p_t", "b_rden = tl.where(m_t, 1.0 * tl.load(den + p_t"),
    _m("sums-bwd-dz-drop-scale", "dropped-term", FORWARD,
       "b_z += scale * tl.sum(b_f * b_w[:, None], 0)", "b_z += tl.sum(b_f * b_w[:, None], 0)"),
    _m("sums-bwd-unnorm-drop-scale", "dropped-term", FORWARD,
       "b_S += scale * _mm(tl.trans(b_f), b_y)", "b_S += _mm(tl.trans(b_f), b_y)"),
    _m("sums-fwd-row-off-by-one", "off-by-one", FORWARD,
       "row0 = bos * HKV + i_hk\n", "row0 = bos * HKV + i_hk + 1\n"),
    _m("sums-z-store-second-block", "comparison", FORWARD,
       "    if i_v == 0:\n        tl.store(z + i_s * M + o_m, b_z, mask=m_m)",
       "    if i_v == 1:\n        tl.store(z + i_s * M + o_m, b_z, mask=m_m)"),
    _m("sums-state-layout-swap", "swapped-argument", FORWARD,
       "p_S = S + (i_s * M + o_m[:, None]) * DV + o_v[None, :]",
       "p_S = S + (i_s * DV + o_v[None, :]) * M + o_m[:, None]"),
    # ---- forward.py: the scan
    _m("scan-reverse-off-by-one", "off-by-one", FORWARD,
       "i_c = c_hi - 1 - (i - c_lo)", "i_c = c_hi - (i - c_lo)"),
    _m("scan-loop-skips-first", "off-by-one", FORWARD,
       "for i in range(c_lo, c_hi):", "for i in range(c_lo + 1, c_hi):"),
    _m("scan-z-every-block", "comparison", FORWARD,
       "+ i_v == 0)", "+ i_v >= 0)"),
    _m("scan-z-assign", "arithmetic", FORWARD,
       "b_z += b_cz", "b_z = b_cz"),
    _m("scan-init-from-final", "swapped-argument", FORWARD,
       "b_s = tl.load(S0 + p_f, mask=m_mv, other=0.0)", "b_s = tl.load(ST + p_f, mask=m_mv, other=0.0)"),
    _m("scan-varlen-first-slot-index", "wrong-index", FORWARD,
       "c_lo = tl.load(coffs + i_ns // HKV)", "c_lo = tl.load(coffs + i_ns % HKV)", first=(GQA_T,)),
    _m("scan-varlen-row-index", "wrong-index", FORWARD,
       "row = (i_ns % HKV).to(tl.int64) * NT", "row = (i_ns // HKV).to(tl.int64) * NT", first=(GQA_T,)),
    # ---- forward.py: the output
    _m("out-kv-head-index", "wrong-index", FORWARD,
       "    i_h = i_bh % H\n    i_hk = i_h // (H // HKV)", "    i_h = i_bh % H\n    i_hk = i_h % HKV", first=(GQA_T,)),
    _m("out-fused-last-chunk-floor", "off-by-one", FORWARD,
       "i_hi = tl.cdiv(T_n, BT)", "i_hi = T_n // BT"),
    _m("out-causal-strict", "comparison", FORWARD,
       "                b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]\n"
       "                b_P = tl.where(o_t[:, None] >= o_t[None, :]",
       "                b_v = _load_rows(v, row_k, o_t, m_t, o_v, m_v, HKV, DV)  # [BT, BV]\n"
       "                b_P = tl.where(o_t[:, None] > o_t[None, :]"),
    _m("out-den-wrong-axis", "wrong-index", FORWARD,
       "                b_P = tl.where(o_t[:, None] >= o_t[None, :], _mm(b_a, tl.trans(b_b)), 0.0)  # [BT, BT] fp32\n"
       "                b_den += tl.sum(b_P, 1)",
       "                b_P = tl.where(o_t[:, None] >= o_t[None, :], _mm(b_a, tl.trans(b_b)), 0.0)  # [BT, BT] fp32\n"
       "                b_den += tl.sum(b_P, 0)"),
    _m("out-eps-minus", "arithmetic", FORWARD,
       "b_den = scale * b_den + eps", "b_den = scale * b_den - eps"),
    _m("out-norm-drop-scale", "dropped-term", FORWARD,
       "b_r = scale / b_den", "b_r = 1.0 / b_den"),
    _m("out-unnorm-drop-intra", "dropped-term", FORWARD,
       "b_inter += _mm_wide(b_P, b_v)", "pass"),
    _m("out-den-store-off-by-one", "off-by-one", FORWARD,
       "tl.store(p_den + o_t, b_den, mask=m_t)", "tl.store(p_den + o_t + 1, b_den, mask=m_t)"),
    _m("out-final-state-head-cmp", "comparison", FORWARD,
       "if i_h % (H // HKV) == 0:", "if i_h % (H // HKV) != 0:", first=(GQA_T,)),
    _m("out-state-ptr-query-head", "wrong-index", FORWARD,
       "p_f = ((i_n * HKV + i_hk) * M", "p_f = ((i_n * HKV + i_h) * M", first=(GQA_T,)),
    _m("out-key-row-stride", "wrong-index", FORWARD,
       "row_k = bos * HKV + i_hk", "row_k = bos * H + i_hk", first=(GQA_T,)),
    _m("out-noncausal-total-from-init", "swapped-argument", FORWARD,
       "b_S = tl.load(ST + p_f, mask=m_mv, other=0.0)", "b_S = tl.load(S0 + p_f, mask=m_mv, other=0.0)"),
    _m("out-chunk-state-off-by-one", "off-by-one", FORWARD,
       "                if IS_CAUSAL:\n"
       "                    i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c\n",
       "                if IS_CAUSAL:\n"
       "                    i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c - 1\n"),
    _m("out-fused-z-drop-update", "dropped-term", FORWARD,
       "b_z += tl.sum(b_b, 0)", "pass"),
    # ---- backward.py
    _m("bwd-program-kv-head", "wrong-index", BACKWARD,
       "    i_hk = i_h // (H // HKV)\n    bos", "    i_hk = i_h // HKV\n    bos"),
    _m("bwd-program-rows-swapped", "swapped-argument", BACKWARD,
       "return i_h, bos * H + i_h, bos * HKV + i_hk,", "return i_h, bos * HKV + i_hk, bos * H + i_h,", first=(GQA_T,)),
    _m("bwd-program-noncausal-batch-index", "wrong-index", BACKWARD,
       "        i_s = i_n * HKV + i_hk\n    return", "        i_s = i_b * HKV + i_hk\n    return", first=(GQA_T,)),
    _m("g-sign", "arithmetic", BACKWARD,
       "-tl.sum(b_o * b_do, 1) / b_den", "tl.sum(b_o * b_do, 1) / b_den"),
    _m("dq-value-blocks-floor", "off-by-one", BACKWARD,
       "        for i_v in range(0, tl.cdiv(DV, BV)):\n"
       "            o_v = i_v * BV + tl.arange(0, BV)\n"
       "            m_v = o_v < DV\n"
       "            b_S = tl.load",
       "        for i_v in range(0, DV // BV):\n"
       "            o_v = i_v * BV + tl.arange(0, BV)\n"
       "            m_v = o_v < DV\n"
       "            b_S = tl.load"),
    _m("dq-drop-normalizer-term", "dropped-term", BACKWARD,
       "            b_z = tl.load(z + i_s * M + o_m, mask=m_m, other=0.0)  # [BM]\n"
       "            b_da = b_da * b_rden[:, None] + b_g[:, None] * b_z[None, :]",
       "            b_z = tl.load(z + i_s * M + o_m, mask=m_m, other=0.0)  # [BM]\n"
       "            b_da = b_da * b_rden[:, None]"),
    _m("dq-intra-g-minus", "arithmetic", BACKWARD,
       "        if IS_CAUSAL:\n"
       "            if NORMALIZE:\n"
       "                b_dA = b_dA * b_rden[:, None] + b_g[:, None]\n"
       "            b_dA = tl.where(",
       "        if IS_CAUSAL:\n"
       "            if NORMALIZE:\n"
       "                b_dA = b_dA * b_rden[:, None] - b_g[:, None]\n"
       "            b_dA = tl.where("),
    _m("dq-causal-strict", "comparison", BACKWARD,
       "        if IS_CAUSAL:\n"
       "            if NORMALIZE:\n"
       "                b_dA = b_dA * b_rden[:, None] + b_g[:, None]\n"
       "            b_dA = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[:, None], b_dA, 0.0)",
       "        if IS_CAUSAL:\n"
       "            if NORMALIZE:\n"
       "                b_dA = b_dA * b_rden[:, None] + b_g[:, None]\n"
       "            b_dA = tl.where((o_t[:, None] > o_t[None, :]) & m_t[:, None], b_dA, 0.0)"),
    _m("dq-drop-scale", "dropped-term", BACKWARD,
       "        _store_phi_vjp(dq, row_q, H, q, row_q, H, o_t, m_t, scale * b_da, p_fq",
       "        _store_phi_vjp(dq, row_q, H, q, row_q, H, o_t, m_t, b_da, p_fq"),
    _m("dq-key-map-head", "wrong-index", BACKWARD,
       "p_fk = fk + (i_h // (H // HKV)) * fk_hs", "p_fk = fk + i_h * fk_hs", first=(LRN_T, FM_T)),
    _m("dq-dfm-head-stride", "off-by-one", BACKWARD,
       "        _store_phi_vjp(dq, row_q, H, q, row_q, H, o_t, m_t, scale * b_da, p_fq, True, dfq + i_h * FMS",
       "        _store_phi_vjp(dq, row_q, H, q, row_q, H, o_t, m_t, scale * b_da, p_fq, True, dfq + i_h * (FMS - M)"),
    _m("dkv-anti-causal", "comparison", BACKWARD,
       "        b_b = _phi(k, row_k, o_t, m_t, HKV, p_fk, False)  # [BT, BM]\n"
       "        if IS_CAUSAL:\n"
       "            m_c = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]",
       "        b_b = _phi(k, row_k, o_t, m_t, HKV, p_fk, False)  # [BT, BM]\n"
       "        if IS_CAUSAL:\n"
       "            m_c = (o_t[:, None] <= o_t[None, :]) & m_t[:, None]"),
    _m("dkv-group-row-cmp", "comparison", BACKWARD,
       "        # unrolled: i_g is a compile-time constant, so the dS_c terms below cost no branch\n"
       "        for i_g in tl.static_range(H // HKV):\n"
       "            i_h = i_hk * (H // HKV) + i_g\n"
       "            if H == HKV:\n"
       "                row_q = row_k",
       "        # unrolled: i_g is a compile-time constant, so the dS_c terms below cost no branch\n"
       "        for i_g in tl.static_range(H // HKV):\n"
       "            i_h = i_hk * (H // HKV) + i_g\n"
       "            if H != HKV:\n"
       "                row_q = row_k", first=(GQA_T,)),
    _m("dkv-rden-wrong-axis", "wrong-index", BACKWARD,
       "                b_A = tl.where(m_c, _mm(b_a, tl.trans(b_b)), 0.0)  # [BT, BT] scores a b^T\n"
       "                if NORMALIZE:\n"
       "                    b_A = b_A * b_rden[:, None]",
       "                b_A = tl.where(m_c, _mm(b_a, tl.trans(b_b)), 0.0)  # [BT, BT] scores a b^T\n"
       "                if NORMALIZE:\n"
       "                    b_A = b_A * b_rden[None, :]"),
    _m("dkv-drop-state-term", "dropped-term", BACKWARD,
       "b_db += _mm_wide(b_v, tl.trans(b_dS))", "pass"),
    _m("dkv-dv-no-transpose", "wrong-index", BACKWARD,
       "                    b_dv = tl.zeros([BT, BV], dtype=tl.float32)\n"
       "                if IS_CAUSAL:\n"
       "                    b_do = _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)\n"
       "                    b_dA += _mm(b_do, tl.trans(b_v))\n"
       "                    b_dv += scale * _mm_wide(tl.trans(b_A), b_do)",
       "                    b_dv = tl.zeros([BT, BV], dtype=tl.float32)\n"
       "                if IS_CAUSAL:\n"
       "                    b_do = _load_rows(do, row_q, o_t, m_t, o_v, m_v, H, DV)\n"
       "                    b_dA += _mm(b_do, tl.trans(b_v))\n"
       "                    b_dv += scale * _mm_wide(b_A, b_do)"),
    _m("dkv-drop-dz", "dropped-term", BACKWARD,
       "b_db += tl.load(dz + i_s * M + o_m, mask=m_m, other=0.0)[None, :]", "pass"),
    _m("dkv-db-no-transpose", "wrong-index", BACKWARD,
       "b_db += scale * _mm_wide(tl.trans(b_dA), b_a)", "b_db += scale * _mm_wide(b_dA, b_a)"),
    _m("dkv-den-offset-kv-head", "wrong-index", BACKWARD,
       "        # unrolled: i_g is a compile-time constant, so the dS_c terms below cost no branch\n"
       "        for i_g in tl.static_range(H // HKV):\n"
       "            i_h = i_hk * (H // HKV) + i_g\n"
       "            if H == HKV:\n"
       "                row_q = row_k\n"
       "            else:\n"
       "                row_q = bos * H + i_h\n"
       "            p_t0 = _den_offset(i_b, i_h, bos, T, H, IS_VARLEN)",
       "        # unrolled: i_g is a compile-time constant, so the dS_c terms below cost no branch\n"
       "        for i_g in tl.static_range(H // HKV):\n"
       "            i_h = i_hk * (H // HKV) + i_g\n"
       "            if H == HKV:\n"
       "                row_q = row_k\n"
       "            else:\n"
       "                row_q = bos * H + i_h\n"
       "            p_t0 = _den_offset(i_b, i_hk, bos, T, H, IS_VARLEN)", first=(GQA_T,)),
    _m("dkv-state-terms-every-head", "comparison", BACKWARD,
       "                m_v = o_v < DV\n"
       "                if i_g == 0:  # the kv head's state gradient: once",
       "                m_v = o_v < DV\n"
       "                if i_g >= 0:  # the kv head's state gradient: once", first=(GQA_T,)),
    # ---- decode.py
    _m("decode-first-query-row", "dropped-term", DECODE,
       "i_q0 = (i_bs // HKV) * H + (i_bs % HKV) * (H // HKV)", "i_q0 = (i_bs // HKV) * H + (i_bs % HKV)",
       first=(GQA_T,)),
    _m("decode-row-mask-le", "off-by-one", DECODE,
       "o_r, o_r == 0, 1, fm_params", "o_r, o_r <= 1, 1, fm_params"),
    _m("decode-z-minus", "arithmetic", DECODE,
       "b_z += b_b", "b_z -= b_b"),
    _m("decode-drop-old-state", "dropped-term", DECODE,
       "b_S += b_b[:, None] * b_v[None, :]", "b_S = b_b[:, None] * b_v[None, :]"),
    _m("decode-den-drop-scale", "dropped-term", DECODE,
       "b_num = b_num / (scale * tl.sum(b_a * b_z, 0) + eps)", "b_num = b_num / (tl.sum(b_a * b_z, 0) + eps)"),
    _m("decode-query-map-head", "wrong-index", DECODE,
       "                b_a = _phi_row(q, i_q0 + i_g, fq + ((i_bs % HKV) * (H // HKV) + i_g) * fq_hs",
       "                b_a = _phi_row(q, i_q0 + i_g, fq + i_g * fq_hs", first=(LRN_T, FM_T)),
    _m("decode-key-map-head", "wrong-index", DECODE,
       "        b_b = _phi_row(k, i_bs, fk + (i_bs % HKV) * fk_hs",
       "        b_b = _phi_row(k, i_bs, fk + i_bs * fk_hs", first=(LRN_T, FM_T)),
    _m("decode-z-store-mask", "off-by-one", DECODE,
       "tl.store(zT + i_bs * M + o_m, b_z, mask=m_m)", "tl.store(zT + i_bs * M + o_m, b_z, mask=o_m < M - 1)"),
    # ---- polynomial maps: the feature helpers and the kernels' blocked branches (NMB > 1)
    _m("poly-factor-j-as-i", "wrong-index", POLY,
       "_factor(x, m_d, s_i, I, fm_params) * _factor(x, m_d, s_j, J, fm_params) * c[None, :]",
       "_factor(x, m_d, s_i, I, fm_params) * _factor(x, m_d, s_i, I, fm_params) * c[None, :]"),
    _m("poly-vjp-drop-second", "dropped-term", POLY,
       "return acc + _mm_wide(gc * _factor(x, m_d, s_i, I, fm_params), tl.trans(s_j))", "return acc"),
    _m("blocked-sums-block-swap", "swapped-argument", FORWARD,
       "i_v, i_mb = tl.program_id(1) % tl.cdiv(DV, BV), tl.program_id(1) // tl.cdiv(DV, BV)",
       "i_v, i_mb = tl.program_id(1) // tl.cdiv(DV, BV), tl.program_id(1) % tl.cdiv(DV, BV)", first=(PLY_T,)),
    _m("blocked-out-den-drop-state", "dropped-term", FORWARD,
       "b_den += tl.sum(b_a * b_z[None, :], 1)", "b_den += 0.0 * tl.sum(b_a * b_z[None, :], 1)", first=(PLY_T,)),
    _m("blocked-fused-z-scratch-shared", "wrong-index", FORWARD,
       "i_wz = i_w * tl.cdiv(DV, BV) + i_v", "i_wz = i_w * tl.cdiv(DV, BV)", first=(PLY_T,)),
    _m("blocked-dkv-state-terms-every-head", "comparison", BACKWARD,
       "if i_g == 0:  # the kv head's state gradient: once\n                    for i_mb in range(0, NMB):",
       "if i_g >= 0:  # the kv head's state gradient: once\n                    for i_mb in range(0, NMB):",
       first=(PLY_T,)),
    # ---- launch.py
    _m("cdiv-floor", "off-by-one", LAUNCH,
       "return -(-a // b)", "return a // b"),
    _m("layout-varlen-slots-no-n", "dropped-term", LAUNCH,
       "self.NT = _cdiv(self.T, BT) + self.N", "self.NT = _cdiv(self.T, BT)", first=(GQA_T,)),
    _m("layout-searchsorted-left", "swapped-argument", LAUNCH,
       "seq = torch.searchsorted(ends, slots, right=True)", "seq = torch.searchsorted(ends, slots, right=False)",
       first=(GQA_T,)),
    _m("sums-grid-last-slot", "off-by-one", LAUNCH,
       "return Plan((lay.NT, _cdiv(spec.value_dim, BV) * spec.feature_blocks, lay.B * lay.HKV),",
       "return Plan((lay.NT - 1, _cdiv(spec.value_dim, BV) * spec.feature_blocks, lay.B * lay.HKV),"),
    _m("output-grid-fused-kv-heads", "wrong-index", LAUNCH,
       "grid = (1, NV, lay.N * lay.H)", "grid = (1, NV, lay.N * lay.HKV)", first=(GQA_T,)),
    _m("scan-reverse-flag", "swapped-argument", LAUNCH,
       "reverse=grads, has_init=init is not None", "reverse=not grads, has_init=init is not None"),
    _m("map-head-stride-dim", "wrong-index", LAUNCH,
       "else p.stride(0)", "else p.stride(1)", first=(LRN_T, FM_T)),
    _m("map-head-strides-swapped", "swapped-argument", LAUNCH,
       "fq_hs=stride(fq),\n                fk_hs=stride(fk))", "fq_hs=stride(fk),\n                fk_hs=stride(fq))",
       first=(LRN_T, FM_T)),
    _m("per-param-sum-cmp", "comparison", LAUNCH,
       "acc if p.shape[0] == acc.shape[0] else", "acc if p.shape[0] != acc.shape[0] else", first=(LRN_T, FM_T)),
    _m("fwd-chunked-drops-init", "dropped-term", LAUNCH,
       "\"fwd\", x=k, y=v, fmap=fmap, den=unused, g=unused,\n"
       "                             init=(S0, z0) if S0 is not None else None,",
       "\"fwd\", x=k, y=v, fmap=fmap, den=unused, g=unused,\n                             init=None,"),
    _m("bwd-noncausal-keeps-chunk-sums", "dropped-term", LAUNCH,
       "S, z, dS, dz = ST, zT, dS0, dz0", "S, z = ST, zT", first=(BWD_T,)),
    _m("pass-through-no-zero", "dropped-term", LAUNCH,
       "return S.zero_(), z.zero_()", "return S, z"),
    _m("decode-empty-cmp", "off-by-one", LAUNCH,
       "if B * H == 0:", "if B * H <= 1:", first=(DEC_T,)),
    # ---- hybrid.py: LoLCATs' window + linear hybrid (issue #19)
    _m("hybrid-sliding-window-one-longer", "off-by-one", HYBRID,
       "lo = t - W + 1", "lo = t - W"),
    _m("hybrid-fwd-state-one-chunk-late", "off-by-one", HYBRID,
       "            i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c - (i_t - i_k)",
       "            i_s = (i_b * HKV + i_hk).to(tl.int64) * NT + i_c - (i_t - i_k) + 1"),
    _m("hybrid-fwd-no-rescale", "dropped-term", HYBRID,
       "b_acc = b_acc * b_r[:, None] + _mm(b_p, b_vj)", "b_acc = b_acc + _mm(b_p, b_vj)"),
    _m("hybrid-dq-drops-max-gradient", "dropped-term", HYBRID,
       "b_dq += b_dm[:, None] * tl.load(p_ki", "b_dq += 0.0 * b_dm[:, None] * tl.load(p_ki"),
    _m("hybrid-dkv-drops-max-gradient", "dropped-term", HYBRID,
       "b_ds = b_p * b_dp + tl.where(o_s[:, None] == b_idx[None, :], b_dmt[None, :], 0.0)", "b_ds = b_p * b_dp"),
    _m("hybrid-dkv-state-one-chunk-early", "off-by-one", HYBRID,
       "c_st = i_j + 1 + R  #", "c_st = i_j + R  #"),
    _m("hybrid-state-sums-drop-g", "dropped-term", HYBRID,
       "b_S += (g * scale) * _mm_wide(tl.trans(b_a * b_rL[:, None]),", "b_S += scale * _mm_wide(tl.trans(b_a * b_rL[:, None]),"),
    _m("hybrid-decode-never-folds", "off-by-one", HYBRID,
       "nxt = _win_lo(P + 1, W, SLIDING)", "nxt = _win_lo(P, W, SLIDING)"),
)


def by_id(ids) -> list[Mutant]:
    table = {m.id: m for m in MUTANTS}
    unknown = [i for i in ids if i not in table]
    if unknown:
        raise SystemExit(f"unknown mutant ids: {', '.join(unknown)}")
    return [table[i] for i in ids]


def check(mutants, src: Path = ROOT) -> None:
    """Raise MutantError unless every mutant's text occurs exactly once in its file (and the ids are distinct)."""
    ids = [m.id for m in mutants]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise MutantError(f"duplicate mutant ids: {dup}")
    errors = []
    for m in mutants:
        try:
            mutated = m.apply((src / m.file).read_text())
            if mutated == (src / m.file).read_text():
                errors.append(f"mutant {m.id}: its replacement leaves {m.file} unchanged")
        except MutantError as e:
            errors.append(str(e))
    if errors:
        raise MutantError("\n".join(errors))


# ---------------------------------------------------------------- private copies

# Loaded by pytest in the copy (-p). After tests/conftest.py has configured its profile (``ci``, or
# HYPOTHESIS_PROFILE's; its seed handling included), the same settings without the shrink phase (a kill needs one
# failing example) and, with --examples, another count; with --explicit-only, the explicit examples (@example)
# alone: no draw, so a kill shows that a test's fixed cases catch the mutant whatever the seed or the count.
# (Derived at configure time, not at import: a -p plugin is imported before conftest.py registers ``ci``, when
# Hypothesis's own built-in ``ci`` profile would be found.)
PLUGIN = '''\
import os

import pytest
from hypothesis import Phase, settings


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    n = os.environ.get("LINTX_MUTATION_EXAMPLES")
    base = settings.get_profile(config.getoption("--hypothesis-profile", default=None)
                                or os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    explicit = os.environ.get("LINTX_MUTATION_EXPLICIT") == "1"
    phases = [Phase.explicit] if explicit else [Phase.explicit, Phase.reuse, Phase.generate]
    settings.register_profile("lintx_mutation", base, phases=phases,
                              **({"max_examples": int(n)} if n else {}))
    settings.load_profile("lintx_mutation")
'''
PLUGIN_NAME = "_mutation_plugin"


SKIP_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", ".benchmarks", "build", "dist"}


def _source_files(src: Path) -> list[str]:
    """The files of a checkout: tracked and untracked-but-not-ignored (its working tree, uncommitted edits included);
    without git, every file outside SKIP_DIRS."""
    try:
        out = subprocess.run(["git", "-C", str(src), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                             capture_output=True).stdout.decode()
        files = out.split("\0")
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(src):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")
                       and not (Path(d, x).is_symlink())]
            files += [str(Path(d, n).relative_to(src)) for n in names]
            files += [str(Path(d, x).relative_to(src)) for x in os.listdir(d) if Path(d, x).is_symlink()
                      and Path(d, x).is_dir()]
    return sorted({f for f in files if f and ((src / f).is_file() or (src / f).is_symlink())})


def make_copy(src: Path, dst: Path) -> Path:
    """A private copy of ``src``'s checkout at ``dst`` (no .git, no caches), with the pytest plugin. Links stay
    links (lintx_triton/autotune -> ../autotune, where the shipped configs are found)."""
    for f in _source_files(src):
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        if (src / f).is_symlink():
            os.symlink(os.readlink(src / f), dst / f)
        else:
            shutil.copy2(src / f, dst / f)
    (dst / f"{PLUGIN_NAME}.py").write_text(PLUGIN)
    return dst


def test_env(copy: Path, cache: Path, examples: int | None = None, explicit_only: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("LINTX_MUTATION_EXAMPLES", None)
    env.pop("LINTX_MUTATION_EXPLICIT", None)
    if examples:
        env["LINTX_MUTATION_EXAMPLES"] = str(examples)
    if explicit_only:
        env["LINTX_MUTATION_EXPLICIT"] = "1"
    # COLUMNS: pytest cuts its short summary (what killed the mutant) to the terminal's width, 80 in a pipe
    env.update(COLUMNS="250", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", TRITON_INTERPRET="1",
               LINTX_TRITON_CACHE_DIR=str(cache / "lintx"), TRITON_CACHE_DIR=str(cache / "triton"))
    return env


def verify_copy(copy: Path) -> None:
    """lintx_triton must import from the copy (the venv holds an editable install of some other checkout)."""
    with tempfile.TemporaryDirectory(prefix="mut_cache_") as cache:
        out = subprocess.run([sys.executable, "-c", "import lintx_triton; print(lintx_triton.__file__)"], cwd=copy,
                             env=test_env(copy, Path(cache)), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"lintx_triton imports from {out}, not from the copy {copy}")


def _summary(text: str) -> str:
    """The first FAILED/ERROR line of pytest's short summary (what killed the mutant); after a crash, the test
    that was running (from the fault handler's traceback)."""
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    crash = re.findall(r'File "[^"]*?(tests/test_\w+\.py)", line \d+ in (\w+)', text)
    if crash:
        return f"crashed in {crash[-1][0]}::{crash[-1][1]}"
    tail = [line for line in text.splitlines() if line.strip()]
    return tail[-1][:300] if tail else ""


def classify(rc: int | None) -> str:
    """pytest's exit status -> the mutant's outcome. A signal (rc < 0) is a crash of the test process: the
    interpreter's out-of-bounds access, an illegal address on a GPU; the suite fails, so the mutant is detected."""
    if rc is None:
        return "timeout"
    if rc == 0:
        return "survived"
    if rc in (1, 2):
        return "killed"
    return "crashed" if rc < 0 else "error"


def run_mutant(m: Mutant | None, copy: Path, tests, timeout: float, examples: int | None = None,
               explicit_only: bool = False) -> dict:
    """Apply ``m`` (None: the unmutated baseline) in ``copy``, run pytest, restore the file. ``explicit_only``:
    Hypothesis runs the tests' explicit examples and draws none."""
    target = copy / m.file if m else None
    original = target.read_text() if m else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mut_cache_") as cache:
        try:
            if m:
                target.write_text(m.apply(original))
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-p", PLUGIN_NAME,
                   *(m.tests(tests) if m else tests)]
            proc = subprocess.Popen(cmd, cwd=copy, env=test_env(copy, Path(cache), examples, explicit_only),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                rc = None
        finally:
            if m:
                target.write_text(original)
    outcome = classify(rc)
    res = dict(outcome=outcome, rc=rc, seconds=round(time.perf_counter() - t0, 1), by=_summary(out or ""))
    if outcome == "error":
        res["tail"] = (out or "")[-2000:]
    return res


def score(results: dict) -> dict:
    n = len(results)
    counts = {k: sum(r["outcome"] == k for r in results.values())
              for k in ("killed", "crashed", "timeout", "survived", "error")}
    detected = counts["killed"] + counts["crashed"] + counts["timeout"]
    return dict(mutants=n, **counts, score=round(detected / n, 4) if n else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ids", help="comma-separated mutant ids (default: all)")
    ap.add_argument("--ids-from", help="take the ids from a previous run's JSON (with --outcome)")
    ap.add_argument("--outcome", default="survived", help="with --ids-from: the outcome to select (default survived)")
    ap.add_argument("--tests", help="pytest arguments, one string (default: the kernel-family test files less the "
                    "PyTorch-backend cases; 'tests' for the whole suite)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--examples", type=int, help="Hypothesis examples per property test (default: the ci profile's)")
    ap.add_argument("--explicit-only", action="store_true",
                    help="run only the property tests' explicit examples (@example), no draws: whether the fixed "
                         "cases alone kill a mutant")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutant (default 1800)")
    ap.add_argument("--source", default=str(ROOT), help="the checkout to copy (default: this one)")
    ap.add_argument("--workdir", help="where the private copies go (default: a temporary directory)")
    ap.add_argument("--out", help="the JSON to write (rewritten after every mutant)")
    ap.add_argument("--resume", action="store_true", help="skip the mutants --out already has")
    ap.add_argument("--baseline", action="store_true", help="first run the tests on the unmutated copy (must pass)")
    ap.add_argument("--baseline-only", action="store_true", help="run the unmutated copy's tests and no mutant")
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies to exactly one place")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    a = ap.parse_args(argv)

    a.tests = shlex.split(a.tests) if a.tests else list(DEFAULT_TESTS)
    src = Path(a.source).resolve()
    if a.ids_from:
        prev = json.loads(Path(a.ids_from).read_text())["results"]
        mutants = by_id([i for i, r in prev.items() if r["outcome"] == a.outcome])
    elif a.ids:
        mutants = by_id(a.ids.split(","))
    else:
        mutants = list(MUTANTS)
    check(MUTANTS, src)  # the whole list, always: a stale entry stops the run before anything starts
    if a.list:
        for m in mutants:
            print(f"{m.id:38s} {m.kind:17s} {m.file}")
        return 0
    if a.check:
        print(f"{len(MUTANTS)} mutants, each applies to exactly one place in {src}")
        return 0

    results: dict[str, dict] = {}
    out = Path(a.out) if a.out else None
    if out and a.resume and out.exists():
        results = json.loads(out.read_text())["results"]
    if a.baseline_only:
        a.baseline, mutants = True, []
    todo = [m for m in mutants if m.id not in results]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="lintx_mutation_"))
    jobs = max(1, min(a.jobs, len(todo) or 1))
    copies = []
    for j in range(jobs):
        d = work / f"copy{j}"
        if d.exists():
            shutil.rmtree(d)
        copies.append(make_copy(src, d))
        verify_copy(d)
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), source=str(src), tests=a.tests,
                examples="explicit only" if a.explicit_only else (a.examples or "ci profile"), jobs=jobs,
                timeout_s=a.timeout)
    t_start = time.perf_counter()
    lock = threading.Lock()

    def save():
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            rows = {m.id: dict(results[m.id], kind=m.kind, file=m.file) for m in MUTANTS if m.id in results}
            doc = dict(meta, wall_s=round(time.perf_counter() - t_start, 1), summary=score(rows), results=rows)
            out.write_text(json.dumps(doc, indent=1) + "\n")

    if a.baseline:
        base = run_mutant(None, copies[0], a.tests, a.timeout, a.examples, a.explicit_only)
        passed = "passed" if base["outcome"] == "survived" else base["outcome"]
        print(f"baseline: {passed} in {base['seconds']} s", flush=True)
        if base["outcome"] != "survived":
            print(base.get("by", ""), base.get("tail", ""), file=sys.stderr)
            raise SystemExit("the unmutated copy fails its tests: no mutant result would mean anything")
        meta["baseline_s"] = base["seconds"]

    free = list(copies)

    def one(m: Mutant):
        with lock:
            copy = free.pop()
        try:
            r = run_mutant(m, copy, a.tests, a.timeout, a.examples, a.explicit_only)
        finally:
            with lock:
                free.append(copy)
        with lock:
            results[m.id] = r
            print(f"[{len(results):3d}/{len(mutants)}] {m.id:38s} {r['outcome']:9s} {r['seconds']:7.1f} s  {r['by']}",
                  flush=True)
            save()

    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(one, todo))
    sel = {m.id: results[m.id] for m in mutants}
    s = score(sel)
    print(json.dumps(dict(s, wall_s=round(time.perf_counter() - t_start, 1))))
    save()
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
