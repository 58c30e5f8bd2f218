"""The customer app's topic admin: quixstreams' own, without its second of sleep.

quixstreams 3.28 creates the topics an application is missing (for this stage: its state
changelog, on a deployment's first start) in ``TopicAdmin.create_topics``, whose
``_finalize_create`` sleeps a whole second before it first looks at the broker's answers and
then once a second: the stage's first start waited 1.0 s for a changelog topic the broker
had created in milliseconds (1.002 s between quixstreams' "Creating a new topic" and "has been
created" in one start's log; with this admin, 56 ms). :class:`PromptTopicAdmin` waits on the
answers themselves and treats them as quixstreams does: a topic that already exists (another
replica created it) is fine, any other error fails the start with quixstreams' own
exception.
"""

from __future__ import annotations

import concurrent.futures
import logging
import pprint
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from quixstreams.models.topics.admin import TopicAdmin
from quixstreams.models.topics.exceptions import CreateTopicFailure, CreateTopicTimeout

logger = logging.getLogger(__name__)


def creation_failures(futures: Mapping[str, concurrent.futures.Future[None]]) -> dict[str, str]:
    """The error of each finished creation that failed, by topic (already existing: not
    an error); creations still pending are not in it."""
    failures: dict[str, str] = {}
    for name, future in futures.items():
        if not future.done():
            continue
        try:
            future.result()
        except KafkaException as exc:
            err = exc.args[0]
            code = err.code() if isinstance(err, KafkaError) else None
            if code == KafkaError.TOPIC_ALREADY_EXISTS:
                logger.info("topic %s already exists", name)
            elif code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                failures[name] = (
                    f'Failed to create topic "{name}"; verify if "Create" and "Read" '
                    "operations are allowed for your credentials"
                )
            else:
                failures[name] = err.str() if isinstance(err, KafkaError) else str(err)
        except (TypeError, ValueError) as exc:
            failures[name] = str(exc)
        else:
            logger.info("topic %s created", name)
    return failures


class PromptTopicAdmin(TopicAdmin):
    """quixstreams' ``TopicAdmin`` that reads topic-creation results as they arrive."""

    def _finalize_create(
        self,
        futures: dict[str, concurrent.futures.Future[None]],  # type: ignore[override]
        finalize_timeout: float = 60,
    ) -> None:
        concurrent.futures.wait(list(futures.values()), timeout=finalize_timeout)
        failures = creation_failures(futures)
        if failures:
            raise CreateTopicFailure(f"Failed to create topics: {failures}")
        pending = [name for name, future in futures.items() if not future.done()]
        if pending:
            raise CreateTopicTimeout(
                f"Timed out waiting for creation status for topics:\n{pprint.pformat(pending)}"
            )
