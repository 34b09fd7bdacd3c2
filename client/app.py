"""The ClientApp Flower loads (`client.app:app`): a relay to the node's resident trainer,
as client/compose.py builds it (client/relay.py says what the relay does)."""

from __future__ import annotations

from .compose import build_client_app

__all__ = ["app", "build_client_app"]

app = build_client_app()
