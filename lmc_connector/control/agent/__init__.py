"""What runs inside each vLLM worker for the controller: registration, heartbeats, chunk
events, and the execution of the controller's commands on the worker's cache."""
