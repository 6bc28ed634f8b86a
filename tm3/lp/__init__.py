"""The local proxy (LP): its role, its client sockets (forward, transparent, SOCKS5), the pipe dialer, the service, its twistd tap, and tm3-redirect."""
