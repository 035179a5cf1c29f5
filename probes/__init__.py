"""greylens.probes: linear, sparse-feature and graph-query probes and the `Lens` inference API.
Not built yet: see the open issues."""
