"""The examples run end to end (tiny budgets: this checks they work, not how well they train)."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_pixel_digits_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    demo = _load("pixel_digits")
    out = tmp_path / "grid.png"
    # the PyTorch backend: the suite runs under TRITON_INTERPRET=1, where auto would interpret the kernels
    rates = demo.main(["--steps", "3", "--images", "2", "--out", str(out), "--backend", "torch"])
    assert out.exists() and out.stat().st_size > 1000
    assert len(rates) == 3 and all(r > 0 for r in rates.values())


def test_pixel_digits_rnn_generation_matches_the_parallel_model():
    """The RNN-form sampler scores a sequence exactly as the parallel forward does."""
    import torch

    demo = _load("pixel_digits")
    torch.manual_seed(0)
    m = demo.PixelModel("linear").eval()
    x = torch.randint(0, demo.LEVELS, (3, demo.PIXELS))
    inp = torch.cat([torch.full_like(x[:, :1], demo.START), x[:, :-1]], 1)
    with torch.no_grad():
        par = m(inp)
        states, steps = [None] * len(m.blocks), []
        for t in range(demo.PIXELS):
            logits, states = m.step(inp[:, t], t, states)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), par, rtol=1e-4, atol=1e-4)


def test_pixel_softmax_kv_cache_matches_the_parallel_model():
    """The KV-cache sampler (a preallocated cache) scores a sequence exactly as the parallel forward does."""
    import torch

    demo = _load("pixel_digits")
    torch.manual_seed(0)
    m = demo.PixelModel("softmax", dim=16, heads=2, layers=2, levels=5, pixels=11).eval()
    x = torch.randint(0, 5, (3, 11))
    with torch.no_grad():
        par = m(m.shifted(x))
        states, steps = [None] * len(m.blocks), []
        for t, tok in enumerate(m.shifted(x).unbind(1)):
            logits, states = m.step(tok, t, states)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), par, rtol=1e-4, atol=1e-4)


def test_pixel_patches_are_raster_order_with_channels_innermost():
    import torch

    demo = _load("pixel_digits")
    img = torch.arange(7 * 9 * 3).reshape(7, 9, 3)  # 2 x 3 patches of 3 x 3; the last row is dropped
    p = demo.patches(img, 3)
    assert p.shape == (6, 27)
    for i in range(6):
        r, c = divmod(i, 3)
        assert torch.equal(p[i], img[3 * r : 3 * r + 3, 3 * c : 3 * c + 3].reshape(-1))


def test_pixel_recompute_time_interpolates_between_timed_steps():
    demo = _load("pixel_digits")
    tm = demo.Timing("x", n=2, positions=[0, 1, 2, 6, 7], step_seconds=[1.0, 1.0, 1.0, 5.0, 5.0], tokens=[],
                     pixels=8, generated=3)
    assert tm.extrapolated and tm.seconds == 3 * 1.0 + (2 + 3 + 4) + 2 * 5.0
    assert tm.images_per_second == 2 / tm.seconds


def test_pixel_generation_at_the_papers_lengths_tiny(tmp_path):
    """784-token upsampled digits and 3072-token photo patches, end to end at a tiny size (about 10 s)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import torch

    demo = _load("pixel_digits")
    train_x, test_x = demo.load_digits("cpu", 28, 256)
    assert train_x.shape == (1500, 784) and test_x.shape == (297, 784)
    assert train_x.min() == 0 and train_x.max() == 255
    threads = torch.get_num_threads()
    try:
        results = demo.main(["--data", "paper", "--tiny", "--threads", "1", "--backend", "torch",
                             "--out", str(tmp_path / "s.png"), "--plot", str(tmp_path / "t.png"),
                             "--table", str(tmp_path / "t.md")])
    finally:
        torch.set_num_threads(threads)
    assert sorted(results) == ["digits28", "photos32"]
    assert all(len(r) == 3 and all(v > 0 for v in r.values()) for r in results.values())
    for name in ("s-digits28.png", "s-photos32.png", "t.png"):
        assert (tmp_path / name).stat().st_size > 1000
    table = (tmp_path / "t.md").read_text()
    assert "| 784 | softmax, recomputed each step |" in table and "| 3072 | linear, RNN form" in table
    assert "142.8" in table and "17.85" in table and "extrapolated" in table
