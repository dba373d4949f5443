"""The upstream key pool: health state machine, shared state store, selection, probes."""
