"""The Twisted glue both proxies share: pipes, a session and its two directions, the socket protocol, flow control."""
