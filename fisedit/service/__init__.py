"""Ray service: GPU worker actors, session router, job queue, client.

Importing this package does not import Ray; `Client` and the actors load it when used.
"""

from fisedit.service.config import ServiceConfig

__all__ = ["Client", "ServiceConfig"]


def __getattr__(name: str):
    if name == "Client":
        from fisedit.service.client import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
