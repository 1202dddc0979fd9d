package main

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

// procStatusKiB reads a "kB" field (VmRSS, VmHWM) of /proc/<pid>/status.
func procStatusKiB(pid, field string) int64 {
	f, err := os.Open(filepath.Join("/proc", pid, "status"))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			v, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return v
		}
	}
	return 0
}

// residentKiB reads the current RSS from /proc/self/statm, which is cheaper than status.
func residentKiB() int64 {
	raw, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(raw))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize()) / 1024
}

// procStat is the part of /proc/<pid>/stat the benchmark uses.
type procStat struct {
	Comm       string
	PPID       int
	CPUSeconds float64 // user + system
}

func readProcStat(pid string) (procStat, bool) {
	raw, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return procStat{}, false
	}
	s := string(raw)
	open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return procStat{}, false
	}
	f := strings.Fields(s[closing+1:])
	if len(f) < 13 {
		return procStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return procStat{Comm: s[open+1 : closing], PPID: ppid, CPUSeconds: (utime + stime) / clockTicks}, true
}

// cpuByProcess returns the CPU seconds used so far by this process and its direct children
// (kube-apiserver, etcd and the benchmark's own child processes), keyed by a display name.
func cpuByProcess(names map[int]string) map[string]float64 {
	self := os.Getpid()
	out := map[string]float64{}
	if st, ok := readProcStat("self"); ok {
		out["bench (host creation, watch)"] = st.CPUSeconds
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, ok := readProcStat(e.Name())
		if !ok || st.PPID != self {
			continue
		}
		name := st.Comm
		if n, ok := names[pid]; ok {
			name = n
		}
		out[name] += st.CPUSeconds
	}
	return out
}
