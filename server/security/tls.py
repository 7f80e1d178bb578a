"""Certificate checks for ``[tls]``, with the standard library only.

What gRPC would otherwise report as an opaque failure at the first
connection (or never: an expired certificate fails every client, not the
server) is found at load time, naming the setting:

- each file is PEM of the right kind;
- the key belongs to the certificate (and is not passphrase-protected, which
  gRPC cannot use);
- the certificate is valid now: a TLS handshake in memory, with a client that
  trusts the certificate itself, fails exactly where a real client would on
  dates ("certificate has expired", "is not yet valid").
"""

from __future__ import annotations

import ssl
from pathlib import Path


def _no_passphrase() -> bytes:
    raise ValueError("encrypted")


def check_certificates(cert: Path, key: Path, client_ca: Path | None = None) -> list[tuple[str, str]]:
    """(setting, what is wrong) for each problem; [] when the files are usable."""
    problems: list[tuple[str, str]] = []
    for name, path in (("cert", cert), ("client_ca", client_ca)):
        if path is None:
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
        except (ssl.SSLError, ValueError, OSError):
            problems.append((name, "is not a PEM certificate file"))
    if problems:
        return problems
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except ValueError:
        return [("key", "is protected by a passphrase; gRPC needs an unencrypted PEM key")]
    except (ssl.SSLError, OSError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return [("key", "does not belong to the certificate in tls.cert")]
        return [("key", "is not a PEM private key")]
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(cert))
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # trust the certificate itself: only dates can fail
    error = _handshake(client, server)
    if error:
        problems.append(("cert", f"is not valid now: {error}"))
    return problems


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> str:
    """Runs one TLS handshake between two contexts in memory; the client's verify error, or ""."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(10):  # a TLS 1.3 handshake needs about three flights
        for side, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLCertVerificationError as exc:
                    return exc.verify_message or str(exc)
                except ssl.SSLError as exc:
                    return exc.reason or str(exc)
            peer_in.write(out.read())
        if all(done.values()):
            return ""
    return "the handshake did not complete"
