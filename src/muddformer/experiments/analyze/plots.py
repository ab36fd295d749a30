"""The plots of `mudd analyze`: cosine similarity, head activation and dense-weight heat maps.

Each takes the per-model reports of analyze.analyze_folder (one model, or two with --compare: the
second drawn dashed, or in a second row of heat maps) and writes a PNG atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from muddformer.plotting import pyplot, save_png

STREAM_COLORS = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green", "r": "tab:red", "x": "tab:purple"}
LINE_STYLES = ("-", "--")


def _label(model: dict) -> str:
    name = Path(model["folder"]).name
    return name if name == model["connection"] else f"{name} ({model['connection']})"


def _integer_ticks(*axes) -> None:
    """Layer and source indices are whole numbers: no 0.5 ticks."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def plot_cosine(models: list[dict], path: Path) -> None:
    """One line per stream over the block pairs (l, l+1); the second model dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for style, model in zip(LINE_STYLES, models):
        cos = model["cosine_similarity"]
        for stream in cos["streams"]:
            ax.plot(
                range(len(cos["mean"][stream])),
                cos["mean"][stream],
                style,
                marker=".",
                color=STREAM_COLORS[stream],
                label=f"{_label(model)} {stream}",
            )
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("block l (input of block l vs block l+1)")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title("Representation collapse: similarity of adjacent block inputs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)


def plot_head_activation(models: list[dict], path: Path) -> None:
    """Share of active (head, query) pairs per layer; the second model dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for style, model in zip(LINE_STYLES, models):
        ratio = [np.nan if r is None else r for r in model["head_activation"]["ratio"]]
        ax.plot(range(len(ratio)), ratio, style, marker="o", label=_label(model))
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention-head activation ratio")
    ax.set_ylim(0, 1.02)
    ax.set_title("Active heads: largest attention weight off the sinks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)


def plot_dense_weights(models: list[dict], path: Path) -> None:
    """Heat maps of the mean dense weights: one row per dense model, one panel per stream,
    rows = layer l (aggregation after block l), columns = source state j (0 = embedding)."""
    plt = pyplot()
    dense = [m for m in models if "mean" in m["dense_weights"]]
    cols = max(len(m["dense_weights"]["streams"]) for m in dense)
    fig, axes = plt.subplots(
        len(dense), cols, figsize=(3.2 * cols + 1.0, 3.2 * len(dense) + 0.4), squeeze=False, layout="constrained"
    )
    for row, model in zip(axes, dense):
        grids = {s: np.array(g, dtype=float) for s, g in model["dense_weights"]["mean"].items()}  # None -> nan
        scale = max(float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 0.0 for g in grids.values()) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.9")  # grey: cells a layer does not mix
        for ax, (stream, grid) in zip(row, grids.items()):
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-scale, vmax=scale, aspect="auto")
            ax.set_title(f"{_label(model)}: {stream}", fontsize="small")
            _integer_ticks(ax.xaxis, ax.yaxis)
            ax.set_xlabel("source j (0 = embedding)")
            ax.set_ylabel("layer l")
        for ax in row[len(grids) :]:
            ax.axis("off")
        fig.colorbar(image, ax=list(row), shrink=0.8)
    fig.suptitle("Mean dense-connection weights (rows: aggregation after block l)")
    save_png(fig, path)


def write_plots(models: list[dict], out: Path) -> list[str]:
    """Write the plots into `out`; returns the file names (the heat maps only when a model is dense)."""
    plot_cosine(models, out / "cosine_similarity.png")
    plot_head_activation(models, out / "head_activation.png")
    names = ["cosine_similarity.png", "head_activation.png"]
    if any("mean" in m["dense_weights"] for m in models):
        plot_dense_weights(models, out / "dense_weights.png")
        names.append("dense_weights.png")
    return names


def logged(train: list[dict], value) -> tuple[list[int], list[float]]:
    """The steps whose record has `value(record)` (not None) and those values: a series is drawn only where it was
    logged, so that records without it (telemetry off for some steps) leave no gaps that break the line."""
    points = [(r["step"], v) for r in train if (v := value(r)) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def mean_of(record: dict, keys: list[str]) -> float | None:
    values = [record[k] for k in keys if k in record]
    return float(np.mean(values)) if values else None


def plot_telemetry(records: list[dict], path: Path, title: str) -> None:
    """A run's training telemetry over steps: loss and per-group gradient norms; the largest |dense weight|
    after each block; the spread of the dense weights over tokens, per stream (mean over layers)."""
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    fig, (ax_loss, ax_max, ax_spread) = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    ax_loss.plot(*logged(train, lambda r: r["loss"]), color="black", label="loss")
    ax_grad = ax_loss.twinx()
    for key in sorted({k for r in train for k in r if k.startswith("grad_norm/")}):
        ax_grad.plot(*logged(train, lambda r, key=key: r.get(key)), label=key.split("/", 1)[1], alpha=0.8)
    ax_grad.set_yscale("log")
    ax_grad.set_ylabel("gradient norm (before clipping)")
    ax_grad.legend(fontsize="small", loc="upper right")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Loss (black) and gradient norm per group")
    dense = sorted({k for r in train for k in r if k.startswith("dense/")})
    layers = sorted({int(k.split("/")[1]) for k in dense})
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        keys = [k for k in dense if k.startswith(f"dense/{layer}/") and k.endswith("/max_abs")]
        ax_max.plot(
            *logged(train, lambda r, keys=keys: max((r[k] for k in keys if k in r), default=None)),
            color=cmap(i / max(1, len(layers) - 1)),
            label=f"after block {layer}" if len(layers) <= 12 else None,
        )
    ax_max.set_yscale("log")
    ax_max.set_title("Largest |dense weight| after each block")
    ax_max.set_xlabel("step")
    if 0 < len(layers) <= 12:
        ax_max.legend(fontsize="x-small", ncol=2)
    for stream in sorted({k.split("/")[2] for k in dense}):
        keys = [k for k in dense if k.split("/")[2] == stream and k.endswith("/token_std")]
        ax_spread.plot(*logged(train, lambda r, keys=keys: mean_of(r, keys)), label=stream)
    ax_spread.set_title("Dense weights: spread over tokens\n(mean over layers)")
    ax_spread.set_xlabel("step")
    if dense:
        ax_spread.legend(fontsize="small", title="stream")
    fig.suptitle(title)
    save_png(fig, path)
