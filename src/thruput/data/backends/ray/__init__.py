"""The Ray backend: source loaders and batch construction in Ray actors shared by every rank (``RayBackend``)."""
