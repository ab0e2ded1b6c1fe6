"""The optional API key: `Authorization: Bearer KEY`, compared in constant time so response timing cannot reveal
how much of a guessed key was right."""

from __future__ import annotations

import hmac


def key_matches(authorization: str | None, api_key: str) -> bool:
    scheme, _, presented = (authorization or "").partition(" ")
    # compare_digest on bytes: it refuses non-ASCII str, and a client may send anything in a header.
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), api_key.encode())
