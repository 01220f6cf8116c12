"""Teacher continuations: wire types, one module per API, the async client, the local engine and its HTTP server."""
