"""Training report: side-by-side metrics of every model, plots, and the Markdown around them.

Pure functions over metrics and scores, plus the plot writers (matplotlib's Agg backend, no
display needed). ``train.py`` calls :func:`write_report` with the version folder.

Plots (PNG, in the version folder):

* ``roc.png`` and ``precision_recall.png``: the curves of every model on the test rows that the
  metrics are computed on (known compromised cards removed);
* ``feature_importance.png``: LightGBM gain share per feature;
* ``score_distribution.png``: LightGBM test scores by class (log-scaled counts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from training.card import ModelCard
from training.evaluate import Metrics

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
PLOT_FILES = {
    "roc": "roc.png",
    "precision_recall": "precision_recall.png",
    "feature_importance": "feature_importance.png",
    "score_distribution": "score_distribution.png",
}
PRIMARY_MODEL = "lightgbm"


def comparison_frame(metrics: Mapping[str, Metrics]) -> pd.DataFrame:
    """One row per model (in the given order): ROC AUC, AP, card precision@k."""
    rows = [
        {
            "model": name,
            "roc_auc": m.roc_auc,
            "average_precision": m.average_precision,
            "card_precision_at_k": m.card_precision_at_k,
            "k": m.k,
        }
        for name, m in metrics.items()
    ]
    return pd.DataFrame(
        rows, columns=["model", "roc_auc", "average_precision", "card_precision_at_k", "k"]
    )


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _k(metrics: Mapping[str, Metrics]) -> int:
    ks = {m.k for m in metrics.values()}
    return ks.pop() if len(ks) == 1 else 0


def markdown_table(metrics: Mapping[str, Metrics], best_marker: str = " **") -> str:
    """The side-by-side table in Markdown; the best value of each column is in bold."""
    frame = comparison_frame(metrics)
    k = _k(metrics)
    cols = ("roc_auc", "average_precision", "card_precision_at_k")
    best = {c: frame[c].max(skipna=True) for c in cols}
    head = f"| model | ROC AUC | average precision | card precision@{k or 'k'} |"
    lines = [head, "|---|---|---|---|"]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            text = _fmt(row[c])
            if best_marker and not math.isnan(row[c]) and row[c] == best[c]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(metrics: Mapping[str, Metrics]) -> str:
    """The side-by-side table as aligned plain text (for logs and ``str(result)``)."""
    k = _k(metrics)
    header = ("model", "ROC AUC", "AP", f"CP@{k or 'k'}")
    rows = [
        (name, _fmt(m.roc_auc), _fmt(m.average_precision), _fmt(m.card_precision_at_k))
        for name, m in metrics.items()
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        )
        for r in (header, *rows)
    ]
    return "\n".join(lines)


def rich_table(metrics: Mapping[str, Metrics], title: str | None = None) -> Table:
    """The side-by-side table for a rich console; the best value per column is bold."""
    k = _k(metrics)
    table = Table(title=title)
    table.add_column("model")
    for col in ("ROC AUC", "average precision", f"card precision@{k or 'k'}"):
        table.add_column(col, justify="right")
    frame = comparison_frame(metrics)
    cols = ("roc_auc", "average_precision", "card_precision_at_k")
    best = {c: frame[c].max(skipna=True) for c in cols}
    for _, row in frame.iterrows():
        cells = [
            f"[bold]{_fmt(row[c])}[/bold]" if row[c] == best[c] else _fmt(row[c]) for c in cols
        ]
        table.add_row(str(row["model"]), *cells)
    return table


def timings_table(timings: Mapping[str, float]) -> str:
    """Wall time per step as a Markdown table, with the total."""
    lines = ["| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {sec:.1f} |" for step, sec in timings.items()]
    lines.append(f"| **total** | **{sum(timings.values()):.1f}** |")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    y: np.ndarray, scores: Mapping[str, np.ndarray], roc_path: Path, pr_path: Path
) -> None:
    """ROC and precision-recall curves of every model on the same labelled rows."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    plt = _pyplot()
    y = np.asarray(y)
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(y, s)
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})", lw=2 if name == PRIMARY_MODEL else 1)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test window)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(roc_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, s in scores.items():
        precision, recall, _ = precision_recall_curve(y, s)
        ap = float(average_precision_score(y, s))
        ax.step(
            recall,
            precision,
            where="post",
            label=f"{name} (AP {ap:.3f})",
            lw=2 if name == PRIMARY_MODEL else 1,
        )
    ax.axhline(float(np.mean(y)), ls=":", c="grey", lw=1, label="fraud rate")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall (test window)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(pr_path, dpi=110)
    plt.close(fig)


def plot_importance(importance: pd.Series, path: Path) -> None:
    """Horizontal bars of the gain share per feature, largest on top."""
    plt = _pyplot()
    imp = importance.sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(imp) + 1.2))
    ax.barh(list(imp.index), imp.to_numpy())
    ax.set(xlabel="share of total gain", title="LightGBM feature importance (gain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_score_distribution(y: np.ndarray, score: np.ndarray, path: Path) -> None:
    """Histograms of the scores of legitimate and fraudulent test rows (log counts)."""
    plt = _pyplot()
    y = np.asarray(y)
    bins = np.linspace(0.0, 1.0, 51)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(score[y == 0], bins=bins, alpha=0.6, label=f"legitimate ({int((y == 0).sum())})")
    ax.hist(score[y == 1], bins=bins, alpha=0.6, label=f"fraud ({int((y == 1).sum())})")
    ax.set_yscale("log")
    ax.set(
        xlabel="LightGBM score",
        ylabel="transactions (log)",
        title="Score distribution by class (test window)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(
    folder: Path,
    y: np.ndarray,
    scores: Mapping[str, np.ndarray],
    importance: pd.Series,
    primary: str = PRIMARY_MODEL,
) -> dict[str, Path]:
    """Write every plot into ``folder``; returns the path per plot key of :data:`PLOT_FILES`."""
    paths = {key: folder / name for key, name in PLOT_FILES.items()}
    if np.unique(np.asarray(y)).size == 2:
        plot_curves(y, scores, paths["roc"], paths["precision_recall"])
    else:
        logger.warning("one class only in the test rows: no ROC/PR curves")
        del paths["roc"], paths["precision_recall"]
    plot_importance(importance, paths["feature_importance"])
    plot_score_distribution(np.asarray(y), np.asarray(scores[primary]), paths["score_distribution"])
    return paths


def _known(value: object) -> str:
    return "unknown" if value is None else str(value)


def _param(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def tuning_section(tuning: Mapping[str, Any]) -> list[str]:
    """The report's tuning lines: folds, every trial, the choice and why (Markdown)."""
    trials = tuning.get("trials", [])
    best = tuning.get("best", {})
    keys = list(trials[0]["params"]) if trials else []
    folds = tuning.get("folds", [])
    lines = [
        "## LightGBM tuning (time-ordered validation folds before the test window)",
        "",
        f"{len(folds)} folds replay the protocol (fit, gap, validate) on the history ending "
        "with the training window; known compromised cards are removed from the validation "
        "days as from the test days. Every candidate is boosted on every fold with early "
        "stopping on average precision; its score is the best mean validation AP over the "
        "folds at one shared number of rounds, which the final refit uses. "
        "The test window plays no part.",
        "",
    ]
    if folds:
        lines += [
            "| fold | fit days | validation days | fit rows (frauds) | validation rows (frauds) "
            "| removed known compromised |",
            "|---|---|---|---|---|---|",
            *(
                f"| {i} | {f['fit']} | {f['validation']} | {f['fit_rows']} ({f['fit_frauds']}) "
                f"| {f['validation_rows']} ({f['validation_frauds']}) "
                f"| {f['removed_known_compromised']} |"
                for i, f in enumerate(folds)
            ),
            "",
        ]
    lines += [
        "| " + " | ".join(keys) + " | mean validation AP | per fold | rounds |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for t in trials:
        mark = " (chosen)" if t["params"] == best.get("params") else ""
        per_fold = ", ".join(f"{a:.3f}" for a in t.get("fold_aps", []))
        lines.append(
            "| "
            + " | ".join(_param(t["params"][k]) for k in keys)
            + f" | {t['validation_ap']:.4f}{mark} | {per_fold} | {t['best_iteration']} |"
        )
    lines.append("")
    if best:
        chosen = ", ".join(f"{k}={_param(v)}" for k, v in best.get("params", {}).items())
        lines += [
            f"**Chosen:** {chosen}, {best.get('best_iteration')} rounds: the highest mean "
            f"validation AP ({best.get('validation_ap', float('nan')):.4f}) of "
            f"{len(trials)} candidates.",
            "",
        ]
    history = tuning.get("history") or {}
    if tried := history.get("trials"):
        lines += [
            "**History fitted on.** The folds were refitted with the defaults on each length "
            "of history before their gap, every length scored on the same validation rows "
            "(known compromised cards from the last training-window length of each fit "
            "window, as for the test window); the best mean validation AP wins, ties keep "
            "the shorter:",
            "",
            "| days | mean validation AP | per fold | rounds |",
            "|---|---|---|---|",
            *(
                f"| {t['days']} | {t['validation_ap']:.4f}"
                + (" (chosen)" if t["days"] == history.get("days") else "")
                + " | "
                + ", ".join(f"{a:.3f}" for a in t.get("fold_aps", []))
                + f" | {t['best_iteration']} |"
                for t in tried
            ),
            "",
            f"The search above ran on the {history.get('days')}-day folds, and the model and "
            "the baselines are fitted on that many days ending with the training window.",
            "",
        ]
    if seeds := tuning.get("refit_seeds"):
        lines += [
            f"**Refit:** the registered model averages {seeds} boosters refitted on the "
            "history fitted on (ending with the training window) with these parameters and "
            "rounds, of consecutive seeds (their row and feature sampling differ): one "
            "model, the mean of their log-odds.",
            "",
        ]
    cost = tuning.get("monotone_cost")
    if cost is not None:
        verdict = "kept" if best.get("params", {}).get("monotone") else "dropped"
        lines += [
            f"**Monotone constraints on terminal risk: {verdict}.** Best mean validation AP "
            f"without them minus best with them: {cost:+.4f}.",
            "",
        ]
    return lines


_METRIC_HEADS = ("ROC AUC", "average precision", "card precision@{k}")


def _signed(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.4f}"


def uncertainty_section(uncertainty: Mapping[str, Any]) -> list[str]:
    """Markdown lines for :meth:`training.uncertainty.Uncertainty.to_dict` (empty if absent).

    Every model's metrics with their bootstrap intervals, the primary model's difference to
    each other one (interval, share of replicates ahead), and card precision's ceiling.
    """
    metrics = uncertainty.get("metrics") or {}
    if not metrics:
        return []
    k = uncertainty.get("k", "k")
    cols = ("roc_auc", "average_precision", "card_precision_at_k")
    heads = [h.format(k=k) for h in _METRIC_HEADS]
    low, high = uncertainty.get("interval", [2.5, 97.5])
    primary = uncertainty.get("primary", PRIMARY_MODEL)
    models = list(metrics.get(cols[0], {}))
    lines = [
        "## How sure these numbers are",
        "",
        f"Paired bootstrap over the test window's {uncertainty.get('n_cards', '?')} cards, "
        f"{uncertainty.get('replicates', '?')} replicates: each redraws the cards with "
        "replacement (all of a card's transactions together) and scores every model on the "
        f"same draw; the brackets are the {low:g}-{high:g} % range of the replicates.",
        "",
        "| model | " + " | ".join(heads) + " |",
        "|---|---|---|---|",
    ]
    for name in models:
        cells = []
        for c in cols:
            iv = metrics.get(c, {}).get(name, {})
            cells.append(
                f"{_fmt(iv.get('value', math.nan))} "
                f"[{_fmt(iv.get('low', math.nan))}, {_fmt(iv.get('high', math.nan))}]"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    differences = uncertainty.get("differences") or {}
    if differences:
        lines += [
            "",
            f"{primary} minus each other model on the same replicates (in parentheses: the "
            f"share of replicates in which {primary} is ahead):",
            "",
            "| other model | " + " | ".join(heads) + " |",
            "|---|---|---|---|",
        ]
        for other, per in differences.items():
            cells = []
            for c in cols:
                d = per.get(c, {})
                cells.append(
                    f"{_signed(d.get('value', math.nan))} [{_signed(d.get('low', math.nan))}, "
                    f"{_signed(d.get('high', math.nan))}] ({100 * d.get('share_ahead', 0.0):.0f} %)"
                )
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    ceiling = uncertainty.get("card_precision_ceiling")
    if ceiling is not None:
        lines += [
            "",
            f"Card precision@{k} of an oracle that ranks every card with a fraud that day "
            f"first: {_fmt(ceiling)}, the most any model can reach on this window (each day "
            "holds only so many fraud cards that are not already known or detected).",
        ]
    return [*lines, ""]


def render_report(
    card: ModelCard,
    metrics: Mapping[str, Metrics],
    importance: pd.Series,
    timings: Mapping[str, float],
    plots: Mapping[str, Path],
    primary: str = PRIMARY_MODEL,
) -> str:
    """The Markdown report of one training run.

    Args:
        card: the registered version's card (name, version, windows, counts, tuning...);
            a key it lacks is reported as unknown.
        metrics: test metrics per model, the primary (registered) model included.
        importance: the primary model's gain share per feature, largest first.
        timings: wall seconds per step.
        plots: plot paths by :data:`PLOT_FILES` key (linked relatively).
    """
    m = metrics[primary]
    tuning = card.tuning or {}
    monotone = ", ".join(card.monotone_increasing or ()) or "nothing"
    lines = [
        f"# {card.name} {card.version}",
        "",
        f"- feature service: `{_known(card.feature_service)}` "
        f"({len(card.features or ())} features)",
        f"- training window: {_known(card.training_window)}"
        + (
            f"; fitted on {fitted}, the history the folds chose"
            if (fitted := card.wider_fit_window) is not None
            else ""
        )
        + f" ({_known(card.n_train)} transactions, {_known(card.n_train_frauds)} frauds)",
        f"- test window: {_known(card.test_window)}"
        f" ({m.n_transactions} transactions and {m.n_frauds} frauds after removing "
        f"{m.n_removed_known_compromised} rows of known compromised cards)",
        f"- registered model: LightGBM, {_known(card.best_iteration)} boosting rounds, "
        f"monotone increasing in {monotone}",
        f"- data fingerprint: `{_known(card.data_fingerprint)[:16]}`",
        "",
        "## Test metrics, side by side",
        "",
        "Same training rows and features for every model; the test window is only scored.",
        "",
        markdown_table(metrics),
        "",
        f"LightGBM card precision@{m.k} per test day: "
        + ", ".join(f"{d}: {v:.2f}" for d, v in m.card_precision_per_day.items()),
        "",
    ]
    if "roc" in plots:
        lines += [
            f"![ROC]({plots['roc'].name})",
            "",
            f"![Precision-recall]({plots['precision_recall'].name})",
            "",
        ]
    lines += uncertainty_section(card.uncertainty or {})
    if tuning:
        lines += tuning_section(tuning)
    lines += [
        "## LightGBM feature importance (gain)",
        "",
        "| feature | gain share |",
        "|---|---|",
        *(f"| {name} | {share:.3f} |" for name, share in importance.items()),
        "",
    ]
    if "feature_importance" in plots:
        lines += [f"![Feature importance]({plots['feature_importance'].name})", ""]
    if "score_distribution" in plots:
        lines += [f"![Score distribution]({plots['score_distribution'].name})", ""]
    lines += ["## Wall time per step", "", timings_table(timings), ""]
    return "\n".join(lines)
