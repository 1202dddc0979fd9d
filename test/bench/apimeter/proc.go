package apimeter

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// StatusKiB reads a "kB" field (VmRSS, VmHWM) of /proc/<pid>/status; 0 when unreadable.
func StatusKiB(pid, field string) int64 {
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

// procStat is the part of /proc/<pid>/stat the benchmarks use.
type procStat struct {
	comm       string
	ppid       int
	cpuSeconds float64 // user + system
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
	return procStat{comm: s[open+1 : closing], ppid: ppid, cpuSeconds: (utime + stime) / clockTicks}, true
}

// CPUByProcess returns the CPU seconds used so far by this process (under selfName) and its
// direct children (kube-apiserver, etcd and the benchmark's own child processes), each under
// the name names gives its pid, else its command name.
func CPUByProcess(selfName string, names map[int]string) map[string]float64 {
	self := os.Getpid()
	out := map[string]float64{}
	if st, ok := readProcStat("self"); ok {
		out[selfName] = st.cpuSeconds
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, ok := readProcStat(e.Name())
		if !ok || st.ppid != self {
			continue
		}
		name := st.comm
		if n, ok := names[pid]; ok {
			name = n
		}
		out[name] += st.cpuSeconds
	}
	return out
}
