"""``gstalk batch``: many render or training jobs from one jobs file, on this machine or a Ray cluster.

- :mod:`~gstalk.batch.jobs`: reading the jobs file (CSV or JSONL), one job per row, each
  row checked on its own (a bad row fails alone);
- :mod:`~gstalk.batch.results`: the results file (JSONL beside the jobs file), and which
  jobs a re-run may skip;
- :mod:`~gstalk.batch.work`: what a worker does with one job: it calls the stage
  functions exactly as the CLI does (``run_render``, ``run_extract`` ... ``run_fine``);
- :mod:`~gstalk.batch.engines`: ``local`` (a process pool on this machine) and ``ray``;
- :mod:`~gstalk.batch.runner`: the driver: skip, dispatch, progress, results, exit code.

See ``docs/batch.md``.
"""
