//go:build tools

// Package engine pins the upstream Pulumi CLI so that `go build` can compile it
// from the Go module proxy; `go install` refuses upstream's replace directives.
package engine

import _ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"
