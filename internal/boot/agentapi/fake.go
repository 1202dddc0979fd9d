package agentapi

import (
	"context"
	"sync"

	"k8s.io/apimachinery/pkg/types"
)

// FakeHost is one host of a FakeBackend.
type FakeHost struct {
	View HostView
	// Tasks is the queue NextTask serves from; a Result for the head task pops it.
	Tasks []Task
	// Bootstrap is the user-data BootstrapData returns.
	Bootstrap []byte

	// What the agent reported, in order.
	Registrations []Registration
	Progress      []Progress
	Results       []Result
}

// FakeBackend is an in-memory Backend for tests (of this package and of its users). It
// durably records registrations in HostView.Registered, as the real backend does in status.
type FakeBackend struct {
	mu       sync.Mutex
	hosts    map[types.NamespacedName]*FakeHost
	failNext map[string]error
	// BootstrapCalls counts BootstrapData calls, so tests can assert that refused requests
	// never reached the secret.
	bootstrapCalls int
}

// NewFakeBackend returns an empty FakeBackend.
func NewFakeBackend() *FakeBackend {
	return &FakeBackend{hosts: map[types.NamespacedName]*FakeHost{}, failNext: map[string]error{}}
}

// SetHost adds or replaces a host.
func (f *FakeBackend) SetHost(name types.NamespacedName, h FakeHost) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hosts[name] = &h
}

// Update changes a host in place under the lock.
func (f *FakeBackend) Update(name types.NamespacedName, fn func(*FakeHost)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if h := f.hosts[name]; h != nil {
		fn(h)
	}
}

// Host returns a copy of a host's record.
func (f *FakeBackend) Host(name types.NamespacedName) (FakeHost, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h, ok := f.hosts[name]
	if !ok {
		return FakeHost{}, false
	}
	c := *h
	c.Tasks = append([]Task(nil), h.Tasks...)
	c.Registrations = append([]Registration(nil), h.Registrations...)
	c.Progress = append([]Progress(nil), h.Progress...)
	c.Results = append([]Result(nil), h.Results...)
	return c, true
}

// BootstrapCalls says how often BootstrapData was called.
func (f *FakeBackend) BootstrapCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bootstrapCalls
}

// FailNext makes the next call of method ("Expected", "Registered", "NextTask", "Progress",
// "Result", "BootstrapData") return err.
func (f *FakeBackend) FailNext(method string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failNext[method] = err
}

func (f *FakeBackend) take(method string) error {
	err := f.failNext[method]
	delete(f.failNext, method)
	return err
}

// Expected implements Backend.
func (f *FakeBackend) Expected(_ context.Context, host types.NamespacedName) (HostView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.take("Expected"); err != nil {
		return HostView{}, err
	}
	h, ok := f.hosts[host]
	if !ok {
		return HostView{}, ErrUnknownHost
	}
	return h.View, nil
}

// Registered implements Backend.
func (f *FakeBackend) Registered(_ context.Context, r Registration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.take("Registered"); err != nil {
		return err
	}
	h, ok := f.hosts[r.Host]
	if !ok {
		return ErrUnknownHost
	}
	if h.View.Registered && h.View.Attempt == r.Attempt {
		return ErrAlreadyRegistered
	}
	h.View.Registered = true
	h.Registrations = append(h.Registrations, r)
	return nil
}

// NextTask implements Backend.
func (f *FakeBackend) NextTask(_ context.Context, a Agent) (Task, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.take("NextTask"); err != nil {
		return Task{}, err
	}
	h, ok := f.hosts[a.Host]
	if !ok {
		return Task{}, ErrUnknownHost
	}
	if len(h.Tasks) == 0 {
		return Task{Kind: TaskNone, RetryAfterSeconds: 5}, nil
	}
	return h.Tasks[0], nil
}

// Progress implements Backend.
func (f *FakeBackend) Progress(_ context.Context, a Agent, p Progress) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.take("Progress"); err != nil {
		return err
	}
	h, ok := f.hosts[a.Host]
	if !ok {
		return ErrUnknownHost
	}
	if len(h.Tasks) == 0 || h.Tasks[0].ID != p.TaskID {
		return ErrConflict
	}
	h.Progress = append(h.Progress, p)
	return nil
}

// Result implements Backend.
func (f *FakeBackend) Result(_ context.Context, a Agent, r Result) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.take("Result"); err != nil {
		return err
	}
	h, ok := f.hosts[a.Host]
	if !ok {
		return ErrUnknownHost
	}
	if n := len(h.Results); n > 0 && h.Results[n-1].TaskID == r.TaskID {
		return nil // a retry of the result just recorded
	}
	if len(h.Tasks) == 0 || h.Tasks[0].ID != r.TaskID {
		return ErrConflict
	}
	h.Tasks = h.Tasks[1:]
	h.Results = append(h.Results, r)
	return nil
}

// BootstrapData implements Backend.
func (f *FakeBackend) BootstrapData(_ context.Context, host types.NamespacedName) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bootstrapCalls++
	if err := f.take("BootstrapData"); err != nil {
		return nil, err
	}
	h, ok := f.hosts[host]
	if !ok {
		return nil, ErrUnknownHost
	}
	return append([]byte(nil), h.Bootstrap...), nil
}
