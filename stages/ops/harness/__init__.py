"""The ops harness: what the demo, ``rtpipe chaos``, the bench and the tests share to run the
pipeline on a real stack.

- :mod:`stages.ops.harness.processes`: start a stage (or any ``python -m`` module) as its own
  process with the same settings, stop processes (SIGTERM, then SIGUSR1 for their stacks
  and SIGKILL), ``kill -9``.
- :mod:`stages.ops.harness.sandbox`: isolated settings (own feature repo copy, Feast
  project, home, optionally topics), clearing a project's keys in Redis, a tiny model.
- :mod:`stages.ops.harness.outcomes`: the audit repeated until a run has drained.

The ids a replay window must decide: :meth:`stages.ops.replay.ReplayPlan.transaction_ids`;
when started stages serve: :func:`stages.ops.harness.readiness.wait_until_ready`.
"""
