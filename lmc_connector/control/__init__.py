"""The control plane: controller process, in-worker agent, HTTP API, admin CLI.

Nothing here imports torch or vllm except `agent` and `executor` (through the cache engine).
"""
