"""Samples of one metric family read from the stage processes' ``/metrics`` endpoints."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def family_samples(
    host: str, ports: Iterable[int], family: str, timeout_s: float = 2.0
) -> Iterator[Sample]:
    """Every sample of ``family`` served on ``host`` at each of ``ports``; a port where
    nothing answers (a process not serving yet) yields nothing."""
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as r:
                text = r.read().decode()
        except (OSError, urllib.error.URLError):
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name == family:
                yield from fam.samples
