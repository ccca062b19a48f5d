"""The `lmc-controller` process: HTTP API, worker monitor, command fan-out. Never imports torch,
vllm or the cache, so it starts in well under a second on any machine."""
