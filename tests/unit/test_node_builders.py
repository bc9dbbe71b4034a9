"""The test node's pure builders: what the kubelet, containerd and CNI are told (no servers)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from localcluster.cluster import SERVICE_CIDR, SERVICE_IP
from localcluster.node import (
    FIXED_PATHS,
    SUITE_RANGE,
    NodeAddresses,
    cni_conflist,
    containerd_config,
    kubelet_config,
    registry_hosts,
)

ROOT = Path("/suite/node0")
SUITE = ipaddress.ip_network(SUITE_RANGE)


def test_every_address_a_node_uses_is_the_suites_own_and_nodes_do_not_overlap() -> None:
    first, second = NodeAddresses.for_index(0), NodeAddresses.for_index(1)
    for a in (first, second):
        for address in (a.gateway, a.node_ip, a.pod_gateway):
            assert ipaddress.ip_address(address) in SUITE
        assert ipaddress.ip_network(a.pod_subnet).subnet_of(SUITE)  # type: ignore[arg-type]
    assert ipaddress.ip_address(SERVICE_IP) in ipaddress.ip_network(SERVICE_CIDR)
    assert ipaddress.ip_network(SERVICE_CIDR).subnet_of(SUITE)  # type: ignore[arg-type]
    assert not ipaddress.ip_network(first.pod_subnet).overlaps(ipaddress.ip_network(second.pod_subnet))
    assert first.gateway != second.gateway


def test_the_kubelet_changes_nothing_host_wide_and_serves_only_on_the_node() -> None:
    a = NodeAddresses.for_index(0)
    config = kubelet_config(ROOT, a, ROOT / "containerd.sock")
    assert config["address"] == a.node_ip and config["healthzBindAddress"] == "127.0.0.1"
    assert config["readOnlyPort"] == 0
    assert config["protectKernelDefaults"] is False  # its sysctls are the node's own files
    assert config["makeIPTablesUtilChains"] is False
    assert config["evictionHard"] == {} and config["imageGCHighThresholdPercent"] == 100
    assert config["containerRuntimeEndpoint"] == f"unix://{ROOT / 'containerd.sock'}"
    assert str(config["tlsCertFile"]).startswith(str(ROOT))
    assert config["podLogsDir"] == FIXED_PATHS["pod-logs"]  # bound to the node's folder


def test_containerd_keeps_its_files_in_the_nodes_folder_and_streams_on_loopback() -> None:
    text = containerd_config(ROOT, ROOT / "c.sock", ROOT / "cni", ROOT / "certs.d")
    for key in ("root", "state"):
        assert f'{key} = "{ROOT / "containerd" / key}"' in text
    assert f'Root = "{ROOT / "runc"}"' in text
    assert 'stream_server_address = "127.0.0.1"' in text
    assert "restrict_oom_score_adj = true" in text  # no CAP_SYS_RESOURCE here
    assert f'config_path = "{ROOT / "certs.d"}"' in text
    assert "SystemdCgroup = false" in text


def test_pods_get_no_masquerade_and_pulls_go_only_to_the_nodes_loopback() -> None:
    a = NodeAddresses.for_index(0)
    bridge = cni_conflist(a)["plugins"][0]
    assert bridge["ipMasq"] is False  # no iptables rules
    assert bridge["ipam"]["ranges"] == [[{"subnet": a.pod_subnet, "gateway": a.pod_gateway}]]
    hosts = registry_hosts(1)
    servers = [line.split('"')[1] for line in hosts.splitlines() if '"http' in line]
    assert servers and all(s.startswith("http://127.0.0.1:") for s in servers)
