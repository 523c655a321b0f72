//go:build tools

// Keeps the Loki command in this module's requirements (built with `go build <package>`).
package tools

import _ "github.com/grafana/loki/v3/cmd/loki"
