"""The harness: a study file becomes trials, trials run in workers, rows go to the store, the store to a report.

* :mod:`defenda.harness.study` — parse and validate a study file; expand it into trials;
* :mod:`defenda.harness.jobs` — the typed units of work (:class:`Trial`, :class:`UtilityJob`);
* :mod:`defenda.harness.services` — per-process task cache, device, the running plugin's name;
* :mod:`defenda.harness.utility` — one training run: test accuracy and ε;
* :mod:`defenda.harness.trial` — one attack on one defended update → one row;
* :mod:`defenda.harness.runner` — executors (inline, isolated workers, Dask), resume, progress;
* :mod:`defenda.harness.store` — the SQLite results store;
* :mod:`defenda.harness.report` — figures, tables and ``index.md`` from a store.
"""
