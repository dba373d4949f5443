"""The upstreams: one dialect module per provider behind one interface, their registry, the
failures they report, the HTTP transport and egress, and fetching URLs through the SSRF guard."""
