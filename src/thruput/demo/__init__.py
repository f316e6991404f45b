"""``thruput demo`` and ``thruput bench e2e``: the demo workload, its peers and its presentation.

* ``workload``: ``DemoSetup`` (sizes), ``DemoWorkload`` (builds the corpus once, trains any set of
  levers on the same labelled tokens), ``compare`` and the figures both commands report.
* ``padded_peer``: the baseline a competent PyTorch user writes (DataLoader, weighted sampler,
  pad-to-longest); ``packed_peer``: the strongest peer, padding-free packed rows in the style of
  transformers' ``DataCollatorWithFlattening``, mixed by tokens like thruput's plan.
* ``sources``: the standard-library source kinds the demo trains on (entry points).
* ``present``: the table, the headline and the reports of ``thruput demo``.

Nothing is imported here: the source kinds load ``thruput.demo.sources`` without torch or rich.
"""
