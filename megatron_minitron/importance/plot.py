"""PNG summary of a SCORES dict: head heatmap, neuron and channel profiles, layer scores."""

from __future__ import annotations

from typing import Any, Dict


def plot_scores(scores: Dict[str, Any], path: str) -> None:
    """Writes a 2×2 figure to ``path`` (matplotlib, no display needed)."""
    import matplotlib.pyplot as plt

    fig = scores_figure(scores)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scores_figure(scores: Dict[str, Any]):
    """The 2×2 matplotlib figure of :func:`plot_scores`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = scores.get("meta", {})
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    heat = axes[0, 0].imshow(scores["head"].float().numpy(), aspect="auto", cmap="viridis")
    axes[0, 0].set(title="attention head importance", xlabel="head", ylabel="layer")
    fig.colorbar(heat, ax=axes[0, 0], label="head score")

    neuron = scores["neuron"].float()
    layers_n = neuron.shape[0]
    colours = matplotlib.colors.Normalize(vmin=0, vmax=max(1, layers_n - 1))
    for layer in range(layers_n):
        axes[0, 1].plot(neuron[layer].sort(descending=True).values.numpy(), lw=0.8,
                        color=plt.cm.plasma(colours(layer)))
    axes[0, 1].set(title="MLP neuron importance, sorted per layer", xlabel="rank",
                   ylabel="score", yscale="log")
    key = matplotlib.cm.ScalarMappable(norm=colours, cmap=plt.cm.plasma)
    fig.colorbar(key, ax=axes[0, 1], label="layer")

    channel = scores["channel"].float().sort(descending=True).values.numpy()
    axes[1, 0].plot(channel)
    axes[1, 0].set(title="embedding channel importance, sorted", xlabel="rank", ylabel="score",
                   yscale="log")

    ax = axes[1, 1]
    layers = range(len(scores["layer_bi"]))
    bi = scores["layer_bi"].float().numpy()
    ax.bar(layers, bi, color="tab:blue", label="BI (1 − cos)")
    ax.set(title="layer importance", xlabel="layer", ylabel="Block Importance (log)")
    if len(bi) and (bi > 0).all():  # layer 0 (≈1) would flatten every other bar on a linear axis
        ax.set_yscale("log")
    if "layer_ppl" in scores:
        twin = ax.twinx()
        twin.plot(layers, scores["layer_ppl"].float().numpy(), color="tab:red", marker="o",
                  label="PPL with layer removed")
        twin.set_ylabel("perplexity without the layer", color="tab:red")
        twin.set_yscale("log")
    ax.legend(loc="upper left")
    fig.suptitle(f"importance ({meta.get('aggregation', '?')} aggregation, "
                 f"{meta.get('num_samples', '?')} samples, {meta.get('num_tokens', '?')} tokens)")
    fig.tight_layout()
    return fig
