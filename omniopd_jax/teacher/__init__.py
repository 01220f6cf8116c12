"""Teacher continuations, from any text API or our own engine.

wire.py        request / sample / HTTP-call / verdict types and shared error parsing (pure)
apis/          one module per API: base (packing, classification), openai_completions,
               openai_chat, anthropic, gemini; `local` (local.py) is one more
backends.py    the registry: config name -> Backend class (`local` included, imported lazily)
client.py      TeacherClient: thread-safe submit/probe/metrics/halt for the synchronous loop
dispatch.py    its event-loop side: cache look-ups, worker pool, retries, accounting
pacing.py      token buckets, the 429-storm gate, backoff
cache.py       SQLite cache of the teacher's draws, by request and sample index
budget.py      the hard spending cap (worst-case reservations)
futures.py     the futures submit returns (stock concurrent.futures)
secrets.py     scrubs the API key from every string and log record the client hands out
errors.py      TeacherError, TeacherCapabilityError, TeacherHalted (what stops a run)
engine.py      the local engine: an HF checkpoint sampled in batches, stop strings, log-probs
protocol.py    OpenAI completions bodies <-> engine jobs, with the server's request limits
chat.py        OpenAI chat bodies <-> engine jobs, through the model's chat template
batcher.py     gathers concurrent jobs into one engine run on a worker thread
local.py       the `local` backend: the engine in process, answering as the server would
server.py      the engine's HTTP shell (aiohttp routes only): `python -m omniopd_jax.serve`
launch.py      runs that server as a subprocess and waits until it is ready
"""
