"""Figures written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..files import write_atomically


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    """Write the figure as a PNG atomically, with the umask's file mode, and close it."""
    plt = _pyplot()
    try:
        write_atomically(out, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return Path(out)


def _integer_ticks(nbins: int | str = "auto"):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=nbins, integer=True)


def read_keep_probabilities(metrics_file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps (S,) and per-block keep probabilities (S, L) from a learnable run's metrics.jsonl."""
    steps, rows = [], []
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        keys = sorted(k for k in record if k.startswith("keep_prob/"))
        if keys:
            steps.append(record["step"])
            rows.append([record[k] for k in keys])
    if not rows:
        raise ValueError(f"{metrics_file} has no keep_prob/* entries: is it the log of a learnable pruning run?")
    return np.asarray(steps), np.asarray(rows)


def plot_decisions(metrics_file: str | Path, out: str | Path, title: str | None = None, kept: Sequence[int] | None = None) -> Path:
    """The evolution of each block's keep probability over training (TinyFusion Figure 6):
    a heat map, blocks by steps, with the finally kept blocks marked."""
    plt = _pyplot()
    steps, probs = read_keep_probabilities(metrics_file)
    depth = probs.shape[1]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * depth + 1.2)), dpi=120)
    image = ax.imshow(
        probs.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, depth - 0.5),
    )
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(_integer_ticks())  # steps are whole numbers, also for a short run
    ax.set_ylabel("block")
    ax.set_yticks(range(depth))
    ax.tick_params(axis="y", labelsize=7 if depth > 16 else 9)
    if kept is not None:
        for i in kept:
            ax.annotate("kept", xy=(1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7, color="tab:green")
    fig.colorbar(image, ax=ax, label="probability the block is kept", pad=0.09 if kept is not None else 0.02)
    ax.set_title(title or "Learnable depth pruning: keep probability per block")
    fig.tight_layout()
    return _save(fig, out)


def plot_calibration_histogram(
    losses: Sequence[float],
    marks: Mapping[str, float],
    out: str | Path,
    title: str | None = None,
    bins: int = 50,
) -> Path:
    """Histogram of random masks' calibration losses with methods marked (TinyFusion Figure
    5). Log-spaced bins when the losses span more than a factor of 20."""
    plt = _pyplot()
    values = np.asarray(losses, dtype=float)
    every = np.concatenate([values, np.asarray(list(marks.values()), dtype=float)])
    low, high = float(every.min()), float(every.max())
    log_scale = low > 0 and high / low > 20
    edges = np.geomspace(low, high, bins + 1) if log_scale else np.linspace(low, high, bins + 1)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    ax.hist(values, bins=edges, color="0.7", edgecolor="0.45", label=f"{len(values)} random masks")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Methods that chose masks of the same loss (often the same mask) share one line and one
    # legend entry, instead of the last drawn hiding the others.
    groups: list[tuple[float, list[str]]] = []
    for name, value in sorted(marks.items(), key=lambda kv: kv[1]):
        if groups and np.isclose(groups[-1][0], value, rtol=1e-6, atol=0):
            groups[-1][1].append(name)
        else:
            groups.append((value, [name]))
    for i, (value, names) in enumerate(groups):
        ax.axvline(value, color=colors[i % len(colors)], linewidth=2, label=f"{' = '.join(names)}: {value:.4g}")
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel("calibration loss right after pruning (lower = better before fine-tuning)")
    ax.set_ylabel("masks")
    ax.yaxis.set_major_locator(_integer_ticks())  # counts of masks are whole numbers
    ax.set_title(title or "Calibration loss of random masks")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, out)


def plot_activation_histograms(
    layers: Sequence, out: str | Path, title: str | None = None, k: float | Sequence[float] | None = 2.0
) -> Path:
    """One histogram per block output (log counts) with its max, min and std written on it
    and mean +- k std marked for every k asked (TinyFusion Figure 8): spikes far outside the
    bands are the massive activations that masked RepKD drops."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ks = [] if k is None else ([float(k)] if np.isscalar(k) else [float(v) for v in k])
    styles = ["--", ":", "-.", (0, (5, 1))]
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for i, (ax, layer) in enumerate(zip(axes.flat, layers)):
        centers = (layer.edges[:-1] + layer.edges[1:]) / 2
        ax.bar(centers, np.maximum(layer.counts, 0.5), width=np.diff(layer.edges), color="0.45", log=True)
        for j, kj in enumerate(ks):
            for sign in (-1, 1):
                ax.axvline(layer.mean + sign * kj * layer.std, color="tab:red", linewidth=0.8, linestyle=styles[j % len(styles)])
        ax.set_title(f"block {layer.layer}", fontsize=9)
        ax.text(0.02, 0.97, f"max {layer.max:.3g}\nmin {layer.min:.3g}\nstd {layer.std:.3g}", transform=ax.transAxes,
                fontsize=7, va="top", family="monospace")
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a few ticks: long labels of large values do not overlap
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        if i + columns >= len(layers):  # the lowest plot of its column
            ax.set_xlabel("activation value", fontsize=8)
        if i % columns == 0:
            ax.set_ylabel("count (log scale)", fontsize=8)
    names = {"--": "dashed", ":": "dotted", "-.": "dash-dot"}
    band = (" (" + ", ".join(f"{names.get(styles[j % len(styles)], 'long-dashed')}: mean ± {kj:g} std" for j, kj in enumerate(ks)) + ")"
            if ks else "")
    fig.suptitle((title or "Block output activations") + band, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_speedup_curve(rows: Sequence[dict], out: str | Path, title: str | None = None) -> Path:
    """Measured speed-up against the compute ratio (full MACs / compressed MACs) for depth and
    width pruning, with the linear limit y = x (TinyFusion Figure 4)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    top = max(max(r["compute_ratio"] for r in rows), max(r["speedup"] for r in rows)) * 1.05
    ax.plot([1, top], [1, top], color="0.5", linestyle="--", label="linear limit (speed-up = compute ratio)")
    for kind, marker in (("depth", "o"), ("width", "s")):
        points = sorted((r["compute_ratio"], r["speedup"]) for r in rows if r["kind"] in (kind, "full"))
        ax.plot(*zip(*points), marker=marker, label=f"{kind} pruning")
    ax.set_xlabel("compute ratio (MACs of the full model / MACs of the pruned one)")
    ax.set_ylabel("measured speed-up (latency ratio)")
    ax.set_title("\n".join(textwrap.wrap(title or "Speed-up of depth and width pruning", 70)), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_widths(profile, out: str | Path, title: str | None = None) -> Path:
    """What a DyDiT model runs (the paper's Figures 5-6): active heads and active MLP groups
    per block over the timesteps as heat maps, and the measured share of tokens through each
    block's MLP over timestep bins."""
    plt = _pyplot()
    panels = 3 if profile.token_share is not None else 2
    depth = profile.heads.shape[0]
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 0.22 * depth + 2.4), dpi=110, squeeze=False)
    t = profile.timesteps
    extent = (float(t[0]), float(t[-1]), depth - 0.5, -0.5)
    for ax, values, what in ((axes[0, 0], profile.heads, "active attention heads"), (axes[0, 1], profile.groups, "active MLP groups")):
        image = ax.imshow(values, aspect="auto", interpolation="nearest", extent=extent, cmap="viridis",
                          vmin=1, vmax=profile.num_heads)
        ax.set_title(f"{what} (of {profile.num_heads})", fontsize=9)
        ax.set_xlabel("timestep (0 = clean image)")
        ax.set_ylabel("block")
        ax.yaxis.set_major_locator(_integer_ticks())
        bar = fig.colorbar(image, ax=ax)
        bar.locator = _integer_ticks()
        bar.update_ticks()
    if profile.token_share is not None:
        ax = axes[0, 2]
        edges = profile.token_bins
        image = ax.imshow(profile.token_share * 100, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=100,
                          extent=(float(edges[0]), float(edges[-1]), depth - 0.5, -0.5))
        ax.set_title("tokens through the MLP (%, measured)", fontsize=9)
        ax.set_xlabel("timestep (0 = clean image)")
        ax.set_ylabel("block")
        ax.yaxis.set_major_locator(_integer_ticks())
        fig.colorbar(image, ax=ax)
    fig.suptitle(title or "DyDiT: what each block runs over the timesteps", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_ratios(profile, out: str | Path, title: str | None = None) -> Path:
    """What a routed (DiffCR) model runs: the share of the tokens each block runs on in each
    timestep region (a heat map, each cell with its capacity k and the learned ratio), and the
    MAC ratio of each region against the dense model."""
    plt = _pyplot()
    depth, regions = profile.schedule.shape
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(4.0 + 1.3 * regions + 3.6, 0.32 * depth + 2.2), dpi=110,
                                   gridspec_kw={"width_ratios": [1.0 + 0.55 * regions, 2.2]})
    share = profile.kept_share
    image = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    small = depth <= 32 and regions <= 8
    if small:
        for layer in range(depth):
            for g in range(regions):
                ax.text(g, layer, f"k={profile.schedule[layer, g]} ({profile.ratios[layer, g]:.2f})", ha="center", va="center",
                        fontsize=7, color="white" if share[layer, g] < 0.6 else "black")
    labels = profile.region_labels()
    ax.set_xticks(range(regions))
    ax.set_xticklabels(labels, fontsize=8, rotation=0 if regions <= 4 else 45)
    ax.set_xlabel("timestep region" + (" (0 = clean image)" if profile.objective != "flow" else " (1 = clean image)"))
    ax.set_ylabel("block")
    ax.set_yticks(range(depth))
    ax.tick_params(axis="y", labelsize=7 if depth > 16 else 8)
    ax.set_title(f"tokens each block runs on (k of {profile.tokens}; learned ratio)" if small else
                 f"share of the {profile.tokens} tokens each block runs on", fontsize=9)
    fig.colorbar(image, ax=ax, label="k / tokens", fraction=0.05, pad=0.02)
    macs = np.asarray(profile.macs_ratio_per_region) * 100
    bars.bar(range(regions), macs, color="tab:blue")
    for g, v in enumerate(macs):
        bars.text(g, v + 1.5, f"{v:.1f}%", ha="center", fontsize=8)
    bars.axhline(macs.mean(), color="tab:red", linestyle="--", linewidth=1, label=f"mean {macs.mean():.1f}%")
    bars.set_xticks(range(regions))
    bars.set_xticklabels(labels, fontsize=8, rotation=0 if regions <= 4 else 45)
    bars.set_ylim(0, 110)
    bars.set_ylabel("MACs per step (% of the dense model)")
    bars.set_title("MAC ratio per timestep region", fontsize=9)
    bars.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "DiffCR: learned kept ratios per block and timestep region", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_token_maps(maps, steps: Sequence[int], out: str | Path, step_labels: Sequence[str] | None = None,
                    title: str | None = None) -> Path:
    """Which tokens a routed model ran on while sampling: per sample (a row) the generated image
    and, at each of `steps` (indices of the sampling steps) and on average over all steps, how
    many blocks ran on each token, as a heat map over the patch grid."""
    plt = _pyplot()
    n = maps.counts.shape[1]
    has_images = maps.images is not None
    columns = int(has_images) + len(steps) + 1
    fig, axes = plt.subplots(n, columns, figsize=(1.9 * columns + 0.9, 1.9 * n + 0.9), dpi=110, squeeze=False)
    labels = list(step_labels) if step_labels is not None else [f"t = {maps.timesteps[s]:g}" for s in steps]
    rows, cols = maps.grid
    annotate = rows * cols <= 64
    image = None
    for i in range(n):
        panels = [(maps.at(s)[i], labels[j]) for j, s in enumerate(steps)] + [(maps.mean()[i], "mean over all steps")]
        offset = 0
        if has_images:
            picture = maps.images[i]
            ax = axes[i, 0]
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray" if picture.shape[-1] == 1 else None,
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"sample (class {maps.labels[i]})" if i == 0 else f"class {maps.labels[i]}", fontsize=8)
            offset = 1
        for j, (values, label) in enumerate(panels):
            ax = axes[i, offset + j]
            image = ax.imshow(values, cmap="viridis", vmin=0, vmax=maps.depth, interpolation="nearest")
            if annotate:
                for r in range(rows):
                    for c in range(cols):
                        v = values[r, c]
                        ax.text(c, r, f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}", ha="center", va="center",
                                fontsize=6, color="white" if v < 0.6 * maps.depth else "black")
            if i == 0:
                ax.set_title(label, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"blocks that ran on the token (of {maps.depth})", fraction=0.03, pad=0.02)
    fig.suptitle(title or "DiffCR: which tokens the blocks ran on while sampling", fontsize=10)
    return _save(fig, out)
