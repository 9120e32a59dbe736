"""PNG summary of a SCORES dict: head heatmap, neuron and channel profiles, layer scores, and
for a mixture-of-experts model expert importance and routed-token heatmaps."""

from __future__ import annotations

from typing import Any, Dict


def plot_scores(scores: Dict[str, Any], path: str) -> None:
    """Writes a 2×2 figure (3×2 with experts) to ``path`` (matplotlib, no display needed)."""
    import matplotlib.pyplot as plt

    fig = scores_figure(scores)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scores_figure(scores: Dict[str, Any]):
    """The matplotlib figure of :func:`plot_scores`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = scores.get("meta", {})
    moe = "expert" in scores and "expert_tokens" in scores
    fig, axes = plt.subplots(3 if moe else 2, 2, figsize=(12, 13.5 if moe else 9))
    heat = axes[0, 0].imshow(scores["head"].float().numpy(), aspect="auto", cmap="viridis")
    axes[0, 0].set(title="attention head importance", xlabel="head", ylabel="layer")
    fig.colorbar(heat, ax=axes[0, 0], label="head score")

    neuron = scores["neuron"].float()
    layers_n = neuron.shape[0]
    colours = matplotlib.colors.Normalize(vmin=0, vmax=max(1, layers_n - 1))
    for layer in range(layers_n):
        if not bool((neuron[layer] > 0).any()):  # a MoE layer of a mixed stack: no dense MLP
            continue
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
    if moe:
        _expert_panels(fig, axes[2], scores)
    fig.suptitle(f"importance ({meta.get('aggregation', '?')} aggregation, "
                 f"{meta.get('num_samples', '?')} samples, {meta.get('num_tokens', '?')} tokens)")
    fig.tight_layout()
    return fig


def _expert_panels(fig, axes, scores: Dict[str, Any]) -> None:
    """Expert importance and each expert's share of its layer's routed tokens, per layer."""
    tokens = scores["expert_tokens"].float()
    share = tokens / tokens.sum(dim=1, keepdim=True).clamp_min(1)
    for ax, values, title, label in (
            (axes[0], scores["expert"].float(), "expert importance", "expert score"),
            (axes[1], share, "routed-token share", "share of the layer's routed tokens")):
        heat = ax.imshow(values.numpy(), aspect="auto", cmap="viridis")
        ax.set(title=title, xlabel="expert", ylabel="layer")
        fig.colorbar(heat, ax=ax, label=label)
