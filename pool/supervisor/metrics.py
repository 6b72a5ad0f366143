"""Prometheus metrics for ``msgr serve --metrics HOST:PORT`` (prometheus_client).

The numbers are the ones ``msgr status`` / ``msgr perf`` show: each worker's control-page
slot plus the supervisor's own bookkeeping. Pool-wide names (``asyncmsgr_messages_received_total``)
are the sums over workers; the same figure per worker is ``asyncmsgr_worker_*`` with a
``worker`` label (the slot), so that ``sum()`` over a family never counts twice.

Why this shape (facts the design relies on):

* **Pre-fork, but one reader.** prometheus_client's multiprocess mode exists because
  gunicorn workers each own their counters; ours already publish theirs in the control
  page, which the supervisor reads. So one custom :class:`PoolCollector` in the supervisor
  is enough: no files per worker, nothing to clean up after a crash.
* **The loop owns the state.** The HTTP server runs in threads (a slow or stuck scraper
  must not stall the arbiter loop), but the supervisor's tables are not thread-safe. A
  scrape therefore asks the loop for a snapshot through ``dispatch_event_external`` (a
  lock-free deque append plus an eventfd write) and waits at most ``snapshot_timeout``;
  a loop that cannot answer in time gets the previous snapshot, marked stale by
  ``asyncmsgr_scrape_snapshot_age_seconds``.
* **Bounded.** At most ``max_clients`` requests are served at once (more are closed at
  accept), each socket has a ``request_timeout``, and the threads are daemons that never
  write to stderr: the supervisor forks workers while they run, and a child must not
  inherit a held stderr lock (supervisors.md 2.9).
* **Counters restart with their worker.** A respawned worker starts its counters at 0;
  Prometheus' ``rate()`` treats a decrease as a counter reset.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pool.control.states import State
from transport.event_center import EventCenter

__all__ = ["COUNTERS", "GAUGES", "MetricsServer", "PoolCollector", "Snapshot"]

Snapshot = dict[str, Any]

#: control-page field -> (metric name without the prefix, help): monotonic per worker
COUNTERS = {
    "msgs_in": ("messages_received", "Messages received from clients and peers"),
    "msgs_out": ("messages_sent", "Messages sent"),
    "bytes_in": ("received_bytes", "Message bytes received"),
    "bytes_out": ("sent_bytes", "Message bytes sent"),
    "sessions_evicted": ("sessions_evicted", "Sessions of absent clients forgotten by the retention caps"),
    "handoffs_in": ("handoffs_received", "Connections adopted from the Processor or another worker"),
    "handoffs_out": ("handoffs_sent", "Connections handed to another worker"),
    "ring_sent": ("ring_records_sent", "Records (requests and replies) written to the ring mesh"),
    "ring_served": ("ring_requests_served", "Requests served for other workers"),
    "ring_replies": ("ring_replies_received", "Replies received over the ring mesh"),
    "ring_failed": ("ring_requests_failed", "Ring requests that failed (peer lost, overloaded)"),
    "ring_backlogged": ("ring_records_backlogged", "Ring records that waited for space in their ring"),
    "throttle_refusals": ("throttle_refusals", "Times a connection stopped reading on a full receive throttle"),
    "restarts": ("restarts", "Worker restarts after an unexpected exit"),
}
#: control-page field -> (metric name without the prefix, help): a level per worker
GAUGES = {
    "connections": ("connections", "Live client connections"),
    "sessions_retained": ("sessions_retained", "Sessions kept for clients without a connection"),
    "retained_bytes": ("retained_bytes", "Bytes those sessions hold (unacknowledged and queued)"),
    "throttle_held_msgs": ("throttle_held_messages", "Messages dispatched and not yet released"),
    "throttle_held_bytes": ("throttle_held_bytes", "Bytes of those messages"),
}
PREFIX = "asyncmsgr_"


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    # CounterMetricFamily appends "_total" itself when exposing.
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


class PoolCollector(Collector):
    """Turns a supervisor snapshot into metric families, on the scraping thread."""

    def __init__(self, center: EventCenter, snapshot: Callable[[], Snapshot],
                 snapshot_timeout: float = 2.0) -> None:
        self.center = center
        self.snapshot = snapshot
        self.snapshot_timeout = snapshot_timeout
        self._last: Snapshot = {}
        self._last_at = 0.0
        #: set before the loop closes: a late scrape must not post to a closed center,
        #: whose eventfd number may already belong to another file
        self.closed = False

    def fetch(self) -> tuple[Snapshot, float]:
        """A fresh snapshot from the loop, else the last one; and its age in seconds."""
        done = threading.Event()
        box: list[Snapshot] = []

        def take() -> None:  # on the supervisor's loop
            try:
                box.append(self.snapshot())
            finally:
                done.set()

        if not self.closed:
            self.center.dispatch_event_external(take)
        if not self.closed and done.wait(self.snapshot_timeout) and box:
            self._last, self._last_at = box[0], time.monotonic()
        age = time.monotonic() - self._last_at if self._last_at else float("inf")
        return self._last, age

    def collect(self) -> Iterable[Metric]:
        snap, age = self.fetch()
        stale = GaugeMetricFamily(PREFIX + "scrape_snapshot_age_seconds",
                                  "Age of the supervisor snapshot served (0 = fresh; large = loop busy)")
        stale.add_metric([], 0.0 if age < self.snapshot_timeout else age)
        yield stale
        if not snap:
            return
        workers: list[dict[str, Any]] = snap["workers"]
        for table, make in ((COUNTERS, _counter), (GAUGES, None)):
            for field, (name, doc) in table.items():
                total: CounterMetricFamily | GaugeMetricFamily
                each: CounterMetricFamily | GaugeMetricFamily
                if make is None:
                    total = GaugeMetricFamily(PREFIX + name, doc + " (sum over workers)")
                    each = GaugeMetricFamily(PREFIX + "worker_" + name, doc, labels=["worker"])
                else:
                    total = make(name, doc + " (sum over workers)")
                    each = make("worker_" + name, doc, ["worker"])
                total.add_metric([], sum(w[field] for w in workers))
                for w in workers:
                    each.add_metric([str(w["slot"])], w[field])
                yield total
                yield each
        yield from self._states(workers)
        yield from self._supervisor(snap)

    @staticmethod
    def _states(workers: list[dict[str, Any]]) -> Iterable[Metric]:
        per = GaugeMetricFamily(PREFIX + "worker_state", "1 for the lifecycle state each worker slot is in",
                                labels=["worker", "state"])
        counts = {s.name: 0 for s in State}
        for w in workers:
            counts[w["state"]] += 1
            for s in State:
                per.add_metric([str(w["slot"]), s.name], 1.0 if w["state"] == s.name else 0.0)
        pool = GaugeMetricFamily(PREFIX + "workers", "Worker slots in each lifecycle state", labels=["state"])
        for name, n in counts.items():
            pool.add_metric([name], n)
        yield per
        yield pool
        age = GaugeMetricFamily(PREFIX + "worker_heartbeat_age_seconds",
                                "Seconds since each live worker's loop last beat", labels=["worker"])
        for w in workers:
            if w["heartbeat_age"] is not None:
                age.add_metric([str(w["slot"])], w["heartbeat_age"])
        yield age

    @staticmethod
    def _supervisor(snap: Snapshot) -> Iterable[Metric]:
        for name, doc in (("desired", "Workers the pool is asked to run"),
                          ("accepting", "Workers accepting connections now")):
            g = GaugeMetricFamily(PREFIX + f"workers_{name}", doc)
            g.add_metric([], snap[name])
            yield g
        for key, value in sorted(snap["supervisor"].items()):
            c = _counter(f"supervisor_{key}", f"Supervisor event count: {key.replace('_', ' ')}")
            c.add_metric([], value)
            yield c
        proc = snap.get("processor")
        if proc:
            for key in ("accepted", "assigned", "naks", "dropped", "accept_backoffs"):
                c = _counter(f"processor_{key}", f"Processor accept loop: {key.replace('_', ' ')}")
                c.add_metric([], proc[key])
                yield c
            g = GaugeMetricFamily(PREFIX + "processor_backlog", "Accepted fds waiting for an accepting worker")
            g.add_metric([], proc["backlog"])
            yield g


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # shutdown never waits for a stuck scraper
    request_queue_size = 16

    def __init__(self, addr: tuple[str, int], registry: CollectorRegistry, max_clients: int,
                 request_timeout: float) -> None:
        self.registry = registry
        self.request_timeout = request_timeout
        self.slots = threading.BoundedSemaphore(max_clients)
        self.refused = 0
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.address_family = family
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1  # over the cap: close at once rather than queue a thread
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a broken scraper is its own problem; never write to stderr from here


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # a stalled scraper times out

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "try /metrics")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # see the module doc: no stderr writes from these threads


class MetricsServer:
    """``/metrics`` on ``addr`` from daemon threads; :meth:`close` stops it."""

    def __init__(self, addr: tuple[str, int], collector: PoolCollector, *, max_clients: int = 8,
                 request_timeout: float = 5.0) -> None:
        self.collector = collector
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            self._server = _Server(addr, registry, max_clients, request_timeout)
        except OSError as exc:
            raise OSError(exc.errno, f"--metrics {addr[0]}:{addr[1]}: cannot listen ({exc.strerror})") from None
        host, port = self._server.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="msgr metrics", daemon=True)
        self._thread.start()

    @property
    def refused(self) -> int:
        return self._server.refused

    def close(self) -> None:
        self.collector.closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
