"""Command line: ``scripts/local-cluster build | up DIR | down DIR | status DIR``.

Why a CLI next to the Python API: developers want a cluster that outlives one command (to
point a locally running kubetrail at it, poke it with kubectl, read its audit log), and CI
wants ``build`` as a separate, cacheable step.  ``up`` leaves the components running and
exits; ``down``/``status`` find them again through ``DIR/state.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .build import ALL_BINARIES, BuildError, binary_version, build
from .cluster import ClusterError, LocalCluster
from .gotools import build_node, build_tools, versions_report


def _cmd_build(args: argparse.Namespace) -> int:
    result = build(log=sys.stderr, force=args.force)
    print(f"binaries in {result.bin_dir}")
    for name in ALL_BINARIES:
        print(f"  {name:<24} {binary_version(result.bin_dir / name)}")
    built = list(result.built)
    seconds = result.seconds
    tools, tools_result = build_tools(log=sys.stderr, force=args.force)
    built += tools_result.built
    seconds += tools_result.seconds
    node = None
    if args.node:
        node, node_result = build_node(log=sys.stderr, force=args.force)
        built += node_result.built
        seconds += node_result.seconds
    print(f"tools: HELM={tools.helm} KUBECTL={tools.kubectl}")
    if node is not None:
        print(f"node binaries in {node.dir} and {node.kube_dir}")
    for name, version in versions_report(tools, node):
        print(f"  {name:<24} {version}")
    what = f"built {', '.join(built)}" if built else "all cached, nothing built"
    print(f"{what} in {seconds:.1f}s")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cluster = LocalCluster.up(
        args.dir,
        stop_at_exit=False,
        allow_build=not args.no_build,
        controllers=args.controllers,
        webhook_url=args.webhook_url,
        webhook_ca=args.webhook_ca,
        webhook_token_file=args.webhook_token_file,
        webhook_client_cert=args.webhook_client_cert,
        webhook_client_key=args.webhook_client_key,
        event_ttl=args.event_ttl,
        compaction_interval=args.compaction_interval,
        no_watch_cache_for_events=args.no_watch_cache_for_events,
        audit_log_maxsize=args.audit_log_maxsize,
        audit_log_maxbackup=args.audit_log_maxbackup,
        audit_log_compress=args.audit_log_compress,
        apiserver_extra_args=args.apiserver_arg,
        api_port=args.api_port,
        etcd_port=args.etcd_port,
        ready_timeout=args.ready_timeout,
        nodes=args.nodes,
        container_log_max_size=args.container_log_max_size,
        container_log_max_files=args.container_log_max_files,
        container_log_monitor_interval=args.container_log_monitor_interval,
        images=args.image,
        pod_cidr=args.pod_cidr,
    )
    print(f"local cluster up in {time.monotonic() - started:.1f}s: {cluster.url}")
    for name, comp in cluster.components.items():
        print(f"  {name:<24} pid {comp.pid:<8} port {comp.port:<6} log {comp.log_path}")
    if cluster.node is not None:
        node = cluster.node
        print(f"node {node.name} ({node.ip}) Ready {cluster.node_ready_seconds:.1f}s after its start")
        for name, comp in node.components.items():
            print(f"  {name:<24} pid {comp.pid:<8} log {comp.log_path}")
        print(f"  images: {', '.join(node.imported)}")
    print(
        f"source {cluster.dir / 'env'} for KUBE_URL, tokens and paths; "
        f"stop with: scripts/local-cluster down {cluster.dir}"
    )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    cluster = LocalCluster.attach(args.dir)
    cluster.down(timeout=args.timeout)
    print(f"stopped local cluster in {cluster.dir} (logs kept)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = LocalCluster.attach(args.dir)
    status = cluster.status()
    if args.json:
        print(json.dumps({"url": cluster.url, "components": status}, indent=2))
    else:
        print(f"{cluster.url}  ({cluster.dir})")
        for name, st in status.items():
            rss = f"{st['rss_kb'] / 1024:.0f} MiB" if st["rss_kb"] else "-"
            state = "healthy" if st["healthy"] else ("running, unhealthy" if st["running"] else "stopped")
            print(f"  {name:<24} {state:<18} pid {st['pid']!s:<8} port {st['port']:<6} rss {rss}")
    all_ok = all(st["healthy"] for st in status.values())
    return 0 if all_ok else 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="local-cluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build (or find cached) etcd, kube binaries, helm and kubectl")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument(
        "--node",
        action="store_true",
        help="also the node: kubelet, kube-proxy, pause, containerd, runc, CNI plugins, crictl",
    )
    b.set_defaults(func=_cmd_build)

    u = sub.add_parser("up", help="start a fresh cluster in DIR and wait until it is ready")
    u.add_argument("dir", type=Path)
    u.add_argument(
        "--controllers",
        action="store_true",
        help="also run kube-controller-manager and kube-scheduler (real controller Events)",
    )
    u.add_argument("--webhook-url", help="audit webhook receiver, https://...")
    u.add_argument("--webhook-ca", help="CA file that signed the receiver's serving cert")
    u.add_argument("--webhook-token-file", help="bearer token the apiserver sends to the receiver")
    u.add_argument("--webhook-client-cert", help="client cert the apiserver presents to the receiver")
    u.add_argument("--webhook-client-key")
    u.add_argument("--event-ttl", help="Go duration, apiserver default 1h")
    u.add_argument("--compaction-interval", help="--etcd-compaction-interval, default 5m, 0 disables")
    u.add_argument(
        "--no-watch-cache-for-events",
        action="store_true",
        help="serve Event watches from etcd (deterministic 410 after compaction)",
    )
    u.add_argument("--audit-log-maxsize", type=int, default=100, metavar="MB")
    u.add_argument("--audit-log-maxbackup", type=int, default=10, metavar="N")
    u.add_argument("--audit-log-compress", action="store_true", help="gzip rotated audit logs")
    u.add_argument(
        "--apiserver-arg",
        action="append",
        default=[],
        metavar="--FLAG=VALUE",
        help="extra kube-apiserver flag (repeatable)",
    )
    u.add_argument("--api-port", type=int, help="fixed apiserver port (default: a free one)")
    u.add_argument("--etcd-port", type=int, help="fixed etcd client port (default: a free one)")
    u.add_argument("--ready-timeout", type=float, default=120.0, metavar="SECONDS")
    u.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    u.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="1: also a real node (containerd, kubelet, kube-proxy; needs root and --controllers)",
    )
    u.add_argument("--pod-cidr", default="10.244.0.0/24", help="the node's pod network (CNI bridge, host-local)")
    u.add_argument("--container-log-max-size", default="10Mi", help="kubelet containerLogMaxSize (e.g. 1Mi)")
    u.add_argument("--container-log-max-files", type=int, default=5, help="kubelet containerLogMaxFiles")
    u.add_argument(
        "--container-log-monitor-interval", default="10s", help="kubelet containerLogMonitorInterval (min 3s)"
    )
    u.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="ARCHIVE",
        help="OCI image archive to import into the node (repeatable), e.g. the output of scripts/image build",
    )
    u.set_defaults(func=_cmd_up)

    d = sub.add_parser("down", help="stop the cluster in DIR (SIGTERM, then SIGKILL); keeps DIR")
    d.add_argument("dir", type=Path)
    d.add_argument("--timeout", type=float, default=15.0, help="seconds before SIGKILL")
    d.set_defaults(func=_cmd_down)

    s = sub.add_parser("status", help="show components, health and RSS (exit 3 if not all healthy)")
    s.add_argument("dir", type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (BuildError, ClusterError) as exc:
        print(f"local-cluster {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `local-cluster up DIR | head -1`; the command itself succeeded
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"local-cluster {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
