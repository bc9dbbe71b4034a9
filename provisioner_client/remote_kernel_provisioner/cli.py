"""``remote-kernel-spec`` (also ``jupyter remote-kernel-spec``): install kernelspecs that use
the Remote Kernel Operator, and bootstrap kernel images.

    remote-kernel-spec install --profile python-pods --image-name my/kernel:1 --user
    remote-kernel-spec install --profile ssh-pool --remote-hosts node1 --remote-hosts node2 --language R
    remote-kernel-spec bootstrap --dest /usr/local/bin
    remote-kernel-spec migrate --all --write-profiles profiles.yaml --replace

``migrate`` rewrites kernelspecs written by gateway_provisioners' installers or Enterprise
Gateway for the remote-kernel provisioner, and says what it could not carry over.

Options the seed's jupyter-k8s-spec, -docker-spec, -yarn-spec and -ssh-spec had keep their
names. Only options given are written (see ``kernelspec``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
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
from .migrate import MigrationError, migrate_kernelspec


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
    install.add_argument(
        "--language",
        default="python",
        type=str.lower,
        help="python, R or scala (Apache Toree; default python)",
    )
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
    migrate = commands.add_parser(
        "migrate",
        help="rewrite gateway_provisioners' or Enterprise Gateway's kernelspecs for the remote-kernel "
        "provisioner",
    )
    migrate.add_argument(
        "kernels",
        nargs="*",
        help="kernel names (as `jupyter kernelspec list` shows) or kernelspec directories",
    )
    migrate.add_argument(
        "--all", action="store_true", help="every installed kernelspec of gateway_provisioners or EG"
    )
    migrate.add_argument(
        "--profile",
        help="the RemoteKernelProfile every migrated kernelspec uses (default: one per kernelspec)",
    )
    migrate.add_argument("--namespace", help="namespace of the RemoteKernels")
    migrate.add_argument("--operator-class", help="the operator (RKO_OPERATOR_CLASS) that handles them")
    migrate.add_argument(
        "--write-profiles",
        metavar="FILE",
        help="write the RemoteKernelProfiles an administrator would apply ('-': standard output)",
    )
    migrate.add_argument("--suffix", default="", help="added to each kernel name (default: the same name)")
    migrate.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    migrate_where = migrate.add_mutually_exclusive_group()
    migrate_where.add_argument("--user", action="store_true", help="install for the current user")
    migrate_where.add_argument("--sys-prefix", action="store_true", help=f"install into {sys.prefix}")
    migrate_where.add_argument("--prefix", help="install into this prefix")
    migrate.add_argument(
        "--replace", action="store_true", help="replace a kernelspec of the same name (e.g. the original)"
    )
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


def _write_kernelspec(
    name: str, spec: dict[str, Any], source_dir: Path | None, args: argparse.Namespace
) -> Path:
    """Install ``spec`` as ``name`` (with the source's logos), as ``install`` does."""
    prefix = sys.prefix if args.sys_prefix else args.prefix
    target = destination(name, args.user, prefix)
    if target.exists() and not args.replace:
        raise SpecOptionError(
            f"A kernelspec {name!r} is already installed at {target}; add --replace to replace it, or "
            "--suffix to install beside it."
        )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        for logo in sorted(source_dir.glob("logo-*")) if source_dir else []:
            shutil.copyfile(logo, Path(tmp) / logo.name)
        # The original's launch scripts are not copied: our launcher replaces them.
        installed = KernelSpecManager().install_kernel_spec(tmp, name, user=args.user, prefix=prefix)
    return Path(installed)


def _sources(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(kernel name, kernelspec directory) for each kernelspec to migrate."""
    found = KernelSpecManager().find_kernel_specs()
    sources: list[tuple[str, Path]] = []
    for item in args.kernels:
        path = Path(item)
        if (path / "kernel.json").is_file():
            sources.append((path.name, path))
        elif item in found:
            sources.append((item, Path(found[item])))
        else:
            raise SpecOptionError(
                f"No kernelspec {item!r}: give a name `jupyter kernelspec list` shows, or a directory."
            )
    if args.all:
        sources += [(name, Path(path)) for name, path in sorted(found.items()) if name not in args.kernels]
    if not sources:
        raise SpecOptionError("Name the kernelspecs to migrate, or give --all.")
    return sources


def migrate(args: argparse.Namespace) -> int:
    """Migrate each kernelspec; 0 when every one named was migrated."""
    failed = 0
    profiles: list[dict[str, Any]] = []
    for name, directory in _sources(args):
        try:
            spec = json.loads((directory / "kernel.json").read_text())
            result = migrate_kernelspec(
                name + args.suffix,
                spec,
                profile=args.profile,
                namespace=args.namespace,
                operator_class=args.operator_class,
            )
        except (MigrationError, SpecOptionError, ValueError, OSError) as err:
            explicit = name in args.kernels or str(directory) in args.kernels
            print(f"{'Cannot migrate' if explicit else 'Skipped'} {name}: {err}", file=sys.stderr)
            failed += explicit
            continue
        if args.dry_run:
            print(f"Would migrate {name} ({result.source}) to {name + args.suffix}:")
            print(json.dumps(result.kernelspec, indent=2))
        else:
            path = _write_kernelspec(name + args.suffix, result.kernelspec, directory, args)
            print(f"Migrated {name} ({result.source}) to {path}")
        for line in result.moved:
            print(f"  moved: {line}")
        for line in result.dropped:
            print(f"  not carried over: {line}")
        if not args.profile:
            profiles.append(result.profile)
    if profiles and args.write_profiles:
        text = yaml.safe_dump_all(profiles, sort_keys=False)
        if args.write_profiles == "-":
            print(text, end="")
        else:
            Path(args.write_profiles).write_text(text)
            print(
                f"Wrote {len(profiles)} RemoteKernelProfile(s) to {args.write_profiles}: kubectl apply -f it."
            )
    elif profiles:
        names = ", ".join(p["metadata"]["name"] for p in profiles)
        print(
            f"The migrated kernelspecs use the RemoteKernelProfiles {names}; --write-profiles FILE writes them."
        )
    return 2 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "install":
            path = install(args)
            print(f"Installed kernelspec {path.name} in {path}")
        elif args.command == "migrate":
            return migrate(args)
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
