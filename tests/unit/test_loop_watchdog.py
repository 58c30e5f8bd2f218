"""The enrichment stage's loop watchdog (stages/shared/watchdog.py): quiet while the loop
turns or recovers its state, called once when it stops turning."""

from __future__ import annotations

import threading
import time

from stages.shared.watchdog import LoopWatchdog


def _watchdog(timeout_s: float) -> tuple[LoopWatchdog, list[float], threading.Event]:
    calls: list[float] = []
    fired = threading.Event()

    def stuck(idle_s: float) -> None:
        calls.append(idle_s)
        fired.set()

    return LoopWatchdog(timeout_s, stuck), calls, fired


def test_beats_keep_it_quiet_and_silence_fires_it_once() -> None:
    dog, calls, fired = _watchdog(0.3)
    dog.start()
    for _ in range(10):
        time.sleep(0.1)
        dog.beat()
    assert calls == []
    assert fired.wait(3.0)
    time.sleep(0.5)
    assert len(calls) == 1 and calls[0] >= 0.3
    dog.stop()


def test_paused_while_recovering() -> None:
    dog, calls, fired = _watchdog(0.2)
    dog.start()
    with dog.paused():
        time.sleep(0.8)
    assert calls == []
    # Leaving the pause counts as a beat: the loop has its full timeout again.
    assert not fired.wait(0.1)
    assert fired.wait(3.0)
    dog.stop()


def test_stopped_watchdog_never_fires() -> None:
    dog, calls, _ = _watchdog(0.2)
    dog.start()
    dog.stop()
    time.sleep(0.6)
    assert calls == []
