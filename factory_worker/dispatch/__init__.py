"""The life of one dispatch on a worker: a single agent or a staged pipeline, and the pipeline's decisions."""
