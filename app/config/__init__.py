"""Configuration: settings (environment over YAML), the model catalog, tenant config."""
