"""A worker process (:mod:`.process`), its ring Router, its typed configuration and the
WorkerApp/WorkerContext seam (:mod:`.app`) that apps implement. Imports pool.control,
never pool.supervisor."""
