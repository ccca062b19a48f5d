"""What LMCache's own configuration knows, so that an LMCache setup loads here unchanged.

`config.py` sorts every key it is given: a key of `CacheConfig` is used; a
key LMCache knows that `CacheConfig` lacks is ignored with one warning
listing them all; anything else is a mistake. The sets below are LMCache's
names, gathered from its engine configuration across releases (the v0
`LMCacheEngineConfig`, the v1 `_CONFIG_DEFINITIONS`, its aliases and
deprecated names) and its documentation.

Implementing one of these keys is one line: add the field to `CacheConfig`.
Nothing here changes, because "ignored" is computed as "LMCache's, not ours".
"""

from __future__ import annotations

#: Every configuration key LMCache has had. A key that is also a `CacheConfig` field is ours.
LMCACHE_KEYS: frozenset[str] = frozenset(
    {
        # storage
        "chunk_size",
        "local_cpu",
        "max_local_cpu_size",
        "local_cpu_use_hugepages",
        "reserve_local_cpu_size",
        "local_disk",
        "local_disk_path_sharding",
        "max_local_disk_size",
        "remote_url",
        "remote_serde",
        "remote_storage_plugins",
        "storage_plugins",
        "external_backends",
        "runtime_plugin_locations",
        "plugin_locations",
        "gds_path",
        "gds_path_sharding",
        "gds_buffer_size",
        "gds_backend",
        "use_gds",
        "cufile_buffer_size",
        "weka_path",
        "maru_path",
        "maru_pool_size",
        "numa_mode",
        "cache_policy",
        "cost_aware_half_life_seconds",
        "cost_aware_ewma_alpha",
        "priority_limit",
        "pin_timeout_sec",
        "pin_check_interval_sec",
        "enable_lazy_memory_allocator",
        "lazy_memory_initial_ratio",
        "lazy_memory_expand_trigger_ratio",
        "lazy_memory_step_ratio",
        "lazy_memory_safe_size",
        # saving and loading
        "use_layerwise",
        "save_decode_cache",
        "save_unfull_chunk",
        "pre_caching_hash_algorithm",
        "enable_async_loading",
        "min_retrieve_tokens",
        "hit_miss_ratio",
        "retrieve_locations",
        "store_location",
        "blocking_timeout_secs",
        "use_gpu_connector_v3",
        "py_enable_gc",
        "error_handling",
        "extra_config",
        "audit_actual_remote_url",
        # blending
        "enable_blending",
        "blend_recompute_ratio",
        "blend_recompute_ratios",
        "blend_thresholds",
        "blend_check_layers",
        "blend_min_tokens",
        "blend_special_str",
        "blend_separator",
        "blend_add_special_in_precomp",
        # peers and lookups
        "enable_p2p",
        "p2p_host",
        "p2p_init_ports",
        "p2p_lookup_ports",
        "lookup_url",
        "distributed_url",
        "lookup_timeout_ms",
        "lookup_server_worker_ids",
        "enable_scheduler_bypass_lookup",
        "external_lookup_client",
        "transfer_channel",
        "mp_host",
        "mp_port",
        # controller
        "enable_controller",
        "lmcache_instance_id",
        "controller_pull_url",
        "controller_reply_url",
        "lmcache_worker_ports",
        "lmcache_worker_ids",
        "lmcache_worker_url",
        "lmcache_worker_heartbeat_delay_time",
        "lmcache_worker_heartbeat_time",
        # disaggregated prefill (PD) and NIXL
        "enable_pd",
        "enable_xpyd",
        "pd_role",
        "pd_buffer_size",
        "pd_buffer_device",
        "pd_peer_host",
        "pd_peer_init_port",
        "pd_peer_alloc_port",
        "pd_peer_query_port",
        "pd_proxy_host",
        "pd_proxy_port",
        "pd_allocation_timeout_sec",
        "pd_shutdown_timeout_sec",
        "pd_condition_poll_interval_sec",
        "pd_max_prefill_len",
        "pd_backend_mode",
        "pd_skip_proxy_notification",
        "pd_bidirectional",
        "enable_nixl",
        "nixl_role",
        "nixl_receiver_host",
        "nixl_receiver_port",
        "nixl_peer_port",
        "nixl_buffer_size",
        "nixl_buffer_device",
        "nixl_enable_gc",
        "nixl_backends",
        "nixl_peer_host",
        "nixl_peer_init_port",
        "nixl_peer_alloc_port",
        "nixl_proxy_host",
        "nixl_proxy_port",
        # observability and services
        "internal_api_server_enabled",
        "internal_api_server_host",
        "internal_api_server_port_start",
        "internal_api_server_include_index_list",
        "internal_api_server_socket_path_prefix",
        "enable_chunk_statistics",
        "chunk_statistics_auto_start_statistics",
        "chunk_statistics_auto_exit_timeout_hours",
        "chunk_statistics_auto_exit_target_unique_chunks",
        "chunk_statistics_strategy",
        "enable_kv_events",
        "remote_config_url",
        "app_id",
        "script_allowed_imports",
        # hidden states (vLLM-Omni)
        "enable_hidden_state_cache",
        "max_hidden_state_cpu_size",
        "hidden_state_layers",
        "hidden_states_retrieve_mode",
        # LMCache v0
        "local_device",
        "max_local_cache_size",
        "pipelined_backend",
        # read by vLLM's own LMCacheConnectorV1 from kv_connector_extra_config
        "use_native",
    }
)

#: LMCache's older names for keys implemented here under their current names.
LMCACHE_ALIASES: dict[str, str] = {
    "controller_url": "controller_pull_url",
    "lmcache_worker_port": "lmcache_worker_ports",
}

#: `LMCACHE_*` variables LMCache reads that are not configuration keys.
LMCACHE_VARIABLES: frozenset[str] = frozenset(
    {
        "LMCACHE_USE_EXPERIMENTAL",
        "LMCACHE_TRACK_USAGE",
        "LMCACHE_USAGE_TRACK_URL",
        "LMCACHE_LOG_LEVEL",
        "LMCACHE_REQUEST_TELEMETRY_TYPE",
        "LMCACHE_ENABLE_LAYER_TIMING",
        "LMCACHE_COORDINATOR_URL",
    }
)

#: Prefixes of LMCache's variable families (`LMCACHE_EC_<KEY>` overrides its EC connector).
LMCACHE_VARIABLE_PREFIXES: tuple[str, ...] = ("LMCACHE_EC_",)


def is_lmcache_variable(name: str) -> bool:
    """Whether `name` is an `LMCACHE_*` variable LMCache reads that is not a key."""
    return name in LMCACHE_VARIABLES or name.startswith(LMCACHE_VARIABLE_PREFIXES)
