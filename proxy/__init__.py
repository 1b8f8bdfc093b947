"""Everything on the request path: config, server assembly, auth, shaping, backends, HTTP facade, CLI."""
