"""The root of rtpipe's own exceptions.

Every exception the project defines derives from :class:`RtpipeError` (and, where callers
already catch it as one, from the builtin it refines: ``ValueError`` for bad input,
``RuntimeError`` for a failed operation, ``redis.ConnectionError`` for an unreachable
cluster), so ``except RtpipeError`` catches what rtpipe raises and nothing a dependency
raises. Each package defines its own next to the code that raises it, with the context a
reader needs in its message (a topic and offset, a view, a file).
"""

from __future__ import annotations


class RtpipeError(Exception):
    """Raised by rtpipe itself."""
