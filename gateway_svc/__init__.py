"""OpenAI-compatible HTTP gateway in front of the Omnibus gRPC API."""
