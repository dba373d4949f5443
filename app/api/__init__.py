"""HTTP routes only: parse the request, call the service, answer in OpenAI's shapes."""
