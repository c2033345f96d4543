//go:build tools

// Package etcd pins the etcd server the Kubernetes control plane stores its state in. It is a
// module of its own so that its dependencies do not shift those of the Kubernetes build.
package etcd

import _ "go.etcd.io/etcd/server/v3"
