"""Transports: how adapterctl reaches an endpoint (local directory or SSH host)."""

from adapterctl.transports.base import CommandResult, SyncResult, Transport

__all__ = ["CommandResult", "SyncResult", "Transport", "open_transport"]


def open_transport(endpoint, ssh_options=None) -> Transport:
    """The transport for an EndpointConfig: `host: local` → LocalTransport, else SSHTransport."""
    if endpoint.host == "local":
        from adapterctl.transports.local import LocalTransport

        return LocalTransport(endpoint.name)
    from adapterctl.transports.ssh import SSHOptions, SSHTransport

    return SSHTransport(
        endpoint.name, endpoint.host, ssh_options or SSHOptions(), endpoint.user, endpoint.port
    )
