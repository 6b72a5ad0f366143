"""Where protocol meets transport: Messenger, connections, workers, supervisor."""
