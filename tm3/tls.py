"""TLS on the pipes, the RP's side: the ``tls:`` server endpoint string.

``tls:PORT:privateKey=KEY.pem:certificate=CERT.pem[:caCerts=CA.pem][:interface=ADDR][:backlog=N]``
listens on TCP (as Twisted's ``ssl:`` does) with the certificate (then any
intermediates, in that file) and its key. With ``caCerts`` every client must
present a certificate that those CAs signed, or the handshake fails; without
it no client certificate is asked for. The LP's side is Twisted's own client
``tls:HOST:PORT:trustRoots=CA_DIR[:certificate=...:privateKey=...]``.

Twisted's ``ssl:`` server endpoint cannot ask for client certificates. And
recent Twisted (26.10 here) has a server ``tls:`` plugin of its own, for a
directory of PEM files chosen by SNI: when two plugins share a prefix,
``serverFromString`` takes whichever its plugin scan finds first, which
depends on how the packages were installed. So the RP does not leave it to
the scan: :func:`server_from_string` sends ``tls:`` here always. The plugin
(:class:`TLSServerParser`, in ``twisted/plugins/tm3_plugins.py``) hands Twisted's own
syntax (``tls:DIRECTORY``, anything not starting with a port number) to
Twisted's parser, so that installing TM3 breaks nothing for other programs.

Files are read once, when the string is parsed (``twistd`` checks options
before it daemonizes); a missing, unreadable or malformed file is a
:class:`BadTLSFile` naming it.
"""

from __future__ import annotations

from typing import Any, cast

import service_identity
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.plugin import IPlugin, getPlugins
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3 import proxyheader

PREFIX = "tls"
SYNTAX = "tls:PORT:privateKey=KEY.pem:certificate=CERT.pem[:caCerts=CA.pem][:interface=ADDR][:backlog=N]"

# The keys a certificate can be for that OpenSSL (through pyOpenSSL) takes.
SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


class BadTLSFile(ValueError):
    """A key or certificate file that cannot be used; the message names it."""


def server_from_string(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``endpoints.serverFromString``, except that ``tls:`` is always ours, and
    so is ``haproxy:`` (tm3/proxyheader.py), around any of them."""
    kind, _, rest = description.partition(":")
    if kind.strip().lower() == proxyheader.PREFIX:
        return proxyheader.proxied(reactor, server_from_string(reactor, rest))
    if kind.strip().lower() != PREFIX:
        endpoint: IStreamServerEndpoint = endpoints.serverFromString(reactor, description)
        return endpoint
    # Twisted's own tokenizer (backslash escapes and all), private but
    # unchanged since serverFromString began.
    args, kwargs = endpoints._parse(rest)
    return tls_server(reactor, *cast(list[str], args), **cast(dict[str, str], kwargs))


def tls_server(
    reactor: Any,
    port: str | None = None,
    *extra: str,
    privateKey: str | None = None,
    certificate: str | None = None,
    caCerts: str | None = None,
    interface: str = "",
    backlog: str = "50",
    **unknown: str,
) -> IStreamServerEndpoint:
    """The endpoint a ``tls:`` string describes (the arguments are its parts)."""
    if extra or unknown:
        what = ", ".join([repr(a) for a in extra] + [f"{k}=" for k in sorted(unknown)])
        raise ValueError(f"tls: unknown parameters {what}; use {SYNTAX}")
    if port is None or not _is_number(port) or int(port) > 65535:
        raise ValueError(f"tls: needs a port number 0..65535 first, not {port!r}; use {SYNTAX}")
    if not _is_number(backlog):
        raise ValueError(f"tls: backlog must be a whole number, not {backlog!r}")
    if certificate is None:
        raise ValueError(f"tls: certificate= is required (the RP's certificate, PEM); use {SYNTAX}")
    chain = _certificates(certificate, "certificate")
    key = _private_key(certificate if privateKey is None else privateKey)
    if chain[0].public_key() != key.public_key():
        raise BadTLSFile(f"tls: the private key in {privateKey or certificate!r} is not the key of {certificate!r}")
    authorities = (
        None if caCerts is None else [Certificate(X509.from_cryptography(c)) for c in _certificates(caCerts, "caCerts")]
    )
    options = CertificateOptions(
        privateKey=PKey.from_cryptography_key(key),
        certificate=X509.from_cryptography(chain[0]),
        extraCertChain=[X509.from_cryptography(c) for c in chain[1:]] or None,
        # A trust root makes the server ask for a client certificate, require
        # one, and verify it against these CAs only.
        trustRoot=None if authorities is None else trustRootFromCertificates(authorities),
    )
    return endpoints.SSL4ServerEndpoint(reactor, int(port), options, int(backlog), interface)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadTLSFile(f"tls: cannot read the {what} file {path!r}: {e.strerror}") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise BadTLSFile(f"tls: the {what} file {path!r} holds no PEM certificate, or a malformed one") from None


def _private_key(path: str) -> SigningKey:
    # cryptography, not OpenSSL's loader: that one would prompt on the
    # terminal for the passphrase of an encrypted key.
    data = _read(path, "privateKey")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BadTLSFile(f"tls: the private key in {path!r} is encrypted; give it unencrypted") from None
    except ValueError:
        raise BadTLSFile(f"tls: the privateKey file {path!r} holds no PEM private key, or a malformed one") from None
    if not isinstance(key, SIGNING_KEYS):
        raise BadTLSFile(f"tls: the private key in {path!r} cannot sign (a {type(key).__name__})")
    return key


def tls_failure(reason: Failure) -> str | None:
    """What went wrong, when a connection ended in a failed TLS handshake
    or certificate check (either side's); ``None`` for any other end."""
    if reason.check(SSL.Error):
        # OpenSSL's queue: (library, function, reason) tuples.
        args = reason.value.args if reason.value is not None else ()
        errors = args[0] if args else []
        texts = [e[2] for e in errors if isinstance(e, tuple) and len(e) == 3 and e[2]]
        return "; ".join(texts) or str(reason.value)
    if reason.check(service_identity.VerificationError):
        return f"the certificate is for another name or address ({reason.getErrorMessage()})"
    return None


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TLSServerParser:
    """The ``tls:`` plugin: ours when the string starts with a port number,
    Twisted's own (a directory of PEMs by SNI) otherwise."""

    prefix = PREFIX

    def parseStreamServer(self, reactor: IReactorCore, *args: object, **kwargs: object) -> IStreamServerEndpoint:
        if args and not _is_number(str(args[0])):
            for other in getPlugins(IStreamServerEndpointStringParser):
                if other.prefix.lower() == PREFIX and not isinstance(other, TLSServerParser):
                    endpoint: IStreamServerEndpoint = other.parseStreamServer(reactor, *args, **kwargs)
                    return endpoint
        return tls_server(reactor, *cast(tuple[str, ...], args), **cast(dict[str, str], kwargs))
