"""Internal clients (tenants): their keys, limits, quotas and usage."""
