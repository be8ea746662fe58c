package eagle

// Against a live server, started by tests/test_go_client.py, which passes its address
// (EAGLE_GRPC_TARGET), the token it accepts and a photo; without them the tests fail, never
// pass by skipping.

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

func env(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run these tests through tests/test_go_client.py", name)
	}
	return v
}

func dial(t *testing.T, opts ...Option) *Client {
	t.Helper()
	c, err := Dial(env(t, "EAGLE_GRPC_TARGET"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func authed(t *testing.T) *Client { return dial(t, WithToken(env(t, "EAGLE_TOKEN"))) }

func TestChatAndStreamGiveTheSameText(t *testing.T) {
	c := authed(t)
	ctx := context.Background()
	// 32 tokens: enough that a busy machine does not deliver them all in one piece
	whole, err := c.Chat(ctx, "Hi", Request{MaxNewTokens: 32, IgnoreEOS: true, RequestID: "go-1"})
	if err != nil {
		t.Fatal(err)
	}
	if whole.RequestID != "go-1" || whole.FinishReason != "length" ||
		whole.Usage.CompletionTokens != 32 {
		t.Fatalf("reply: %+v", whole)
	}
	s, err := c.StreamChat(ctx, "Hi", Request{MaxNewTokens: 32, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	var pieces []string
	for {
		p, err := s.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		pieces = append(pieces, p)
	}
	if len(pieces) < 2 || strings.Join(pieces, "") != whole.Text || s.Result().Text != whole.Text {
		t.Fatalf("%d pieces %q against %q", len(pieces), strings.Join(pieces, ""), whole.Text)
	}
	if s.Result().Usage.CompletionTokens != 32 || s.Result().Timing.DecodeMs <= 0 {
		t.Fatalf("result: %+v", s.Result())
	}
}

func TestAnImage(t *testing.T) {
	photo, err := os.ReadFile(env(t, "EAGLE_PHOTO"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := authed(t).Chat(context.Background(), "Describe the image.",
		Request{Images: [][]byte{photo}, MaxNewTokens: 2, MaxTilesPerImage: 2})
	if err != nil {
		t.Fatal(err)
	}
	if r.Usage.ImageTiles != 3 || r.Usage.VisionTokens != 768 {
		t.Fatalf("usage: %+v", r.Usage)
	}
}

func TestABadRequestNamesTheField(t *testing.T) {
	_, err := authed(t).Chat(context.Background(), "Hi", Request{MaxNewTokens: 1_000_000})
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("not an *Error: %v", err)
	}
	if e.Code != codes.InvalidArgument || !strings.HasPrefix(e.Message, "generation.max_new_tokens: ") {
		t.Fatalf("%v", e)
	}
	if len(e.FieldViolations) != 1 || e.FieldViolations[0].Field != "generation.max_new_tokens" {
		t.Fatalf("violations: %+v", e.FieldViolations)
	}
	if e.RequestID == "" {
		t.Fatal("no request id in the trailers")
	}
}

func TestTheTokenIsRequiredAndNamesTheTenant(t *testing.T) {
	_, err := dial(t).Chat(context.Background(), "Hi", Request{MaxNewTokens: 1})
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.Unauthenticated ||
		!strings.Contains(e.Message, "authorization: Bearer <token>") {
		t.Fatalf("without a token: %v", err)
	}
	info, err := authed(t).ModelInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.Tenant.GetName() != "web" || info.MaxNewTokens == 0 {
		t.Fatalf("info: %+v", info)
	}
}

func TestDeadlinesAndCancelsEndTheCall(t *testing.T) {
	c := dial(t, WithToken(env(t, "EAGLE_TOKEN")), WithTimeout(300*time.Millisecond))
	start := time.Now()
	_, err := c.Chat(context.Background(), "Hi", Request{MaxNewTokens: 4000, IgnoreEOS: true})
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.DeadlineExceeded || time.Since(start) > 5*time.Second {
		t.Fatalf("deadline: %v after %s", err, time.Since(start))
	}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := authed(t).StreamChat(ctx, "Hi", Request{MaxNewTokens: 4000, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := s.Next(); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	if _, err := s.Next(); !errors.As(err, &e) || e.Code != codes.Canceled {
		t.Fatalf("after cancel: %v", err)
	}
	for i := 0; ; i++ { // the server ends the generation: the tenant has nothing in flight
		info, err := authed(t).ModelInfo(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if info.Tenant.GetInFlight() == 0 {
			break
		}
		if i == 100 {
			t.Fatalf("still in flight: %d", info.Tenant.GetInFlight())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Three replicas under one name, the third reporting NOT_SERVING (draining): calls go
// round-robin over the first two and never to the third (tests/test_go_client.py counts
// each replica's calls afterwards).
func TestRoundRobinOverHealthyReplicas(t *testing.T) {
	var addrs []resolver.Address
	for _, a := range strings.Split(env(t, "EAGLE_GRPC_REPLICAS"), ",") {
		addrs = append(addrs, resolver.Address{Addr: a})
	}
	r := manual.NewBuilderWithScheme("eagletest")
	r.InitialState(resolver.State{Addresses: addrs})
	c2, err := Dial(r.Scheme()+":///replicas", WithToken(env(t, "EAGLE_TOKEN")),
		WithDialOptions(grpc.WithResolvers(r)))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	for i := 0; i < 12; i++ {
		if _, err := c2.Chat(context.Background(), "Hi", Request{MaxNewTokens: 1}); err != nil {
			t.Fatal(err)
		}
	}
}
