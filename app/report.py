"""The closing report of a full run: a stage table, the model against the popularity baseline,
example recommendations, where every output is, and a plot of validation metrics per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

UNITS = {"prepare": "rows", "tune": "trials", "train": "samples", "infer": "users"}


def plot_history(history: list[dict[str, Any]], path: Path, ks: list[int]) -> None:
    """Validation Recall@K and NDCG@K per epoch, the popularity baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("recall", "ndcg")):
        for k in ks:
            line, = ax.plot(epochs, [h.get(f"val_{name}@{k}") for h in history], marker="o",
                            label=f"model {name}@{k}")
            ax.axhline(history[-1].get(f"popularity_val_{name}@{k}", float("nan")),
                       linestyle="--", color=line.get_color(), alpha=0.7,
                       label=f"popularity {name}@{k}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {name}@K")
        ax.set_xticks(epochs)
        ax.legend(fontsize=7)
    fig.suptitle("two-tower model vs popularity baseline (validation split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples(recommendations: Path, users: int = 3, k: int = 5) -> str:
    """The first ``users`` users' top ``k`` items (with titles when known), as text."""
    df = pd.read_parquet(recommendations)
    if df.empty:
        return "  (no recommendations)"
    first = sorted(df["userId"].unique())[:users]
    lines = []
    for user in first:
        rows = df[(df["userId"] == user) & (df["rank"] <= k)].sort_values("rank")
        titles = rows["title"] if "title" in rows else pd.Series([None] * len(rows))
        names = [str(t) if pd.notna(t) else str(m)
                 for m, t in zip(rows["movieId"], titles.to_numpy())]
        lines.append(f"  user {user}: " + "; ".join(names))
    return "\n".join(lines)


def render(summary: dict[str, Any]) -> str:
    """The report as text (see :func:`pipelines.full_run.run` for the summary's shape)."""
    bar = "=" * 78
    out = [bar, f"{'stage':<10}{'seconds':>10}{'count':>14}{'per second':>14}  unit"]
    for name, st in summary["stages"].items():
        rate = st["rows"] / st["seconds"] if st["seconds"] else float("nan")
        out.append(f"{name:<10}{st['seconds']:>10.1f}{st['rows']:>14,}{rate:>14,.1f}  "
                   f"{UNITS.get(name, 'rows')}")
    stages = summary["stages"]
    if "train" in stages:
        m = stages["train"]["metrics"]
        out.append("")
        out.append("test split, full-catalog ranking: the model vs the popularity baseline")
        keys = sorted(k for k in m["model"]["test"] if "@" in k)
        for key in sorted(keys, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))):
            model, pop = m["model"]["test"][key], m["popularity"]["test"][key]
            out.append(f"  {key:<10} {model:.4f}  vs {pop:.4f}  ({model / pop:.2f}x)"
                       if pop else f"  {key:<10} {model:.4f}  vs {pop:.4f}")
    if "infer" in stages and summary.get("examples"):
        out.append("")
        out.append("example recommendations:")
        out.append(summary["examples"])
    out.append("")
    out.append("outputs:")
    for label, key in (("dataset", "prepare"), ("sweep", "tune"), ("model", "train"),
                       ("recommendations", "infer")):
        if key in stages:
            out.append(f"  {label:<18}{stages[key]['output']}")
    if "train" in stages:
        ml = stages["train"]["mlflow"]
        out.append(f"  {'mlflow run':<18}{ml['run_id']} ({summary.get('tracking_uri', '')})")
        out.append(f"  {'registered model':<18}{ml['registered_uri']}")
    if summary.get("plot"):
        out.append(f"  {'plot':<18}{summary['plot']}")
    out.append(f"  {'summary':<18}{summary['workdir']}/summary.json")
    out.append(bar)
    return "\n".join(out)
