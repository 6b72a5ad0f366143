"""Sans-I/O msgr2-shaped protocol: bytes in, events out. No sockets, no clocks, no processes."""
