package main

import (
	"net"
	"net/http"
)

// serveHTTP serves the control server on ln until ln is closed.
func serveHTTP(ln net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h}
	_ = srv.Serve(ln)
}
