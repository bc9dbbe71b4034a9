"""``remote-kernel-spec`` (also ``jupyter remote-kernel-spec``): install kernelspecs that use
the Remote Kernel Operator, and bootstrap kernel images.

    remote-kernel-spec install --profile python-pods --image-name my/kernel:1 --user
    remote-kernel-spec install --profile ssh-pool --remote-hosts node1 --remote-hosts node2 --language R
    remote-kernel-spec bootstrap --dest /usr/local/bin

Options the seed's jupyter-k8s-spec, -docker-spec, -yarn-spec and -ssh-spec had keep their
names. Only options given are written (see ``kernelspec``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.paths import SYSTEM_JUPYTER_PATH, jupyter_data_dir

from .kernelspec import (
    BACKENDS,
    SpecOptionError,
    SpecOptions,
    bootstrap_script,
    build_kernelspec,
    default_kernel_name,
)


def _pair(text: str) -> tuple[str, Any]:
    """NAME=VALUE; VALUE is read as JSON when it parses, else kept as text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _names(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists, as the seed's CLI and env vars took them."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="remote-kernel-spec", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install", help="install a kernelspec that names the remote-kernel provisioner"
    )
    install.add_argument(
        "--profile",
        help="the RemoteKernelProfile the kernels run under (kubectl get rkprofile); default: the "
        "cluster's default profile",
    )
    install.add_argument(
        "--backend",
        help=f"the profile's backend, one of {', '.join(BACKENDS)}: needed only for --backend-config "
        "and --extra-spark-opts (the profile decides where kernels run)",
    )
    install.add_argument(
        "--swarm", action="store_true", help="the profile's backend is dockerSwarm (the seed's option)"
    )
    install.add_argument("--language", default="python", type=str.lower, help="python or R (default python)")
    install.add_argument("--kernel-name", default="", help="default remote_<backend>_<language>")
    install.add_argument("--display-name", default="")
    install.add_argument(
        "--namespace", help="namespace of the RemoteKernels (default: KERNEL_NAMESPACE, else 'default')"
    )
    install.add_argument("--image-name", help="kernel image (container backends)")
    install.add_argument("--executor-image-name", help="Spark executor image")
    install.add_argument("--authorized-users", action="append", help="repeat or comma-separate")
    install.add_argument("--unauthorized-users", action="append", help="repeat or comma-separate")
    install.add_argument("--port-range", help="'lower..upper' (0..0: any port)")
    install.add_argument("--launch-timeout", type=int, help="seconds (default: the operator's)")
    install.add_argument(
        "--idle-timeout", type=int, help="seconds of inactivity before the operator culls the kernel"
    )
    install.add_argument("--transport-encryption", help="disabled, auto or required (CurveZMQ)")
    install.add_argument(
        "--remote-hosts", action="append", help="ssh backend: hosts (repeat or comma-separate)"
    )
    install.add_argument("--load-balancing-algorithm", choices=["round-robin", "least-connection"])
    install.add_argument(
        "--operator-class", help="the operator (RKO_OPERATOR_CLASS) that handles these kernels"
    )
    install.add_argument(
        "--ipykernel-subclass-name",
        "--kernel-class-name",
        dest="kernel_class_name",
        help="Python kernel class",
    )
    install.add_argument(
        "--extra-spark-opts", help="yarn: Spark options, among those the profile allows (spec.yarn.sparkOpts)"
    )
    install.add_argument(
        "--backend-config",
        action="append",
        type=_pair,
        default=[],
        metavar="NAME=VALUE",
        help="a tenant's ssh or yarn choice (spec.ssh / spec.yarn; VALUE as JSON or text)",
    )
    install.add_argument(
        "--env", action="append", type=_pair, default=[], metavar="NAME=VALUE", help="kernelspec env"
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help=f"install into {sys.prefix}")
    where.add_argument("--prefix", help="install into this prefix")
    install.add_argument("--replace", action="store_true", help="replace a kernelspec of the same name")
    bootstrap = commands.add_parser("bootstrap", help="write bootstrap-kernel.sh into a kernel image")
    bootstrap.add_argument("--dest", default="/usr/local/bin")
    bootstrap.add_argument(
        "--python", default=sys.executable, help="the image's Python with kernel_launchers"
    )
    return top


def options_from(args: argparse.Namespace) -> SpecOptions:
    backend = "dockerSwarm" if args.swarm else args.backend
    backend_config: dict[str, Any] = {}
    if args.extra_spark_opts:
        backend_config["sparkOpts"] = args.extra_spark_opts
    backend_config.update(dict(args.backend_config))
    return SpecOptions(
        backend=backend,
        profile=args.profile,
        language=args.language,
        kernel_name=args.kernel_name,
        display_name=args.display_name,
        namespace=args.namespace,
        image_name=args.image_name,
        executor_image_name=args.executor_image_name,
        authorized_users=_names(args.authorized_users),
        unauthorized_users=_names(args.unauthorized_users) if args.unauthorized_users else None,
        port_range=args.port_range,
        launch_timeout=args.launch_timeout,
        idle_timeout=args.idle_timeout,
        transport_encryption=args.transport_encryption,
        remote_hosts=_names(args.remote_hosts),
        load_balancing_algorithm=args.load_balancing_algorithm,
        operator_class=args.operator_class,
        kernel_class_name=args.kernel_class_name,
        backend_config=backend_config,
        env={name: str(value) for name, value in args.env},
    )


def destination(kernel_name: str, user: bool, prefix: str | None) -> Path:
    """Where jupyter_client's KernelSpecManager installs ``kernel_name`` for these options."""
    if user:
        return Path(jupyter_data_dir()) / "kernels" / kernel_name
    if prefix:
        return Path(prefix) / "share" / "jupyter" / "kernels" / kernel_name
    return Path(SYSTEM_JUPYTER_PATH[0]) / "kernels" / kernel_name


def install(args: argparse.Namespace) -> Path:
    options = options_from(args)
    spec = build_kernelspec(options)
    name = options.kernel_name or default_kernel_name(options)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    target = destination(name, args.user, prefix)
    if target.exists() and not args.replace:
        raise SpecOptionError(
            f"A kernelspec {name!r} is already installed at {target}; add --replace to replace it."
        )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        installed = KernelSpecManager().install_kernel_spec(tmp, name, user=args.user, prefix=prefix)
    return Path(installed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "install":
            path = install(args)
            print(f"Installed kernelspec {path.name} in {path}")
        else:
            script = Path(args.dest) / "bootstrap-kernel.sh"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(bootstrap_script(args.python))
            script.chmod(0o755)
            print(f"Wrote {script}")
    except (SpecOptionError, OSError) as err:
        print(f"remote-kernel-spec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
