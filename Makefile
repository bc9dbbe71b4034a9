# The verbs people type. Everything a fresh machine needs is installed by these targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export PYTHONPATH := $(CURDIR)/hack

.PHONY: help venv cluster-bin node-bin node node-down cluster demo-kubernetes cluster-down cluster-status images operator-image helm yarn chart demo run bench chaos test test-unit test-integration lint clean

help:
	@echo "make demo          local control plane + operator + a kernel running code, then clean up"
	@echo "make demo-kubernetes  the same with the kernel in a pod on a real local node (kubelet + containerd)"
	@echo "make run           run the operator against the current kubeconfig (KUBECONFIG)"
	@echo "make bench         launch latency (p50/p95), bursts, scale and launch steps against the alternatives"
	@echo "make chaos         the fault suite at full size: the operator killed during 50 launches, five rounds"
	@echo "make images        build the Python, R and Scala kernel images and the ssh test hosts' environment locally"
	@echo "make operator-image  build the operator's image (Dockerfile) into the local Docker engine"
	@echo "make yarn          build the test YARN and the kernel's YARN ApplicationMaster with Maven"
	@echo "make chart         lint and render the Helm chart (helm is built from its Go module once)"
	@echo "make test          install what the tests need and run every test (what CI runs)"
	@echo "make cluster       build (once) and start a local Kubernetes control plane"
	@echo "make cluster-down  stop it"
	@echo "make node          add a real node (kubelet + containerd, images copied in) to it; make node-down"
	@echo "make lint          ruff and mypy --strict"

$(STAMP): pyproject.toml
	@echo "Installing the project and its test tools into $(VENV)..."
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -m pip install -q -U pip > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(VPY) -m pip install -q -e '.[operator,client,launcher,dev]' >> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

cluster-bin:
	@bash hack/cluster/build.sh

node-bin:
	@bash hack/node/build.sh

cluster: cluster-bin venv
	@$(VPY) -m localcluster up

cluster-down: venv
	@$(VPY) -m localcluster node-down
	@$(VPY) -m localcluster down

node: cluster node-bin
	@bash hack/install-system-deps.sh
	@$(VPY) -m localcluster node-up

node-down: venv
	@$(VPY) -m localcluster node-down

cluster-status: venv
	@$(VPY) -m localcluster status

images: venv
	@bash hack/install-system-deps.sh
	@$(VPY) -c "from localcluster.docker import DockerEngine as E; e = E(); e.start(); print('Kernel images:', e.build_kernel_image(), e.build_kernel_image('r'), e.build_kernel_image('scala'))"
	@echo "ssh test hosts' Python environment: $$(bash hack/images/build-host-env.sh)"

operator-image: venv
	@bash hack/install-system-deps.sh
	@$(VPY) -c "from localcluster.docker import DockerEngine as E; e = E(); e.start(); print('Operator image:', e.build_operator_image())"

helm:
	@bash hack/helm/build.sh > /dev/null

yarn:
	@bash hack/install-system-deps.sh
	@echo "YARN jars (test cluster, kernel ApplicationMaster): $$(bash hack/yarn/build.sh)"

chart: helm
	@diff -r -q crds charts/remote-kernel-operator/crds > /dev/null || \
	  { echo "charts/remote-kernel-operator/crds/ differs from crds/: copy crds/*.yaml there."; exit 1; }
	@.cache/helm/*/helm lint --strict charts/remote-kernel-operator
	@.cache/helm/*/helm template rko charts/remote-kernel-operator --kube-version 1.37.0 > /dev/null && echo "The chart renders."

demo: cluster-bin venv
	@$(VPY) hack/demo.py

# The same with the kernel in a pod, on a real node (kubelet + containerd) started for it.
demo-kubernetes: cluster-bin node-bin venv
	@bash hack/install-system-deps.sh
	@$(VPY) hack/demo.py --backend kubernetes

run: venv
	@$(VPY) -m kernel_operator

bench: cluster-bin node-bin venv
	@bash hack/install-system-deps.sh
	@# Compiled as pip compiles an installed package (this tree is an editable install, and a
	@# shell with PYTHONDONTWRITEBYTECODE would make each launcher compile its modules again).
	@$(VPY) -m compileall -q launchers operator provisioner_client
	@$(VPY) bench/launch_latency.py
	@$(VPY) bench/cold_launch.py
	@$(VPY) bench/burst.py
	@$(VPY) bench/pool_latency.py

# The full fault round (CI runs a smaller one within make test): 50 kernels, five kills.
chaos: cluster-bin helm venv
	@bash hack/install-system-deps.sh
	@$(MAKE) --no-print-directory images
	@RKO_CHAOS_KERNELS=50 RKO_CHAOS_ROUNDS=5 $(VENV)/bin/pytest -q -rs -s tests/integration/test_faults.py

lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy operator provisioner_client launchers hack/localcluster hack/demo.py

test-unit: venv
	@$(VENV)/bin/pytest -q tests/unit

test-integration: cluster-bin node-bin venv
	@$(VENV)/bin/pytest -q tests/integration

# What CI runs (.ci/run): system packages, builds (the control plane, the kernel image: long
# steps with their own progress, outside pytest's per-test timeout), lint, then every test.
test: cluster-bin node-bin helm venv
	@bash hack/install-system-deps.sh
	@$(MAKE) --no-print-directory images yarn
	@$(MAKE) --no-print-directory lint
	@$(VENV)/bin/pytest -q -rs --durations=30 tests

clean:
	rm -rf $(VENV) .cache .mypy_cache .pytest_cache .ruff_cache
