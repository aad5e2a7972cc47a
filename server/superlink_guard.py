"""``flower-superlink`` with its Control and runtime APIs answered for this machine only.

Flower 1.42 serves the Fleet API (devices), the Control API (the ``flwr`` CLI: register and
unregister SuperNode keys, submit, list and stop runs) and the runtime API (its SuperExec and
the ServerApp) on one HTTPS port, and its open-source build authenticates neither the Control
API (no account plugin) nor the SuperExec's runtime calls (their secret is ignored in the
subprocess isolation ``fedrec server start`` uses). A server listening on a network address
(``--host 0.0.0.0``, the default) therefore let any host that reaches the port, which every
device does, run ``flwr supernode register`` with its own key: an unregistered device joined
the next round's cohort although ``clients.json`` never named it (nor did ``fedrec server
status``), and ``flwr stop`` would have ended the run.

:class:`LocalOnlyMiddleware` answers 403 to every request from a peer that is not an address
of this machine, except the Fleet API (``/v1/fleet/``, the devices' API, where the SuperLink
authenticates each device's key itself) and ``/health``. ``fedrec server`` commands, the
SuperExec and the ServerApp connect from this machine (through the loopback address, or the
``--host`` the SuperLink listens on), so nothing of the deployment changes for them.

Run as ``python -m server.superlink_guard ARGS``, with ``flower-superlink``'s arguments.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: what a host other than this one may request: the devices' Fleet API and the health check
REMOTE_PATH_PREFIXES = ("/v1/fleet/",)
REMOTE_PATHS = frozenset({"/health"})


def is_local_address(host: str) -> bool:
    """Whether ``host`` (a peer's IP address) is one of this machine's: a loopback address,
    or one a socket can bind here (the kernel refuses an address no interface holds)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return True
    if address.is_unspecified or address.is_multicast:
        return False
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError:
        return False
    return True


def remote_may_request(path: str) -> bool:
    """Whether a peer on another host may request ``path``."""
    return path in REMOTE_PATHS or path.startswith(REMOTE_PATH_PREFIXES)


class LocalOnlyMiddleware:
    """ASGI middleware: a request from another host for anything but the Fleet API or the
    health check is answered 403 before Flower sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and not remote_may_request(str(scope.get("path", ""))):
            client = scope.get("client")
            if not client or not is_local_address(str(client[0])):
                if kind == "http":
                    await _forbidden(send)
                else:  # Flower serves none; refused as well, before the handshake
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


async def _forbidden(send: Send) -> None:
    body = (
        b'{"detail": "the SuperLink answers the Control and runtime APIs only on its own '
        b'machine; devices use the Fleet API (/v1/fleet/)"}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install() -> None:
    """Put :class:`LocalOnlyMiddleware` first among the SuperLink app's middleware (through
    Flower's extension hook, which ``flwr.superlink.main`` reads when it builds the app)."""
    from flwr.superlink import extensions
    from starlette.middleware import Middleware

    flowers = extensions.get_middleware  # AttributeError: a Flower without the hook

    def get_middleware() -> tuple[Middleware, ...]:
        return (Middleware(LocalOnlyMiddleware), *flowers())

    extensions.get_middleware = get_middleware


def main() -> None:
    """``flower-superlink`` (its arguments from ``sys.argv``) with the guard installed."""
    install()
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()
