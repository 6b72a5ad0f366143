"""The supervisor process: the arbiter loop (:mod:`.arbiter`), the worker lifecycle
table, the Processor, the reuseport listener slots, the ring mesh, the admin socket
and its commands. Imports pool.control and pool.worker (to start workers), never the
messenger library."""
