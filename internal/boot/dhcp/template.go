package dhcp

import (
	"fmt"
	"strings"
)

type field int

const (
	fieldLiteral field = iota
	fieldMAC
	fieldName
	fieldNamespace
)

// tmplPart is a piece of a parsed script URL template: literal text or a placeholder. The
// template is parsed once, so expanding it per request is a few appends.
type tmplPart struct {
	field field
	lit   string
}

func parseTemplate(t string) ([]tmplPart, error) {
	if t == "" {
		return nil, nil
	}
	if !strings.HasPrefix(t, "http://") && !strings.HasPrefix(t, "https://") {
		return nil, fmt.Errorf("script URL %q: want an http(s) URL", t)
	}
	var parts []tmplPart
	for rest := t; rest != ""; {
		i := strings.IndexByte(rest, '{')
		if i < 0 {
			parts = append(parts, tmplPart{lit: rest})
			break
		}
		if i > 0 {
			parts = append(parts, tmplPart{lit: rest[:i]})
		}
		j := strings.IndexByte(rest[i:], '}')
		if j < 0 {
			return nil, fmt.Errorf("script URL %q: unclosed {", t)
		}
		switch name := rest[i+1 : i+j]; name {
		case "mac":
			parts = append(parts, tmplPart{field: fieldMAC})
		case "name":
			parts = append(parts, tmplPart{field: fieldName})
		case "namespace":
			parts = append(parts, tmplPart{field: fieldNamespace})
		default:
			return nil, fmt.Errorf("script URL %q: unknown placeholder {%s} (want {mac}, {name} or {namespace})", t, name)
		}
		rest = rest[i+j+1:]
	}
	for _, p := range parts {
		if !printable(p.lit) {
			return nil, fmt.Errorf("script URL %q has spaces or control characters", t)
		}
	}
	return parts, nil
}
