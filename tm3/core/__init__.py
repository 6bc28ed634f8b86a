"""Pure cores, no I/O: the wire codec, reordering, connection ids, the connection life cycle, IPv4 addresses."""
