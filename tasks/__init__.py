"""Prefect tasks (`units`: one task per unit of work a flow composes) and the task runners
that run them (`runners`: threads, processes or Dask). The machinery they wrap is
`engine/`."""
