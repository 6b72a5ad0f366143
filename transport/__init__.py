"""Moving bytes and fds: event loop, network stacks, fd passing, rings. Knows nothing of messages."""
