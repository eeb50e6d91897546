"""kvtier's vLLM integration: `KVTierConnector` (see connector.py).

vLLM loads it by module path: kv_connector="KVTierConnector",
kv_connector_module_path="kvtier.vllm".
"""

from kvtier.vllm.connector import (
    KVTierConnector,
    KVTierConnectorMetadata,
    KVTierConnectorStats,
    check_vllm_version,
)

__all__ = [
    "KVTierConnector",
    "KVTierConnectorMetadata",
    "KVTierConnectorStats",
    "check_vllm_version",
]
