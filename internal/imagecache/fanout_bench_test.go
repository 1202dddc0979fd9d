package imagecache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BenchmarkFanOutVsNginx measures image fan-out: N clients download the same cached image at
// once, from the Anvil image cache and from nginx serving the same bytes with sendfile, with
// the same Go load client, alternating rounds in the same run. It reports both throughputs
// and their ratio (anvil/nginx), and the median of the per-round ratios, which holds up
// better than the totals when other work shares the machine. It skips when nginx is not
// installed (Debian: nginx-light or nginx).
//
// Knobs: ANVIL_FANOUT_MB (image size, default 64), ANVIL_FANOUT_CLIENTS (default 50).
func BenchmarkFanOutVsNginx(b *testing.B) {
	nginx := findNginx()
	if nginx == "" {
		b.Skip("nginx not installed (apt-get install nginx-light)")
	}
	sizeMB := envInt("ANVIL_FANOUT_MB", 64)
	clients := envInt("ANVIL_FANOUT_CLIENTS", 50)
	size := int64(sizeMB) << 20
	dir := b.TempDir()

	// The image: one file in nginx's root, also the upstream the Anvil cache fills from.
	www := filepath.Join(dir, "www")
	checksum, err := writeImage(www, size)
	if err != nil {
		b.Fatal(err)
	}
	up := httptest.NewServer(http.FileServer(http.Dir(www)))
	src := Source{URL: up.URL + "/image.raw", Checksum: checksum}

	cache, err := New(Options{Dir: filepath.Join(dir, "cache"), MaxBytes: 2 * size, AllowLocal: true})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cache.Close() }()
	p, err := cache.Register(src)
	if err != nil {
		b.Fatal(err)
	}
	blob, err := cache.Open(context.Background(), src)
	if err != nil {
		b.Fatal(err)
	}
	_ = blob.Close()
	up.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	anvilSrv := &http.Server{Handler: cache, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = anvilSrv.Serve(ln) }()
	defer func() { _ = anvilSrv.Close() }()
	anvilURL := "http://" + ln.Addr().String() + p

	nginxURL, stop, err := startNginx(nginx, dir, www)
	if err != nil {
		b.Fatal(err)
	}
	defer stop()

	client := &http.Client{Transport: &http.Transport{
		Proxy: nil, MaxIdleConnsPerHost: clients, DisableCompression: true,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}, Timeout: 5 * time.Minute}
	defer client.CloseIdleConnections()

	// Warm both (page cache, connections).
	for _, u := range []string{anvilURL, nginxURL} {
		if _, err := fanOut(client, u, size, 4); err != nil {
			b.Fatal(err)
		}
	}

	var anvilTime, nginxTime time.Duration
	var ratios []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		order := []string{anvilURL, nginxURL}
		if i%2 == 1 {
			order[0], order[1] = order[1], order[0]
		}
		var a, n time.Duration
		for _, u := range order {
			d, err := fanOut(client, u, size, clients)
			if err != nil {
				b.Fatal(err)
			}
			if u == anvilURL {
				a = d
			} else {
				n = d
			}
		}
		anvilTime += a
		nginxTime += n
		ratios = append(ratios, n.Seconds()/a.Seconds()) // time ratio inverted = throughput ratio
	}
	b.StopTimer()
	sort.Float64s(ratios)
	median := ratios[len(ratios)/2]
	if len(ratios)%2 == 0 {
		median = (ratios[len(ratios)/2-1] + ratios[len(ratios)/2]) / 2
	}

	total := float64(size) * float64(clients) * float64(b.N) / 1e6
	anvil, ngx := total/anvilTime.Seconds(), total/nginxTime.Seconds()
	b.ReportMetric(anvil, "anvil-MB/s")
	b.ReportMetric(ngx, "nginx-MB/s")
	b.ReportMetric(anvil/ngx, "anvil/nginx")
	b.ReportMetric(median, "median-round-ratio")
	b.ReportMetric(0, "ns/op")
	b.Logf("fan-out of a %d MiB image to %d clients, %d round(s) each: Anvil %.0f MB/s, nginx %.0f MB/s, ratio %.2f (median of rounds %.2f)",
		sizeMB, clients, b.N, anvil, ngx, anvil/ngx, median)
}

// writeImage writes size random bytes to dir/image.raw and returns their checksum; the
// bytes are not kept in memory during the measurement.
func writeImage(dir string, size int64) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	img := randomBytes(int(size))
	if err := os.WriteFile(filepath.Join(dir, "image.raw"), img, 0o644); err != nil {
		return "", err
	}
	return sha256sum(img), nil
}

// fanOut starts n downloads of u at once and returns when all have read the whole body.
func fanOut(client *http.Client, u string, size int64, n int) (time.Duration, error) {
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := client.Get(u) //nolint:noctx // bounded by the client's timeout
			if err != nil {
				errs <- err
				return
			}
			defer func() { _ = resp.Body.Close() }()
			buf := make([]byte, 256<<10)
			got, err := io.CopyBuffer(io.Discard, resp.Body, buf)
			if err != nil || got != size || resp.StatusCode != http.StatusOK {
				errs <- fmt.Errorf("%s: status %d, %d of %d bytes: %w", u, resp.StatusCode, got, size, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	return time.Since(start), <-errs
}

func findNginx() string {
	if p, err := exec.LookPath("nginx"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// startNginx runs nginx in the foreground on a free loopback port with a throw-away
// configuration tuned the way one would serve large static files (sendfile, tcp_nopush, no
// access log, one worker per core). stop ends it (and its workers) and waits.
func startNginx(bin, dir, www string) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	addr := ln.Addr().String()
	_ = ln.Close()

	user := ""
	if os.Geteuid() == 0 {
		user = "user root;" // workers must read the test's 0700 temp dir
	}
	conf := fmt.Sprintf(`daemon off;
master_process on;
worker_processes auto;
%s
pid %[2]s/nginx.pid;
error_log %[2]s/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 65;
  client_body_temp_path %[2]s/nginx-body;
  proxy_temp_path %[2]s/nginx-proxy;
  fastcgi_temp_path %[2]s/nginx-fastcgi;
  uwsgi_temp_path %[2]s/nginx-uwsgi;
  scgi_temp_path %[2]s/nginx-scgi;
  default_type application/octet-stream;
  server {
    listen %[3]s;
    root %[4]s;
  }
}
`, user, dir, addr, www)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return "", nil, err
	}
	cmd := exec.Command(bin, "-p", dir, "-c", confPath, "-e", filepath.Join(dir, "nginx-error.log"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM) // fast shutdown: the master stops its workers
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // our own process group only
			<-exited
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			_ = c.Close()
			return "http://" + addr + "/image.raw", stop, nil
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "nginx-error.log"))
			return "", nil, fmt.Errorf("nginx exited: %w: %s", waitErr, log)
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, errors.New("nginx did not start listening")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
