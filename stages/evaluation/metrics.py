"""Prometheus metrics of the evaluation stage, registered on the shared ``Metrics.registry``.

``rtpipe_online_precision`` (no label) is the precision at the *action* threshold, the series
the ``RtpipeOnlinePrecisionLow`` alert reads. Precision per routing threshold is
``rtpipe_online_precision_at{threshold="action"|"review"}``: one metric name cannot carry
both an unlabelled series and a ``threshold`` label without the alert also matching the
review threshold's (naturally lower) precision.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge

from stages.evaluation.drift import Drift, Reason
from stages.evaluation.quality import OnlineMetrics, ShadowComparison

_CACHE: weakref.WeakKeyDictionary[CollectorRegistry, EvaluationMetrics] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class EvaluationMetrics:
    roc_auc: Gauge
    average_precision: Gauge
    precision: Gauge
    precision_at: Gauge
    recall: Gauge
    ece: Gauge
    calibration_score: Gauge
    calibration_rate: Gauge
    labelled: Gauge
    score_psi: Gauge
    feature_psi: Gauge
    drift_window: Gauge
    labels_joined: Counter
    records: Counter
    retrain_requests: Counter
    shadow_average_precision: Gauge
    shadow_roc_auc: Gauge
    shadow_labelled: Gauge

    def set_online(self, m: OnlineMetrics) -> None:
        self.labelled.set(m.n)
        self.roc_auc.set(m.roc_auc)
        self.average_precision.set(m.average_precision)
        self.precision.set(m.precision["action"])
        for name in m.precision:
            self.precision_at.labels(name).set(m.precision[name])
            self.recall.labels(name).set(m.recall[name])
        self.ece.set(m.ece)
        for i, b in enumerate(m.calibration):
            self.calibration_score.labels(str(i + 1)).set(b.mean_score)
            self.calibration_rate.labels(str(i + 1)).set(b.fraud_rate)

    def set_comparisons(self, comparisons: list[ShadowComparison]) -> None:
        """Champion and shadow metrics on the events both scored, per shadow version."""
        for c in comparisons:
            self.shadow_labelled.labels(c.shadow).set(c.n)
            for role, ap, auc in (
                ("champion", c.champion_average_precision, c.champion_roc_auc),
                ("shadow", c.shadow_average_precision, c.shadow_roc_auc),
            ):
                self.shadow_average_precision.labels(c.shadow, role).set(ap)
                self.shadow_roc_auc.labels(c.shadow, role).set(auc)

    def set_drift(self, d: Drift) -> None:
        self.drift_window.set(d.n)
        self.score_psi.set(d.score_psi)
        for name, v in d.feature_psi.items():
            self.feature_psi.labels(name).set(v)


def evaluation_metrics(registry: CollectorRegistry) -> EvaluationMetrics:
    """The evaluation metrics on ``registry`` (created once per registry)."""
    found = _CACHE.get(registry)
    if found is not None:
        return found
    reg = registry
    nan = float("nan")

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        g = Gauge(name, doc, list(labels), registry=reg)
        if not labels:
            g.set(nan)
        return g

    m = EvaluationMetrics(
        roc_auc=gauge("rtpipe_online_roc_auc", "ROC AUC over the window of labelled predictions"),
        average_precision=gauge(
            "rtpipe_online_average_precision", "Average precision over the labelled window"
        ),
        precision=gauge(
            "rtpipe_online_precision", "Precision at the action threshold (labelled window)"
        ),
        precision_at=gauge(
            "rtpipe_online_precision_at",
            "Precision of score >= routing threshold (labelled window)",
            ("threshold",),
        ),
        recall=gauge(
            "rtpipe_online_recall",
            "Recall of score >= routing threshold (labelled window)",
            ("threshold",),
        ),
        ece=gauge("rtpipe_online_ece", "Expected calibration error over score deciles"),
        calibration_score=gauge(
            "rtpipe_online_calibration_mean_score", "Mean score per score decile", ("decile",)
        ),
        calibration_rate=gauge(
            "rtpipe_online_calibration_fraud_rate", "Fraud rate per score decile", ("decile",)
        ),
        labelled=gauge("rtpipe_online_window_labelled", "Labelled predictions in the window"),
        score_psi=gauge("rtpipe_score_psi", "PSI of live scores vs the training distribution"),
        feature_psi=gauge(
            "rtpipe_feature_psi", "PSI of a live feature vs its training distribution", ("feature",)
        ),
        drift_window=gauge("rtpipe_drift_window_predictions", "Predictions in the drift window"),
        labels_joined=Counter(
            "rtpipe_labels_joined", "Predictions joined with their label", registry=reg
        ),
        records=Counter(
            "rtpipe_evaluation_records",
            "Records consumed by the evaluation stage by kind and join outcome",
            ["kind", "outcome"],
            registry=reg,
        ),
        retrain_requests=Counter(
            "rtpipe_retrain_requests",
            "Retraining requests emitted, by primary reason",
            ["reason"],
            registry=reg,
        ),
        shadow_average_precision=gauge(
            "rtpipe_shadow_online_average_precision",
            "Average precision of the champion and of a shadow on the labelled events both scored",
            ("shadow_version", "role"),
        ),
        shadow_roc_auc=gauge(
            "rtpipe_shadow_online_roc_auc",
            "ROC AUC of the champion and of a shadow on the labelled events both scored",
            ("shadow_version", "role"),
        ),
        shadow_labelled=gauge(
            "rtpipe_shadow_online_labelled",
            "Labelled events in the window scored by both the champion and this shadow",
            ("shadow_version",),
        ),
    )
    # Every reason exported from the start (at 0), so increase() sees the first request.
    for reason in get_args(Reason):
        m.retrain_requests.labels(reason)
    _CACHE[registry] = m
    return m
