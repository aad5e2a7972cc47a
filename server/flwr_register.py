"""Register device keys with this server's SuperLink, many over one Control API connection:
``python -m server.flwr_register CONNECTION`` (run by
:meth:`server.superlink.FlwrCli.register_keys`, with the server's ``FLWR_HOME``).

``flwr supernode register`` takes one key a call, and each call is a new Python process that
imports Flower and opens a TLS connection: about 2.3 s a device, so a ``server start`` with
1,000 new devices spent most of an hour registering them. This is the same request
(``RegisterNode``, through the ``flwr`` CLI's own connection, authentication and error
handling) for one key after another in one process.

The exchange is one line each way, in lockstep: the caller writes a device's OpenSSH public
key, this answers one JSON line, ``{"node-id": N}`` or ``{"error": ..., "fatal": bool}``, and
registers the next key only once the caller wrote it, that is once the caller saved the
node id it got (a caller killed in between loses at most the one node id, as with a ``flwr``
call a device). A refusal of that key (a ``FlowerError`` answer, such as a key in use, or a
key that is not a NIST EC key) is not fatal: the next key is registered. Anything else (the
SuperLink unreachable, authentication failing) is fatal, answered for the key it happened on,
after which this ends. Answers go to the standard output as it was at the start; what Flower
prints goes to the standard error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO


def _answer(out: TextIO, **fields: Any) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


def _key_bytes(line: str) -> bytes:
    """The bytes Flower registers for an OpenSSH NIST EC public key line (ValueError: not
    one), checked as ``flwr supernode register`` checks a key file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (UnsupportedAlgorithm, NotImplementedError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise ValueError("not an EC public key on a NIST curve")
    return public_key_to_bytes(key)


def main(argv: list[str]) -> int:
    # the answers' channel is the standard output as started; Flower's prints go to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        import click
        import httpx
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611
        from flwr.supercore.error import FlowerError

        client = init_http_client_from_connection(read_superlink_connection(argv[0]))
    except Exception as exc:  # any start-up failure: the caller's to show
        sys.stdin.readline()  # answered for the first key, as every answer is
        format_message = getattr(exc, "format_message", None)  # a click.ClickException's
        message = format_message() if callable(format_message) else f"{type(exc).__name__}: {exc}"
        _answer(out, error=str(message).strip(), fatal=True)
        return 1
    try:
        for line in sys.stdin:
            try:
                public_key = _key_bytes(line.strip())
            except ValueError as exc:
                _answer(out, error=f"not a public key Flower accepts: {exc}", fatal=False)
                continue
            refused: list[bool] = []

            def note(err: Exception, refused: list[bool] = refused) -> None:
                # a FlowerError answer is about this request: the next key may pass
                body = err.response.text if isinstance(err, httpx.HTTPStatusError) else None
                refused.append(FlowerError.from_json(body) is not None)

            try:
                with flwr_cli_exc_handler(custom_handler=note):
                    response = client.RegisterNode(
                        request=RegisterNodeRequest(public_key=public_key)
                    )
            except click.ClickException as exc:
                _answer(out, error=exc.format_message(), fatal=not any(refused))
                if not any(refused):
                    return 1
                continue
            if not response.node_id:
                _answer(out, error="SuperNode couldn't be registered.", fatal=False)
                continue
            _answer(out, **{"node-id": int(response.node_id)})
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
