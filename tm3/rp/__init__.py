"""The remote proxy (RP): its role in a session, its service and its twistd tap."""
