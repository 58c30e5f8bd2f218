"""The stall watch on a fake clock: lag without progress for the timeout is a stall, once;
progress, no lag or a dependency outage are not."""

from __future__ import annotations

from stages.shared.stall import StallWatch

TP = ("transactions", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lag_without_progress_for_the_timeout_is_one_stall() -> None:
    clock = Clock()
    watch = StallWatch(10.0, clock=clock)
    assert not watch.observe(TP, 100, 150)
    clock.now = 9.9
    assert not watch.observe(TP, 100, 160)
    clock.now = 10.0
    assert watch.observe(TP, 100, 170)
    assert watch.stalled() == [TP]
    clock.now = 30.0
    assert not watch.observe(TP, 100, 170)  # reported once
    # Progress ends it; a new stall needs a whole new timeout.
    assert not watch.observe(TP, 101, 170)
    assert watch.stalled() == []
    clock.now = 39.0
    assert not watch.observe(TP, 101, 170)
    clock.now = 40.0
    assert watch.observe(TP, 101, 170)


def test_no_lag_or_steady_progress_is_never_a_stall() -> None:
    clock = Clock()
    watch = StallWatch(5.0, clock=clock)
    for step in range(100):
        clock.now = step
        assert not watch.observe(TP, 500, 500)  # caught up: idle is fine
        assert not watch.observe(("t", 2), step, step + 1000)  # behind but moving


def test_a_dependency_outage_holds_the_clock() -> None:
    clock = Clock()
    watch = StallWatch(5.0, clock=clock)
    watch.observe(TP, 10, 20)
    clock.now = 4.0
    watch.dependency_down()  # Redis down: the batch is retried, the position cannot move
    clock.now = 8.0
    assert not watch.observe(TP, 10, 20)
    clock.now = 12.0
    assert not watch.observe(TP, 10, 20)  # up again at 9: the clock restarted then
    clock.now = 14.0
    assert watch.observe(TP, 10, 20)


def test_unknown_positions_and_forgotten_partitions() -> None:
    clock = Clock()
    watch = StallWatch(1.0, clock=clock)
    watch.observe(TP, -1001, 20)  # nothing consumed yet: no position to judge
    clock.now = 5.0
    assert not watch.observe(TP, -1001, 20)
    watch.observe(TP, 3, 20)
    clock.now = 7.0
    assert watch.observe(TP, 3, 20)
    watch.forget([TP])
    assert watch.stalled() == []
    assert not watch.observe(TP, 3, 20)


def test_feast_multiprocess_dirs_are_not_inherited() -> None:
    from stages.shared.procenv import drop_feast_prometheus_dirs

    env = {
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/feast_metrics_ab12",
        "PROMETHEUS_MULTIPROCESS_DIR": "/tmp/feast_metrics_ab12",
        "PATH": "/usr/bin",
    }
    drop_feast_prometheus_dirs(env)
    assert env == {"PATH": "/usr/bin"}
    mine = {"PROMETHEUS_MULTIPROC_DIR": "/var/run/my-metrics"}  # a deliberate setting stays
    drop_feast_prometheus_dirs(mine)
    assert mine == {"PROMETHEUS_MULTIPROC_DIR": "/var/run/my-metrics"}
