package main

import (
	"os"
	"strconv"
	"strings"
)

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
