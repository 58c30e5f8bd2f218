"""Simulated card transactions with fraud labels, exactly as specified in SIMULATOR.md.

The generator is deterministic for a seed (one ``numpy.random.Generator`` drives every draw, in a
fixed order) and vectorised: the only Python loops run over days (transaction generation, fraud
scenarios), with numpy doing the per-transaction work inside each iteration.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from stages.shared.schemas import LABEL_DELAY_DAYS

logger = logging.getLogger(__name__)

DAY_SECONDS = 86_400
TRANSACTIONS_FILE = "transactions.parquet"

# Scenario parameters (SIMULATOR.md, "Fraud scenarios").
SCENARIO1_AMOUNT = 220.0
SCENARIO2_TERMINALS_PER_DAY = 2
SCENARIO2_DAYS = 28
SCENARIO3_CUSTOMERS_PER_DAY = 3
SCENARIO3_DAYS = 14
SCENARIO3_FACTOR = 5.0

COLUMNS = (
    "transaction_id",
    "tx_datetime",
    "customer_id",
    "terminal_id",
    "amount",
    "tx_time_seconds",
    "tx_time_days",
    "is_fraud",
    "fraud_scenario",
)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Size, period and seed of one simulated data set (defaults: SIMULATOR.md)."""

    n_customers: int = 5_000
    n_terminals: int = 10_000
    nb_days: int = 183
    start_date: str = "2018-04-01"
    radius: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_customers < 1 or self.n_terminals < 1 or self.nb_days < 1:
            raise ValueError(f"n_customers, n_terminals and nb_days must be >= 1: {self}")
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")

    @property
    def start(self) -> pd.Timestamp:
        """Midnight UTC of the first simulated day."""
        ts = pd.Timestamp(self.start_date)
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


@dataclass(frozen=True, slots=True)
class Population:
    """Customer profiles, terminal locations and each customer's reachable terminals (CSR)."""

    customer_xy: np.ndarray
    mean_amount: np.ndarray
    std_amount: np.ndarray
    mean_nb_tx_per_day: np.ndarray
    terminal_xy: np.ndarray
    # Terminals of customer c are terminal_index[terminal_offsets[c]:terminal_offsets[c + 1]].
    terminal_offsets: np.ndarray
    terminal_index: np.ndarray

    @property
    def nb_terminals_per_customer(self) -> np.ndarray:
        return np.diff(self.terminal_offsets)


def make_population(config: SimulatorConfig, rng: np.random.Generator) -> Population:
    """Draw customer and terminal profiles and index the terminals each customer may use.

    A customer may use the terminals *strictly* within ``config.radius``: the k-d tree query is
    inclusive, so the candidates are filtered again on the exact distance.
    """
    n_c, n_t = config.n_customers, config.n_terminals
    customer_xy = rng.uniform(0.0, 100.0, size=(n_c, 2))
    mean_amount = rng.uniform(5.0, 100.0, size=n_c)
    std_amount = mean_amount / 2.0
    mean_nb_tx_per_day = rng.uniform(0.0, 4.0, size=n_c)
    terminal_xy = rng.uniform(0.0, 100.0, size=(n_t, 2))

    tree = cKDTree(terminal_xy)
    candidates = tree.query_ball_point(customer_xy, r=config.radius, return_sorted=True)
    lengths = np.fromiter((len(c) for c in candidates), dtype=np.int64, count=n_c)
    flat = (
        np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates])
        if lengths.sum()
        else np.empty(0, dtype=np.int64)
    )
    owner = np.repeat(np.arange(n_c), lengths)
    dist = np.hypot(*(terminal_xy[flat] - customer_xy[owner]).T)
    keep = dist < config.radius
    flat, owner = flat[keep], owner[keep]
    offsets = np.zeros(n_c + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_c), out=offsets[1:])
    return Population(
        customer_xy=customer_xy,
        mean_amount=mean_amount,
        std_amount=std_amount,
        mean_nb_tx_per_day=mean_nb_tx_per_day,
        terminal_xy=terminal_xy,
        terminal_offsets=offsets,
        terminal_index=flat,
    )


def _day_transactions(
    pop: Population, day: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One day's legitimate transactions: (customer, seconds since start, terminal, amount)."""
    n_terms = pop.nb_terminals_per_customer
    counts = rng.poisson(pop.mean_nb_tx_per_day)
    # A customer with no terminal in reach makes no transactions.
    counts[n_terms == 0] = 0
    customer = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    n = customer.size
    # int() truncates toward zero, as in the reference generator.
    t = np.trunc(rng.normal(DAY_SECONDS / 2, 20_000.0, size=n)).astype(np.int64)
    mean = pop.mean_amount[customer]
    amount = rng.normal(mean, pop.std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    amount = np.round(amount, 2)
    pick = np.floor(rng.random(n) * n_terms[customer]).astype(np.int64)
    terminal = pop.terminal_index[pop.terminal_offsets[customer] + pick]
    keep = (t > 0) & (t < DAY_SECONDS)
    seconds = day * DAY_SECONDS + t[keep]
    return customer[keep], seconds, terminal[keep], amount[keep]


def _apply_scenarios(
    config: SimulatorConfig,
    rng: np.random.Generator,
    customer: np.ndarray,
    terminal: np.ndarray,
    day: np.ndarray,
    amount: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label frauds with the three scenarios, in order; returns (amount, is_fraud, scenario)."""
    amount = amount.copy()
    is_fraud = np.zeros(amount.size, dtype=np.int8)
    scenario = np.zeros(amount.size, dtype=np.int8)
    last_day = int(day.max()) if day.size else 0

    # 1. Large amounts.
    big = amount > SCENARIO1_AMOUNT
    is_fraud[big] = 1
    scenario[big] = 1

    # 2. Two terminals per day compromised for 28 days; a (day, terminal) table avoids a join.
    compromised = np.zeros((last_day + 1, config.n_terminals), dtype=bool)
    n_term = min(SCENARIO2_TERMINALS_PER_DAY, config.n_terminals)
    for d in range(last_day):
        terms = rng.choice(config.n_terminals, size=n_term, replace=False)
        compromised[d : d + SCENARIO2_DAYS, terms] = True
    hit = compromised[day, terminal]
    is_fraud[hit] = 1
    scenario[hit] = 2

    # 3. Three customers per day compromised for 14 days: a third of their transactions in that
    # period are inflated. Transactions sorted by (customer, day) make each lookup a slice.
    by_customer = np.lexsort((day, customer))
    key = customer[by_customer] * (last_day + 1) + day[by_customer]
    n_cust = min(SCENARIO3_CUSTOMERS_PER_DAY, config.n_customers)
    for d in range(last_day):
        for c in rng.choice(config.n_customers, size=n_cust, replace=False):
            base = int(c) * (last_day + 1)
            lo, hi = np.searchsorted(key, [base + d, base + min(d + SCENARIO3_DAYS, last_day + 1)])
            n = int(hi - lo)
            if n // 3 == 0:
                continue
            idx = by_customer[lo + rng.choice(n, size=n // 3, replace=False)]
            amount[idx] = np.round(amount[idx] * SCENARIO3_FACTOR, 2)
            is_fraud[idx] = 1
            scenario[idx] = 3
    return amount, is_fraud, scenario


def simulate(config: SimulatorConfig | None = None, progress: bool = True) -> pd.DataFrame:
    """Generate the transactions of SIMULATOR.md.

    Args:
        config: size, period and seed; defaults to the reference configuration.
        progress: show a progress bar over the simulated days.

    Returns:
        One row per transaction, sorted by time, with the columns of :data:`COLUMNS`:
        ``transaction_id`` (int64, rank in time order; ties keep generation order),
        ``tx_datetime`` (UTC, ``datetime64[ns, UTC]`` holding whole seconds), ``customer_id``,
        ``terminal_id``, ``tx_time_seconds``, ``tx_time_days`` (int64), ``amount`` (float64,
        rounded to cents), ``is_fraud`` and ``fraud_scenario`` (int8, 0 = legitimate).
    """
    config = config or SimulatorConfig()
    rng = np.random.default_rng(config.seed)
    pop = make_population(config, rng)
    logger.info(
        "population: %d customers (%d without terminals), %d terminals, %.1f terminals/customer",
        config.n_customers,
        int((pop.nb_terminals_per_customer == 0).sum()),
        config.n_terminals,
        float(pop.nb_terminals_per_customer.mean()),
    )
    days = tqdm(range(config.nb_days), desc="simulating days", unit="day", disable=not progress)
    parts = [_day_transactions(pop, d, rng) for d in days]
    customer, seconds, terminal, amount = (np.concatenate(c) for c in zip(*parts, strict=True))
    order = np.argsort(seconds, kind="stable")
    customer, seconds, terminal, amount = (a[order] for a in (customer, seconds, terminal, amount))
    day = seconds // DAY_SECONDS

    amount, is_fraud, scenario = _apply_scenarios(config, rng, customer, terminal, day, amount)
    df = pd.DataFrame(
        {
            "transaction_id": np.arange(seconds.size, dtype=np.int64),
            "tx_datetime": config.start + pd.to_timedelta(seconds, unit="s"),
            "customer_id": customer.astype(np.int64),
            "terminal_id": terminal.astype(np.int64),
            "amount": amount.astype(np.float64),
            "tx_time_seconds": seconds.astype(np.int64),
            "tx_time_days": day.astype(np.int64),
            "is_fraud": is_fraud,
            "fraud_scenario": scenario,
        }
    )
    df["tx_datetime"] = df["tx_datetime"].astype("datetime64[ns, UTC]")
    logger.info(
        "simulated %d transactions, %d frauds (%.3f%%)",
        len(df),
        int(is_fraud.sum()),
        100.0 * float(is_fraud.mean()) if len(df) else 0.0,
    )
    return df


def labels_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The labels as they become known, ``LABEL_DELAY_DAYS`` after each transaction.

    Returns:
        ``transaction_id``, ``terminal_id``, ``customer_id``, ``is_fraud``, ``tx_datetime`` and
        ``known_at`` (= ``tx_datetime`` + 7 days), sorted by ``known_at`` then transaction id.
    """
    labels = df[["transaction_id", "terminal_id", "customer_id", "is_fraud", "tx_datetime"]].copy()
    labels["known_at"] = labels["tx_datetime"] + pd.Timedelta(days=LABEL_DELAY_DAYS)
    return labels.sort_values(["known_at", "transaction_id"], kind="stable").reset_index(drop=True)


def write_dataset(df: pd.DataFrame, data_dir: Path) -> Path:
    """Write the transactions to ``data_dir / transactions.parquet`` atomically (temp + rename).

    Returns:
        The path written.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TRANSACTIONS_FILE
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".transactions-", suffix=".parquet")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote %d transactions to %s", len(df), path)
    return path


def read_dataset(data_dir: Path) -> pd.DataFrame:
    """Read the transactions written by :func:`write_dataset`.

    Raises:
        FileNotFoundError: with a sentence saying how to create the data set.
    """
    path = data_dir / TRANSACTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: simulate the data set first")
    return pd.read_parquet(path)
