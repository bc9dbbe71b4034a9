// Command kubelet is the upstream kubelet built from the Kubernetes Go modules, for the test
// node (hack/localcluster/node.py). One change from upstream: the folder of container log
// links, fixed in the kubelet's code at /var/log/containers, is read from RKO_CONTAINER_LOGS_DIR
// so that a test node writes nothing outside its own folder.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kubelet/app"
	"k8s.io/kubernetes/pkg/kubelet"
)

func main() {
	if dir := os.Getenv("RKO_CONTAINER_LOGS_DIR"); dir != "" {
		kubelet.ContainerLogsDir = dir
	}
	os.Exit(cli.Run(app.NewKubeletCommand(context.Background())))
}
