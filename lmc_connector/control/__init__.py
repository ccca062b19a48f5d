"""The control plane: controller process, in-worker agent, HTTP API, admin CLI.

Nothing here imports torch or vllm except `agent` and `executor` (through the cache engine).
"""

#: The environment variable holding the controller's API key (read by lmc-controller and lmc-admin).
API_KEY_ENV = "LMC_CONTROLLER_API_KEY"
