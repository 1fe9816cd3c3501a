"""Transports: how adapterctl reaches an endpoint (local directory or SSH host)."""

from adapterctl.transports.base import CommandResult, SyncResult, Transport

__all__ = ["CommandResult", "SyncResult", "Transport", "open_transport"]


def open_transport(endpoint) -> Transport:
    """Return the transport for an EndpointConfig (`host: local` → LocalTransport)."""
    from adapterctl.transports.local import LocalTransport

    if endpoint.host == "local":
        return LocalTransport(endpoint.name)
    from adapterctl.errors import ConfigError

    raise ConfigError(
        f"endpoint {endpoint.name!r}: host {endpoint.host!r} needs the SSH transport, which is not built yet",
        "use `host: local` for now (SSH endpoints come with the next release)",
    )
