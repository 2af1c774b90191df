// gotsnet: the Go tsnet row of `make bench` (test tooling only, never product).
//
// One process holds a whole tailnet: a DERP+STUN server on 127.0.0.1
// (tstest/integration.RunDERPAndSTUN), an in-process control server
// (tstest/integration/testcontrol) and two tailscale.com/tsnet nodes, "gots-a" and
// "gots-b". The benchmark's apps are goroutines in the same process: receivers and echo
// servers listen on node A, senders and clients dial from node B. So a flow is
// B app -> B netstack -> WireGuard (magicsock, UDP on loopback) -> A netstack -> A app,
// which is what a Go program using tsnet does. Run it in a network namespace with nothing
// but loopback (tests/bench/run.py does): no route leaves the machine, log upload is off
// (TS_NO_LOGS_NO_SUPPORT, logtail.Disable) and the DERP map names only the local server.
//
// Protocol (like tests/bench/loadgen.py): after setup it prints `READY {json}`, then reads
// commands on stdin, one a line, and answers each with `RESULT {json}`:
//
//	latency ITERS WARMUP          connect+1B echo, then 1B echo on an open flow (ms lists)
//	bulk STREAMS SECONDS          256 KiB writes for SECONDS on STREAMS flows
//	flows WORKERS SECONDS         connect / 1-byte echo / close loops
//	quit
//
// It exits on `quit`, on EOF of stdin, and after -max-seconds in any case.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/logtail"
	"tailscale.com/net/netns"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/tstest/integration"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/logger"
)

const (
	chunk     = 256 * 1024
	recvBuf   = 1024 * 1024
	ioTimeout = 30 * time.Second
)

// tb is just enough of testing.TB for RunDERPAndSTUN and stuntest (Helper, Logf, Fatalf,
// Cleanup); any other method panics on the nil embedded interface.
type tb struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
	verbose  bool
}

func (t *tb) Helper() {}
func (t *tb) Logf(format string, args ...any) {
	if t.verbose {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
	}
}
func (t *tb) Fatal(args ...any)                 { fatalf("%s", fmt.Sprint(args...)) }
func (t *tb) Fatalf(format string, args ...any) { fatalf(format, args...) }
func (t *tb) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}
func (t *tb) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
	t.cleanups = nil
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gotsnet: "+format+"\n", args...)
	os.Exit(1)
}

func emit(tag string, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fatalf("json: %v", err)
	}
	fmt.Printf("%s %s\n", tag, b)
}

type bench struct {
	a, b *tsnet.Server
	aIP  netip.Addr
	port int
}

func (bn *bench) nextPort() int { bn.port++; return bn.port }

func (bn *bench) dial(port int) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return bn.b.Dial(ctx, "tcp", netip.AddrPortFrom(bn.aIP, uint16(port)).String())
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// echo serves every connection of ln (a goroutine each) until ln is closed.
func echo(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 65536)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

func rtt(c net.Conn) (time.Duration, error) {
	var one [1]byte
	t0 := time.Now()
	if _, err := c.Write([]byte{'x'}); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(c, one[:]); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

func (bn *bench) connectRTT(port int) (time.Duration, error) {
	t0 := time.Now()
	c, err := bn.dial(port)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := rtt(c); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func (bn *bench) latency(iters, warmup int) (any, error) {
	port := bn.nextPort()
	ln, err := bn.a.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	go echo(ln)
	connect := make([]float64, 0, iters)
	for i := 0; i < warmup+iters; i++ {
		d, err := bn.connectRTT(port)
		if err != nil {
			return nil, fmt.Errorf("connect %d: %w", i, err)
		}
		if i >= warmup {
			connect = append(connect, ms(d))
		}
	}
	c, err := bn.dial(port)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	ping := make([]float64, 0, iters)
	for i := 0; i < warmup+iters; i++ {
		d, err := rtt(c)
		if err != nil {
			return nil, fmt.Errorf("pingpong %d: %w", i, err)
		}
		if i >= warmup {
			ping = append(ping, ms(d))
		}
	}
	return map[string]any{"connect": connect, "pingpong": ping}, nil
}

type span struct {
	bytes       int64
	first, last time.Time
}

func (bn *bench) bulk(streams int, seconds float64) (any, error) {
	port := bn.nextPort()
	ln, err := bn.a.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	spans := make([]span, streams)
	var sinkWG sync.WaitGroup
	acceptErr := make(chan error, 1)
	go func() { // the sink: accept every stream, count bytes to EOF
		for i := 0; i < streams; i++ {
			c, err := ln.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			sinkWG.Add(1)
			go func(i int, c net.Conn) {
				defer sinkWG.Done()
				defer c.Close()
				buf := make([]byte, recvBuf)
				for {
					c.SetReadDeadline(time.Now().Add(ioTimeout))
					n, err := c.Read(buf)
					if n > 0 {
						now := time.Now()
						if spans[i].bytes == 0 {
							spans[i].first = now
						}
						spans[i].last = now
						spans[i].bytes += int64(n)
					}
					if err != nil {
						return
					}
				}
			}(i, c)
		}
		acceptErr <- nil
	}()
	conns := make([]net.Conn, 0, streams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < streams; i++ {
		c, err := bn.dial(port)
		if err != nil {
			return nil, err
		}
		conns = append(conns, c)
	}
	if err := <-acceptErr; err != nil {
		return nil, err
	}
	data := make([]byte, chunk)
	rand.Read(data)
	cpu0 := cpuSeconds()
	var sent atomic.Int64
	errs := make(chan error, streams)
	var wg sync.WaitGroup
	end := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	for _, c := range conns {
		wg.Add(1)
		go func(c net.Conn) {
			defer wg.Done()
			for time.Now().Before(end) {
				c.SetWriteDeadline(time.Now().Add(ioTimeout))
				if _, err := c.Write(data); err != nil {
					errs <- err
					return
				}
				sent.Add(chunk)
			}
			if cw, ok := c.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			} else {
				c.Close()
			}
			c.SetReadDeadline(time.Now().Add(ioTimeout))
			io.Copy(io.Discard, c) // the sink's EOF: everything was delivered
		}(c)
	}
	wg.Wait()
	sinkWG.Wait()
	cpu := cpuSeconds() - cpu0
	close(errs)
	var errList []string
	for e := range errs {
		errList = append(errList, e.Error())
	}
	var total int64
	var first, last time.Time
	per := make([]int64, streams)
	for i, s := range spans {
		total += s.bytes
		per[i] = s.bytes
		if s.bytes > 0 && (first.IsZero() || s.first.Before(first)) {
			first = s.first
		}
		if s.last.After(last) {
			last = s.last
		}
	}
	secs := last.Sub(first).Seconds()
	return map[string]any{"bytes": total, "sent": sent.Load(), "seconds": secs,
		"per_stream": per, "errors": errList, "cpu_s": cpu}, nil
}

func (bn *bench) flows(workers int, seconds float64) (any, error) {
	port := bn.nextPort()
	ln, err := bn.a.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	go echo(ln)
	// one warm-up flow, like the Python clients' first dial
	if _, err := bn.connectRTT(port); err != nil {
		return nil, err
	}
	type res struct {
		lat    []float64
		errors int
		first  string
	}
	out := make([]res, workers)
	cpu0 := cpuSeconds()
	t0 := time.Now()
	end := t0.Add(time.Duration(seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(r *res) {
			defer wg.Done()
			for time.Now().Before(end) {
				d, err := bn.connectRTT(port)
				if err != nil {
					r.errors++
					if r.first == "" {
						r.first = err.Error()
					}
					if r.errors > 100 {
						return
					}
					continue
				}
				r.lat = append(r.lat, ms(d))
			}
		}(&out[w])
	}
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	var lat []float64
	errs, first := 0, ""
	for _, r := range out {
		lat = append(lat, r.lat...)
		errs += r.errors
		if first == "" {
			first = r.first
		}
	}
	sort.Float64s(lat)
	return map[string]any{"flows": len(lat), "errors": errs, "first_error": first,
		"elapsed": elapsed, "lat_ms": lat, "cpu_s": cpuSeconds() - cpu0}, nil
}

func main() {
	maxSeconds := flag.Int("max-seconds", 600, "exit after this many seconds in any case")
	dir := flag.String("dir", "", "state directory (default: a new temporary one, removed at exit)")
	verbose := flag.Bool("v", false, "log tsnet, control and DERP to stderr")
	flag.Parse()
	time.AfterFunc(time.Duration(*maxSeconds)*time.Second, func() {
		fatalf("-max-seconds %d reached", *maxSeconds)
	})

	// Nothing may try to leave the machine: no log upload, no netns socket marks.
	os.Setenv("TS_NO_LOGS_NO_SUPPORT", "true")
	envknob.SetNoLogsNoSupport()
	logtail.Disable()
	netns.SetEnabled(false)

	if *dir == "" {
		d, err := os.MkdirTemp("", "gotsnet-")
		if err != nil {
			fatalf("%v", err)
		}
		*dir = d
		defer os.RemoveAll(d)
	}
	t := &tb{verbose: *verbose}
	logf := logger.Discard
	if *verbose {
		logf = t.Logf
	}
	setup0 := time.Now()
	derpMap := integration.RunDERPAndSTUN(t, logf, "127.0.0.1")
	control := &testcontrol.Server{DERPMap: derpMap, DNSConfig: &tailcfg.DNSConfig{Proxied: true},
		MagicDNSDomain: "tail-scale.ts.net", Logf: logf}
	ctlLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatalf("control listener: %v", err)
	}
	go serveHTTP(ctlLn, control)
	controlURL := "http://" + ctlLn.Addr().String()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	node := func(name string) *tsnet.Server {
		s := &tsnet.Server{Dir: filepath.Join(*dir, name), ControlURL: controlURL, Hostname: name,
			Store: new(mem.Store), Ephemeral: true, Logf: logf, UserLogf: logf}
		if _, err := s.Up(ctx); err != nil {
			fatalf("%s up: %v", name, err)
		}
		return s
	}
	bn := &bench{a: node("gots-a"), b: node("gots-b"), port: 30000}
	// On quit or EOF: close the nodes, control and DERP, but exit within 5 s regardless
	// (a node's Close can wait on its control and DERP connections).
	defer func() {
		time.AfterFunc(5*time.Second, func() { os.RemoveAll(*dir); os.Exit(0) })
		bn.b.Close()
		bn.a.Close()
		ctlLn.Close()
		t.close()
	}()
	ipA, _ := bn.a.TailscaleIPs()
	bn.aIP = ipA

	// Warm up until the path works, then ask which path it is (direct UDP or DERP).
	warm := bn.nextPort()
	wln, err := bn.a.Listen("tcp", fmt.Sprintf(":%d", warm))
	if err != nil {
		fatalf("listen: %v", err)
	}
	go echo(wln)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := bn.connectRTT(warm); err == nil {
			break
		} else if time.Now().After(deadline) {
			fatalf("warm-up echo never worked: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	wln.Close()
	pathInfo := map[string]any{}
	if lc, err := bn.b.LocalClient(); err == nil {
		for i := 0; i < 20; i++ {
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			pr, err := lc.Ping(pctx, ipA, tailcfg.PingDisco)
			pcancel()
			if err == nil && pr.Err == "" {
				pathInfo = map[string]any{"endpoint": pr.Endpoint, "derp_region": pr.DERPRegionID}
				if pr.Endpoint != "" {
					break
				}
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	emit("READY", map[string]any{"a_ip": ipA.String(), "path": pathInfo,
		"setup_s": time.Since(setup0).Seconds(), "pid": os.Getpid()})

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		var res any
		var err error
		num := func(i int) float64 {
			if i >= len(f) {
				err = errors.Join(err, fmt.Errorf("%s: missing argument %d", f[0], i))
				return 0
			}
			x, perr := strconv.ParseFloat(f[i], 64)
			err = errors.Join(err, perr)
			return x
		}
		switch f[0] {
		case "quit":
			return
		case "latency":
			iters, warmup := int(num(1)), int(num(2))
			if err == nil {
				res, err = bn.latency(iters, warmup)
			}
		case "bulk":
			streams, secs := int(num(1)), num(2)
			if err == nil {
				res, err = bn.bulk(streams, secs)
			}
		case "flows":
			workers, secs := int(num(1)), num(2)
			if err == nil {
				res, err = bn.flows(workers, secs)
			}
		default:
			err = fmt.Errorf("unknown command %q", f[0])
		}
		if err != nil {
			emit("RESULT", map[string]any{"error": err.Error()})
			continue
		}
		emit("RESULT", res)
	}
}
