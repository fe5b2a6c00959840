"""The decode-speed chart: one panel per model, a group of bars per case, a bar per engine."""

from __future__ import annotations

from pathlib import Path


def can_draw() -> bool:
    """matplotlib is optional (the `bench` extra): without it every output but the chart."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def decode_chart(summary: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(cell["model"] for cell in summary))
    engines = list(dict.fromkeys(cell["engine"] for cell in summary))
    figure, axes = plt.subplots(len(models), 1, figsize=(max(8, 1.6 * len(engines) + 4),
                                                         3.2 * len(models)), squeeze=False)
    width = 0.8 / max(1, len(engines))
    colors = plt.get_cmap("tab10")
    for axis, model in zip(axes[:, 0], models, strict=True):
        cells = [cell for cell in summary if cell["model"] == model]
        cases = list(dict.fromkeys((cell["batch"], cell["prompt_tokens"]) for cell in cells))
        for index, engine in enumerate(engines):
            xs, heights, low, high = [], [], [], []
            for position, case in enumerate(cases):
                cell = next((c for c in cells if (c["batch"], c["prompt_tokens"]) == case
                             and c["engine"] == engine), None)
                spread = cell and cell["decode_tokens_per_s"]
                if spread:
                    xs.append(position + (index - (len(engines) - 1) / 2) * width)
                    heights.append(spread["median"])
                    low.append(spread["median"] - spread["min"])
                    high.append(spread["max"] - spread["median"])
            axis.bar(xs, heights, width, yerr=[low, high], capsize=2, label=engine,
                     color=colors(index % 10))
        axis.set_xticks(range(len(cases)), [f"batch {b}, prompt {p}" for b, p in cases])
        axis.set_ylabel("decode tokens/s")
        axis.set_title(model)
        axis.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
