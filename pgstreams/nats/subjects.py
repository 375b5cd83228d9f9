"""Checks on subjects and stream names, made before anything is sent.

A subject is dot-separated tokens, none empty, with no whitespace; a filter may use ``*``
for one whole token and ``>`` for the last one. A subject to publish on has no wildcard.
A stream name has no whitespace, dot, wildcard or path separator.
"""

from __future__ import annotations

import re

from .errors import SubjectError

__all__ = ["check_filter", "check_stream_name", "check_subject"]

_NOT_IN_NAMES = frozenset(" \t\r\n.*>/\\")
_WHITESPACE = re.compile(r"\s")


def _tokens(subject: object, what: str) -> list[str]:
    if not isinstance(subject, str) or not subject:
        raise SubjectError(f"{what} must be a non-empty str, got {subject!r}")
    if _WHITESPACE.search(subject):
        raise SubjectError(f"{what} {subject!r} contains whitespace")
    tokens = subject.split(".")
    if "" in tokens:
        raise SubjectError(
            f"{what} {subject!r} has an empty token (a leading, trailing or double dot)"
        )
    return tokens


def check_subject(subject: object) -> str:
    """A subject to publish on: no wildcards."""
    _tokens(subject, "subject")
    assert isinstance(subject, str)
    if "*" in subject or ">" in subject:
        raise SubjectError(
            f"subject {subject!r} has a wildcard: messages are published on a concrete subject"
        )
    return str(subject)


def check_filter(subject: object) -> str:
    """A subject a stream or a consumer listens on: wildcards as whole tokens, ``>`` last."""
    tokens = _tokens(subject, "subject filter")
    for i, token in enumerate(tokens):
        if token in ("*", ">"):
            if token == ">" and i != len(tokens) - 1:
                raise SubjectError(f"subject filter {subject!r}: '>' must be the last token")
        elif "*" in token or ">" in token:
            raise SubjectError(f"subject filter {subject!r}: a wildcard must be a whole token")
    return str(subject)


def check_stream_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 255:
        raise SubjectError(f"a stream name must be a 1-255 character str, got {name!r}")
    if any(c in _NOT_IN_NAMES or not c.isprintable() for c in name):
        raise SubjectError(
            f"stream name {name!r} may not contain whitespace, '.', '*', '>', '/' or '\\\\'"
        )
    return name
