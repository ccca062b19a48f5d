"""The control plane, split by the process that runs it.

* `controller/`: the `lmc-controller` process (torch-free);
* `agent/`: what runs inside each vLLM worker (uses the cache, so torch);
* `wire/`: messages, sockets and the request/reply transport every channel shares (torch-free);
* `admin/`: the HTTP client and `lmc-admin` (torch-free).
"""

#: The environment variable holding the controller's API key (read by lmc-controller and lmc-admin).
API_KEY_ENV = "LMC_CONTROLLER_API_KEY"
