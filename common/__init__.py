"""What every side of joulegate may import, and which imports none of them: the error root and the errors calls
answer with, input checks, gRPC plumbing (status mapping, servicer registration, health and reflection), socket
binding, and the schema of the configuration sections that the request path reads (so that the meter daemon
validates the whole file without loading the request path)."""
