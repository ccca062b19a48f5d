"""The controller's HTTP client and the `lmc-admin` command line (httpx only, no torch)."""
