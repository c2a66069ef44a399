"""The paper's image-generation experiment: autoregressive pixel transformers, linear and softmax.

Trains a linear transformer (lintx_triton.nn.LinearAttention) and the same network with softmax
attention on images that ship inside scikit-learn (nothing is downloaded), measures test bits per
dimension, then generates images three ways and times every generated token:

* linear, the RNN form: one `step` per token from a constant-size state;
* softmax with a KV cache: each token attends over the cached keys and values so far;
* softmax recomputed from scratch: the whole prefix runs through the network for every token.

Three image sets, one code path (`--data`):

* digits8:  scikit-learn's digits, 8x8 pixels, 17 grey levels: 64 tokens (the default);
* digits28: the same digits upsampled (bilinear) to 28x28, 256 grey levels: 784 tokens, MNIST's size;
* photos32: 32x32x3 patches cut from scikit-learn's two sample photographs, 256 levels per channel:
  3072 tokens (pixels in raster order, R G B within a pixel), CIFAR-10's size.

    python examples/pixel_digits.py                    # digits8, 600 steps per model: about 2 minutes
    python examples/pixel_digits.py --steps 200 --images 16 --out digits.png
    python examples/pixel_digits.py --data paper --threads 1 --out examples/samples.png \\
        --plot examples/generation_time.png --table examples/generation.md   # 784 and 3072: 7 minutes

At 3072 tokens softmax recomputed at each step costs about 90 s per image on a 2-core CPU: it
generates the first `recompute_prefix` tokens, times single steps at positions spread over the rest
and interpolates between them, and says so. Uses the GPU when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import pathlib
import time

import torch
from torch import nn
from torch.nn import functional as F

import lintx_triton as lx

LEVELS = 17  # grey levels 0..16 of the 8x8 digits
PIXELS = 64
START = LEVELS  # the token before the first pixel (each model's `start` is its `levels`)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """An image set and the sizes of the experiment on it (the model, training, generation)."""

    name: str
    title: str
    shape: tuple[int, int, int]  # height, width, channels
    levels: int
    dim: int = 64
    heads: int = 4
    layers: int = 3
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    train_seconds: float = 300.0  # a cap per model, on top of `steps`
    images: int = 32  # generated per method
    recompute_images: int = 32
    recompute_prefix: int | None = None  # softmax recomputed: tokens generated before timing samples
    recompute_samples: int = 12  # positions timed after the prefix
    test_images: int | None = None  # None: the whole test split

    @property
    def pixels(self) -> int:
        return math.prod(self.shape)


# The 784- and 3072-token sizes are set so that `--data paper --threads 1` (both sets, both models)
# runs in under 10 minutes on a shared 2-core CPU (419 s there): one training step of 8 x 784 tokens
# took 0.15 s (linear) and 0.25 s (softmax), one of 2 x 3072 tokens 0.17 s and 0.55 s. lr 5e-3 with
# batches of 8: the linear model reached 4.10 bits/dim after 120 steps of 784 tokens, where lr 2e-3
# with batches of 16 reached 4.47.
IMAGE_SETS = {
    s.name: s
    for s in [
        ImageSet("digits8", "8x8 digits", (8, 8, 1), LEVELS),
        ImageSet("digits28", "digits upsampled to 28x28", (28, 28, 1), 256, dim=64, heads=4, layers=2,
                 steps=600, batch=8, lr=5e-3, train_seconds=400.0, images=16, recompute_images=4),
        ImageSet("photos32", "32x32x3 photo patches", (32, 32, 3), 256, dim=64, heads=4, layers=2,
                 steps=200, batch=2, lr=5e-3, train_seconds=400.0, images=8, recompute_images=1,
                 recompute_prefix=512, recompute_samples=16),
    ]
}
GROUPS = {"paper": ["digits28", "photos32"]}
# --tiny: every set at a size that only checks the code path runs (the tests, CI)
TINY = dict(dim=8, heads=2, layers=1, steps=1, batch=2, images=2, recompute_images=1, recompute_prefix=8,
            recompute_samples=3, test_images=4)

# Katharopoulos et al. (2020), autoregressive generation on a GPU, as reported there (quoted, not
# measured here): (table, data, tokens, [(method, bits/dim, images/s, speedup)]).
PAPER_TABLES = [
    ("Table 1", "MNIST 28x28", 784, [
        ("Softmax", 0.621, 0.45, "1x"),
        ("LSH-1", 0.745, 0.68, "1.5x"),
        ("LSH-4", 0.676, 0.27, "0.6x"),
        ("Linear (ours)", 0.644, 142.8, "317x"),
    ]),
    ("Table 2", "CIFAR-10 32x32x3", 3072, [
        ("Softmax", 3.47, 0.004, "1x"),
        ("Linear (ours)", 3.40, 17.85, "4462x"),
    ]),
]


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with the same projections and a KV-cache `step`."""

    def __init__(self, embed_dim: int, num_heads: int, max_len: int):
        super().__init__()
        self.h, self.d, self.max_len = num_heads, embed_dim // num_heads, max_len
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.h, self.d)
        return q.view(shape), k.view(shape), v.view(shape)

    def forward(self, x):
        q, k, v = (t.transpose(1, 2) for t in self._split(x))  # [B, H, T, d]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(x.shape))

    def step(self, x, cache):
        """One token x [B, E] against the cache (K, V [B, H, max_len, d] preallocated, t filled)."""
        q, k, v = self._split(x)  # [B, H, d]
        if cache is None:
            kv = x.new_empty(2, x.shape[0], self.h, self.max_len, self.d)
            cache = (kv[0], kv[1], 0)
        K, V, t = cache
        K[:, :, t], V[:, :, t] = k, v
        o = F.scaled_dot_product_attention(q[:, :, None], K[:, :, : t + 1], V[:, :, : t + 1])  # [B, H, 1, d]
        return self.out_proj(o.reshape(x.shape)), (K, V, t + 1)


class Block(nn.Module):
    def __init__(self, dim, heads, attention, backend="auto", max_len=PIXELS):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (lx.nn.LinearAttention(dim, heads, backend=backend) if attention == "linear"
                     else SoftmaxAttention(dim, heads, max_len))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x, state):
        a, state = self.attn.step(self.ln1(x), state)
        x = x + a
        return x + self.mlp(self.ln2(x)), state


class PixelModel(nn.Module):
    """Tokens are sub-pixel values 0..levels-1 and a start token (`levels`); learned positions."""

    def __init__(self, attention: str, dim: int = 64, heads: int = 4, layers: int = 3, backend: str = "auto",
                 levels: int = LEVELS, pixels: int = PIXELS):
        super().__init__()
        self.levels, self.pixels, self.start = levels, pixels, levels
        self.tok = nn.Embedding(levels + 1, dim)
        self.pos = nn.Embedding(pixels, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attention, backend, pixels) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, levels)

    def forward(self, tokens):  # tokens [B, t] (start token first) -> logits [B, t, levels]
        x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))

    def step(self, token, t, states):  # one token at position t -> logits [B, levels]
        x = self.tok(token) + self.pos.weight[t]
        new = []
        for b, s in zip(self.blocks, states):
            x, s = b.step(x, s)
            new.append(s)
        return self.head(self.ln(x)), new

    def shifted(self, x):  # the inputs that predict x [B, T]: the start token, then x[:, :-1]
        return torch.cat([torch.full_like(x[:, :1], self.start), x[:, :-1]], 1)


def load_digits(device, size: int = 8, levels: int = LEVELS):
    """scikit-learn's 1797 digits ([N, size*size] tokens): 1500 to train, 297 to test."""
    from sklearn.datasets import load_digits as sk_digits

    x = torch.as_tensor(sk_digits().images, dtype=torch.float32)  # [N, 8, 8], values 0..16
    if size != 8:
        x = F.interpolate(x[:, None] / 16, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        x = x.clamp(0, 1) * (levels - 1)
    x = x.round().long().reshape(len(x), -1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x[perm].to(device)
    return x[:1500], x[1500:]


def patches(img, size: int):
    """Non-overlapping size x size patches of an image [H, W, C] (the edges that do not fill one are
    dropped), row by row: [N, size * size * C], pixels in raster order, channels within a pixel."""
    rows, cols, c = img.shape[0] // size, img.shape[1] // size, img.shape[2]
    t = img[: rows * size, : cols * size].reshape(rows, size, cols, size, c).permute(0, 2, 1, 3, 4)
    return t.reshape(rows * cols, size * size * c)


def load_photos(device, size: int = 32, test: int = 64):
    """Patches of scikit-learn's two 427x640 sample photographs (china.jpg, flower.jpg): 520 of
    32x32x3, `test` of them held out at random; tokens [N, size*size*3], values 0..255."""
    from sklearn.datasets import load_sample_images

    x = torch.cat([patches(torch.tensor(img), size) for img in load_sample_images().images]).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x[perm].to(device)
    return x[test:], x[:test]


def load(spec: ImageSet, device):
    if spec.name.startswith("digits"):
        train_x, test_x = load_digits(device, spec.shape[0], spec.levels)
    else:
        train_x, test_x = load_photos(device, spec.shape[0])
    return train_x, test_x[: spec.test_images]


def bits_per_dim(model, data, tokens: int = 16384):
    nll = 0.0
    with torch.no_grad():
        for x in data.split(max(1, tokens // model.pixels)):  # many small batches were 10x slower here
            logits = model(model.shifted(x))
            nll += F.cross_entropy(logits.reshape(-1, model.levels), x.reshape(-1), reduction="sum").item()
    return nll / data.numel() / math.log(2)


def train(model, train_x, max_steps: int, seconds: float, batch: int = 64, lr: float = 1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and time.perf_counter() - t0 < seconds:
        idx = torch.randint(len(train_x), (batch,), generator=g).to(train_x.device)
        x = train_x[idx]
        loss = F.cross_entropy(model(model.shifted(x)).reshape(-1, model.levels), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        # at lr 3e-3 without clipping the linear model diverged after ~2000 steps (4.8 bits/dim)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
    return steps


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def sample(logits, g):
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g).squeeze(1)


@torch.no_grad()
def rnn_tokens(model, n, device, g):
    """Yields n images' tokens [n], one position at a time, each from one `step` per layer: the RNN
    form for the linear model (a constant-size state (S, z)), a KV cache for the softmax model."""
    tok = torch.full((n,), model.start, device=device)
    states = [None] * len(model.blocks)
    for t in range(model.pixels):
        logits, states = model.step(tok, t, states)
        tok = sample(logits, g)
        yield tok


@torch.no_grad()
def recompute_tokens(model, n, device, g, prefix=None, sampled=()):
    """Yields n images' tokens [n]: every token re-runs the network over the whole prefix (no cache).
    Past `prefix` tokens it generates no more: at each position in `sampled` it runs that position's
    step over random tokens (its time does not depend on their values) and yields its junk token;
    at every other position it yields None at once."""
    seq = torch.full((n, 1), model.start, device=device)
    for t in range(model.pixels):
        if prefix is None or t < prefix:
            tok = sample(model(seq)[:, -1], g)
            seq = torch.cat([seq, tok[:, None]], 1)
            yield tok
        elif t in sampled:
            junk = torch.randint(model.levels, (n, t + 1), device=device, generator=g)
            junk[:, 0] = model.start
            yield sample(model(junk)[:, -1], g)
        else:
            yield None


def generate_rnn(model, n, device, g, tokens=None):
    return torch.stack(list(itertools.islice(rnn_tokens(model, n, device, g), tokens or model.pixels)), 1)


def generate_recompute(model, n, device, g, tokens=None):
    return torch.stack(list(itertools.islice(recompute_tokens(model, n, device, g), tokens or model.pixels)), 1)


@dataclasses.dataclass
class Timing:
    label: str
    n: int  # images per batch
    positions: list  # the positions whose step was timed (all of them, or a prefix and samples)
    step_seconds: list  # seconds of the step at each of `positions` (for the batch of n)
    tokens: list  # the token [n] each of those steps produced
    pixels: int
    generated: int  # positions 0..generated-1 were generated; later ones only timed

    @property
    def images(self) -> torch.Tensor:  # [n, generated]
        return torch.stack(self.tokens[: self.generated], 1)

    @property
    def extrapolated(self) -> bool:
        return self.generated < self.pixels

    @property
    def seconds(self) -> float:
        """For n whole images: the timed steps, plus the others interpolated between them."""
        import numpy as np

        rest = sorted(set(range(self.pixels)) - set(self.positions))
        return sum(self.step_seconds) + float(np.interp(rest, self.positions, self.step_seconds).sum())

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds


def measure_generation(spec: ImageSet, models, device, seed: int):
    """Runs the three generators in lockstep, one position each in turn, timing every step: all three
    share whatever else the machine does meanwhile (this CPU is shared; a burst of other work slows
    all three alike instead of whichever ran at the time)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for m in models.values():  # warm-up: first calls pick configs, allocate, fill caches
        generate_rnn(m, 2, device, g, tokens=4)
    generate_recompute(models["softmax"], 1, device, g, tokens=4)

    images = spec.images
    n_rec, prefix = min(spec.recompute_images, images), min(spec.recompute_prefix or spec.pixels, spec.pixels)
    sampled = set(torch.linspace(prefix, spec.pixels - 1, spec.recompute_samples).round().long().tolist()
                  if prefix < spec.pixels else [])
    streams = [("linear, RNN form (lintx step)", images, rnn_tokens(models["linear"], images, device, g)),
               ("softmax, KV cache", images, rnn_tokens(models["softmax"], images, device, g)),
               ("softmax, recomputed each step", n_rec,
                recompute_tokens(models["softmax"], n_rec, device, g, prefix, sampled))]
    timings = [Timing(label, n, [], [], [], spec.pixels, spec.pixels if i < 2 else prefix)
               for i, (label, n, _) in enumerate(streams)]
    for t in range(spec.pixels):
        for (_, _, stream), tm in zip(streams, timings):
            t0 = clock(device)
            tok = next(stream)
            dt = clock(device) - t0
            if tok is not None:
                tm.positions.append(t)
                tm.step_seconds.append(dt)
                tm.tokens.append(tok)
    return timings


def save_grid(rows, path, shape=(8, 8, 1), levels=LEVELS):
    """A PNG of generated images: one row of up to 16 per (label, images [n, tokens]); an image that
    is only a prefix is drawn black after it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w, c = shape
    ncol, cell, label_h = max(len(imgs) for _, imgs in rows), 0.8, 0.25  # inches
    W, H = max(ncol, 5) * cell, len(rows) * (cell + label_h)
    fig = plt.figure(figsize=(W, H))
    for r, (label, imgs) in enumerate(rows):
        y = 1 - r * (cell + label_h) / H
        fig.text(0.01, y - 0.05 / H, label, fontsize=8, va="top")
        for col in range(len(imgs)):
            ax = fig.add_axes([(col * cell + 0.04) / W, y - (label_h + cell - 0.04) / H, (cell - 0.08) / W,
                               (cell - 0.08) / H])
            ax.axis("off")
            img = torch.zeros(h * w * c, dtype=torch.long)
            img[: imgs.shape[1]] = imgs[col].cpu()
            img = img.numpy()
            if c == 1:
                ax.imshow(img.reshape(h, w), cmap="gray_r", vmin=0, vmax=levels - 1)
            else:
                ax.imshow(img.reshape(h, w, c) / (levels - 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def binned(times, bins: int):
    """(centre position, median seconds) per bin of consecutive steps: per-step timings are noisy."""
    t = torch.tensor(times, dtype=torch.float64)
    edges = torch.linspace(0, len(t), min(bins, len(t)) + 1).long().tolist()
    return ([(a + b - 1) / 2 for a, b in zip(edges, edges[1:]) if b > a],
            [t[a:b].median().item() for a, b in zip(edges, edges[1:]) if b > a])


def save_plot(results, path):
    """Time per generated token (per image) against its position, one panel per image set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:green", "tab:blue", "tab:red"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, (spec, _, timings) in zip(axes[0], results):
        for color, tm in zip(colors, timings):
            k = tm.generated
            x, y = binned(tm.step_seconds[:k], 64)
            ax.plot(x, [1e3 * s / tm.n for s in y], color=color,
                    label=f"{tm.label} ({tm.images_per_second:.3g} images/s)")
            if tm.extrapolated:
                ax.plot([x[-1]] + tm.positions[k:], [1e3 * s / tm.n for s in [y[-1]] + tm.step_seconds[k:]],
                        "o--", color=color, markersize=3,
                        label=f"  generated to {k}; then single steps timed, the rest interpolated")
        ax.set_yscale("log")
        ax.set_xlim(0, spec.pixels)
        ax.set_xlabel("position of the generated token")
        ax.set_ylabel("ms per token, per image")
        ax.set_title(f"{spec.title}: {spec.pixels} tokens", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Time per generated token (median of each 1/64 of the image)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results, device) -> str:
    lines = ["| images | tokens | method | bits/dim (test) | images/s | vs softmax recomputed |",
             "|---|---|---|---|---|---|"]
    paper = {tokens: (table, data, rows) for table, data, tokens, rows in PAPER_TABLES}
    for spec, bpd, timings in results:
        rec = timings[-1].images_per_second
        for tm in timings:
            kind = "linear" if tm.label.startswith("linear") else "softmax"
            note = f" (n = {tm.n}{', extrapolated' if tm.extrapolated else ''})"
            lines.append(f"| {spec.title}, here ({device}) | {spec.pixels} | {tm.label} | {bpd[kind]:.3f} | "
                         f"{tm.images_per_second:.4g}{note} | {tm.images_per_second / rec:.3g}x |")
        if spec.pixels in paper:
            table, data, rows = paper[spec.pixels]
            for method, pbpd, ips, speed in rows:
                if method in ("Softmax", "Linear (ours)"):
                    lines.append(f"| {data}, the paper's {table} (its GPU) | {spec.pixels} | {method} | "
                                 f"{pbpd} | {ips} | {speed} |")
    return "\n".join(lines) + "\n"


def run(spec: ImageSet, device, backend: str = "auto", seed: int = 0):
    """Trains both models on `spec`, measures bits/dim and generation: (bits/dim by model, timings)."""
    train_x, test_x = load(spec, device)
    print(f"\n{spec.name}: {len(train_x)} train / {len(test_x)} test images of {spec.title} "
          f"({spec.pixels} tokens, {spec.levels} levels); device {device}")
    models, bpd = {}, {}
    for kind in ("linear", "softmax"):
        torch.manual_seed(seed)
        m = PixelModel(kind, spec.dim, spec.heads, spec.layers, backend, spec.levels, spec.pixels).to(device)
        t0 = time.perf_counter()
        done = train(m, train_x, spec.steps, spec.train_seconds, spec.batch, spec.lr)
        m.eval()
        models[kind], bpd[kind] = m, bits_per_dim(m, test_x)
        print(f"{kind:8s} ({sum(p.numel() for p in m.parameters()) / 1e3:.0f}k parameters: dim {spec.dim}, "
              f"{spec.heads} heads, {spec.layers} layers) trained {done} steps of {spec.batch} in "
              f"{time.perf_counter() - t0:.0f} s: test {bpd[kind]:.3f} bits/dim "
              f"(uniform = {math.log2(spec.levels):.2f})")

    timings = measure_generation(spec, models, device, seed)
    print(f"generating {spec.title} ({spec.pixels} tokens) on {device}:")
    print(f"  {'method':32s} {'images':>6s} {'images/s':>10s} {'vs recompute':>13s}")
    for tm in timings:
        note = (f"  (first {tm.generated} tokens generated, {len(tm.positions) - tm.generated} later steps "
                f"timed, the rest interpolated)" if tm.extrapolated else "")
        print(f"  {tm.label:32s} {tm.n:6d} {tm.images_per_second:10.4g} "
              f"{tm.images_per_second / timings[-1].images_per_second:12.1f}x{note}")
    return bpd, timings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["digits8"], choices=[*IMAGE_SETS, *GROUPS],
                   help="image sets: digits8 (64 tokens), digits28 (784), photos32 (3072); paper = the last two")
    # digits8: 1500 training images: past ~600 steps of 64 both models overfit (2000+ steps: test bits/dim
    # rose from ~2.0 to 2.3 (linear) and 4.5 (softmax) here)
    p.add_argument("--steps", type=int, help="training steps per model (default: the image set's)")
    p.add_argument("--batch", type=int, help="training batch (default: the image set's)")
    p.add_argument("--train-seconds", type=float, help="time cap on training, per model (default: the set's)")
    p.add_argument("--images", type=int, help="images generated per method (default: the image set's)")
    p.add_argument("--out", default="digits.png",
                   help="PNG grid of generated images (with several sets: one per set, named OUT-SET.png)")
    p.add_argument("--plot", help="PNG of the time per generated token against its position")
    p.add_argument("--table", help="write the results as a Markdown table, beside the paper's, to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a shared 2-core CPU "
                   "1 thread trained 2-6x and generated 8-11x faster than 2: a busy core stalls both")
    p.add_argument("--tiny", action="store_true", help="a tiny size of every set, to check the code runs")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="lintx backend of the linear model (auto: Triton on a GPU, PyTorch on a CPU)")
    args = p.parse_args(argv)
    names = list(dict.fromkeys(n for d in args.data for n in GROUPS.get(d, [d])))
    overrides = {**(TINY if args.tiny else {}), **{k: v for k, v in [
        ("steps", args.steps), ("batch", args.batch), ("train_seconds", args.train_seconds),
        ("images", args.images)] if v is not None}}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")

    results = []
    for name in names:
        spec = dataclasses.replace(IMAGE_SETS[name], **overrides)
        bpd, timings = run(spec, device, args.backend, args.seed)
        results.append((spec, bpd, timings))
        out = pathlib.Path(args.out)
        if len(names) > 1:
            out = out.with_name(f"{out.stem}-{name}{out.suffix}")
        save_grid([(tm.label + (" (a prefix)" if tm.extrapolated else ""), tm.images[:16]) for tm in timings],
                  out, spec.shape, spec.levels)
        print(f"saved {out}")

    print("\nThe paper (Katharopoulos et al. 2020, on a GPU, as reported there):")
    for table, data, tokens, rows in PAPER_TABLES:
        if any(spec.pixels == tokens for spec, _, _ in results) or tokens == 784:
            print(f"  {table}: {data} ({tokens} tokens)")
            print(f"    {'method':30s} {'bits/dim':>9s} {'images/s':>10s} {'speedup':>8s}")
            for label, bpd, ips, speed in rows:
                print(f"    {label:30s} {bpd:9.3f} {ips:10.4g} {speed:>8s}")
    table = markdown_table(results, device)
    print("\n" + table)
    if args.table:
        pathlib.Path(args.table).write_text(table)
        print(f"saved {args.table}")
    if args.plot:
        save_plot(results, args.plot)
        print(f"saved {args.plot}")
    print(f"total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f} (1 min), "
          f"{os.getloadavg()[2]:.1f} (15 min)")
    rates = [{tm.label: tm.images_per_second for tm in timings} for _, _, timings in results]
    return rates[0] if len(rates) == 1 else {spec.name: r for (spec, _, _), r in zip(results, rates)}


if __name__ == "__main__":
    main()
