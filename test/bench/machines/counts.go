package main

import (
	"cmp"
	"slices"
)

// apiKey is one kind of request, e.g. PATCH anvilhosts/status 200.
type apiKey struct {
	Verb, Resource string
	Code           int
}

func (k apiKey) isWrite() bool {
	switch k.Verb {
	case "CREATE", "UPDATE", "PATCH", "DELETE":
		return true
	}
	return false
}

// apiCounts are request counts by kind.
type apiCounts map[apiKey]int64

// minus is what happened between an earlier snapshot and this one.
func (c apiCounts) minus(before apiCounts) apiCounts {
	out := apiCounts{}
	for k, v := range c {
		if n := v - before[k]; n != 0 {
			out[k] = n
		}
	}
	return out
}

// writes is the number of write requests (any outcome).
func (c apiCounts) writes() int64 {
	var n int64
	for k, v := range c {
		if k.isWrite() {
			n += v
		}
	}
	return n
}

// failedWrites counts the writes the API server refused (conflicts, mostly).
func (c apiCounts) failedWrites() int64 {
	var n int64
	for k, v := range c {
		if k.isWrite() && k.Code >= 400 {
			n += v
		}
	}
	return n
}

// reads counts GET/LIST requests.
func (c apiCounts) reads() int64 {
	var n int64
	for k, v := range c {
		if k.Verb == "GET/LIST" {
			n += v
		}
	}
	return n
}

// writeRow is one line of the write breakdown.
type writeRow struct {
	Name          string
	Count, Failed int64
}

// writeRows groups writes by "VERB resource", most first.
func (c apiCounts) writeRows() []writeRow {
	by := map[string]*writeRow{}
	for k, v := range c {
		if !k.isWrite() {
			continue
		}
		name := k.Verb + " " + k.Resource
		r := by[name]
		if r == nil {
			r = &writeRow{Name: name}
			by[name] = r
		}
		r.Count += v
		if k.Code >= 400 {
			r.Failed += v
		}
	}
	rows := make([]writeRow, 0, len(by))
	for _, r := range by {
		rows = append(rows, *r)
	}
	// Most first, then by name.
	slices.SortFunc(rows, func(a, b writeRow) int { return cmp.Or(cmp.Compare(b.Count, a.Count), cmp.Compare(a.Name, b.Name)) })
	return rows
}
