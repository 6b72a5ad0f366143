"""The contract between the supervisor and its workers: the control channel and its
typed messages, the shared control page and the slot states it publishes, exit
statuses, process titles. Imports transport only; both pool.supervisor and pool.worker
import it, it imports neither."""
