"""The edit and generation pipeline, between the routes and the cache: what one image call does."""
