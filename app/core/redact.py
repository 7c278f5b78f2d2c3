"""Credentials out of what is printed or saved.

A URI may carry a credential: a password in its userinfo (``https://user:token@host/path``,
``s3://key:secret@bucket/path``) or a token-like query parameter (``?token=``, ``sig=``,
``X-Amz-Signature=`` ...). The process uses such a URI as given; every place that shows or
keeps it (the printed and saved config, the prepared dataset's manifest, MLflow params and
tags, Tune's saved trial configs, ``mlflow.json``, ``summary.json``, progress and error
lines) passes it through :func:`redact` first.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ : the userinfo runs to the last "@" before the path (a password may hold
# an unescaped "@")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#'\"<>]+)@")
# ?name=value or &name=value; the value is masked when the name looks like a credential
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#\s'\"?]+)=(?P<value>[^&;#\s'\"]*)")
_SECRET_NAME = re.compile(r"[\w.\-]*(?:token|secret|passw(?:or)?d|credential|signature"
                          r"|api[_\-]?key)|sig|key|auth|pwd|code", re.IGNORECASE)


def _userinfo(m: re.Match) -> str:
    user, sep, _ = m["userinfo"].partition(":")
    # a lone user part is often a token itself (https://<token>@host): masked too
    return f"{m['scheme']}{user}:{MASK}@" if sep else f"{m['scheme']}{MASK}@"


def redact(text: str) -> str:
    """``text`` with every URI credential in it masked.

    The password of a URI's userinfo (the whole userinfo when it is a single part)
    and the values of token-like query parameters become ``***``; the rest stays readable, and
    a URI inside a longer message is found too.

    Example: ``https://ann:pw@host/f.zip?token=abc&v=2`` ->
    ``https://ann:***@host/f.zip?token=***&v=2``.
    """
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(_userinfo, text)
    return _PARAM.sub(lambda m: f"{m['lead']}{m['name']}={MASK}"
                      if _SECRET_NAME.fullmatch(m["name"]) else m[0], text)


def redact_values(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples of JSON-like values) with :func:`redact` applied
    to every string in it."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return obj
