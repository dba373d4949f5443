"""Request bodies in: multipart and JSON parsing, spooling, sniffing and validation against the
catalog, ending in one validated EditRequest."""
