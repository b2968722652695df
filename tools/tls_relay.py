#!/usr/bin/env python3
"""A plain-TCP to TLS relay, so a client without TLS can test the gateway's TLS path.

kosoku (the Autobahn|Testsuite driver of tools/autobahn.sh) is built without TLS
("TLS support not compiled in" for wss:// URLs), so the `tls` profile of
tools/autobahn.sh points it at this relay: every connection accepted on 127.0.0.1
(plain) gets its own TLS connection to the gateway (verified against CERT, with SNI
`localhost` and ALPN http/1.1), and the bytes are copied both ways unchanged. The
WebSocket frames, their fragmentation and the close handshake are the client's; the
gateway reads and writes all of them through rustls. Ends are mirrored: the gateway's
end of its stream (close_notify, FIN) closes the client's connection after the bytes
before it; the client's FIN closes the TLS connection (close_notify, then FIN).

    python3 tools/tls_relay.py --upstream 127.0.0.1:PORT --cafile CERT

prints `relay listening on 127.0.0.1:N` once it accepts connections. Python standard
library only.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await src.read(65536)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        # A TLS transport cannot half-close; a plain one could, but the peer it stands
        # for (the gateway) ended the whole stream.
        dst.close()


async def serve(upstream: tuple[str, int], ctx: ssl.SSLContext) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                upstream[0], upstream[1], ssl=ctx, server_hostname="localhost"
            )
        except (ConnectionError, ssl.SSLError, OSError) as e:
            print(f"relay: upstream connection failed: {e!r}", file=sys.stderr, flush=True)
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"relay listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the TLS gateway")
    ap.add_argument("--cafile", required=True, help="PEM certificate the gateway must present")
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        asyncio.run(serve((host, int(port)), ctx))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
