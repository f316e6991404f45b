"""The process backend: source-loader worker processes on this machine (``ProcessBackend``)."""
