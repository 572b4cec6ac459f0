"""`fastvlm serve`: an OpenAI-compatible chat-completions server with a batching engine and a web page.

Modules: `cli` (the subcommand; its docstring is the user documentation), `app` (FastAPI
routes, limits, auth, errors), `engine` (the thread that owns the model and batches
requests), `protocol` (request models and response shapes), `images` (data: URIs and
optional remote fetching), `testing` (in-process servers for tests and the load test).
Nothing heavy is imported here.
"""
