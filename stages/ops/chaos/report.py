"""What a chaos run is given (:class:`ChaosConfig`: sizes and pacing) and what it reports
(:class:`FaultResult` per fault, :class:`ChaosReport` for the whole run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from training.simulate import SimulatorConfig

# Few customers over more days: as many transactions, but fewer of the labels that the
# replay sends first (five weeks of them, for complete terminal windows).
CHAOS_DATA = SimulatorConfig(n_customers=500, n_terminals=1_000, nb_days=48, seed=11)


@dataclass(frozen=True)
class ChaosConfig:
    """Size and pace of each scenario (small, so that all faults run in minutes)."""

    data: SimulatorConfig = CHAOS_DATA
    replay_start: str = "2018-05-05"
    replay_days: float = 3.0
    # Transactions per second: a few thousand last ~20 s, so the stages work on a stream.
    rate: float = 150.0
    kills: int = 3
    redis_outage_s: float = 30.0
    short_outage_s: float = 3.0
    kafka_down_s: float = 5.0
    # Runs of each fault in REPEATED, and whether the last runs beside a CPU-bound process.
    repeats: int = 3
    cpu_load_last: bool = True
    drain_timeout_s: float = 300.0
    seed: int = 0


@dataclass
class FaultResult:
    """What one fault did and what the audit found afterwards."""

    fault: str
    # Transactions the pipeline was given (in its input topic) and, of those, how many
    # have no outcome (lost) or more than one (duplicated).
    transactions: int = 0
    lost: int = 0
    # Replayed transactions acknowledged to the replay's producer but not in the input
    # topic after the fault (a restarted single broker dropped them): not the pipeline's
    # to decide, reported apart; every fault but a Kafka restart must have none.
    input_lost: int = 0
    # The same for replayed labels missing from the labels topic (left out of the terminal
    # windows' recomputation, as the pipeline never counted them).
    labels_lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    features_checked: dict[str, int] = field(default_factory=dict)
    features_missing: dict[str, int] = field(default_factory=dict)
    features_mismatched: dict[str, int] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    # Seconds from starting the stages to the first decision (start-up, join, first event).
    first_decision_s: float | None = None
    # The longest time between two consecutive decisions while the replay ran (seconds).
    longest_gap_s: float | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.transactions > 0
            and self.lost == 0
            and self.duplicated == 0
            and not any(self.features_missing.values())
            and not any(self.features_mismatched.values())
            and all(self.checks.values())
        )


@dataclass
class ChaosReport:
    """Every fault's result; ``ok`` when all passed."""

    results: list[FaultResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "results": [{**asdict(r), "ok": r.ok} for r in self.results],
        }

    def lines(self) -> list[str]:
        """One line per fault, for the console."""
        out = []
        for r in self.results:
            feats = ", ".join(
                f"{v}: {r.features_checked.get(v, 0)} checked, "
                f"{r.features_mismatched.get(v, 0)} mismatched, "
                f"{r.features_missing.get(v, 0)} missing"
                for v in r.features_checked
            )
            failed = [k for k, v in r.checks.items() if not v]
            timing = (
                f"first decision {r.first_decision_s:.1f}s  longest gap {r.longest_gap_s:.1f}s  "
                if r.first_decision_s is not None and r.longest_gap_s is not None
                else ""
            )
            out.append(
                f"{'PASS' if r.ok else 'FAIL'} {r.fault:<16} tx {r.transactions:>5}  "
                f"lost {r.lost}  duplicated {r.duplicated}  "
                + (f"input lost by the broker {r.input_lost}  " if r.input_lost else "")
                + (f"labels lost by the broker {r.labels_lost}  " if r.labels_lost else "")
                + f"{timing}[{feats}]  {r.seconds:.0f}s"
                + (f"  failed checks: {failed}" if failed else "")
                + (f"  error: {r.error}" if r.error else "")
            )
        out.append(f"{'PASS' if self.ok else 'FAIL'} all faults in {self.seconds:.0f}s")
        return out
