"""The offline side of a run: the Feast offline store backfilled from a data set, and the
skew check of a replay (served features and Feast's offline join against the batch
definitions). Used by ``rtpipe backfill``, ``rtpipe check-skew`` and the demo.
"""

from __future__ import annotations

from datetime import date

import orjson
import pandas as pd

from stages.ops.audit import read_topic
from stages.ops.replay import ReplayPlan
from stages.shared.settings import Settings
from training.skew import SkewReport


def skew_check(
    settings: Settings,
    start: str | date,
    days: float,
    *,
    offline: bool = True,
    tx: pd.DataFrame | None = None,
    history_days: int = 0,
) -> SkewReport:
    """Skew check of a replay: served features (prediction records) and Feast's offline
    join, both against the batch definitions. The replay's customer windows start empty at
    ``start`` (the replay sends no earlier transactions), so that is the history start."""
    from training.simulate import read_dataset
    from training.skew import check_skew, predictions_frame

    tx = read_dataset(settings.data_dir) if tx is None else tx
    begin = pd.Timestamp(start, tz="UTC")
    window = ReplayPlan(begin, begin + pd.Timedelta(days=days))
    topic = settings.topics.name("predictions")
    records = [orjson.loads(v) for _, v, _ in read_topic(settings, topic) if v is not None]
    return check_skew(
        settings,
        tx,
        predictions_frame(records),
        window.transaction_ids(tx),
        history_start=begin - pd.Timedelta(days=history_days),
        offline=offline,
    )


def backfill(settings: Settings, tx: pd.DataFrame) -> None:
    """Replace the offline store's history with the batch features of ``tx``."""
    from training.features import backfill_offline_store

    backfill_offline_store(settings, tx, replace=True)
