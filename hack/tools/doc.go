// Package tools pins the developer tools that the Makefile builds (see the tool directives in
// go.mod); it has no code of its own.
package tools
