// Package eagle is the Go client for eagle-grpc (Eagle2 vision-language models over gRPC):
// Chat, StreamChat and ModelInfo over a channel that balances round-robin over every
// address the name resolves to, skips replicas whose health says NOT_SERVING, retries
// UNAVAILABLE and RESOURCE_EXHAUSTED with gRPC's own retry policy (honouring the server's
// pushback), sends the bearer token, and turns a failed call into an *Error that names the
// field that was wrong and the wait the server asked for.
package eagle

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/health" // client-side health checking (the service config's)
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	eaglev1 "github.com/eagle-grpc/eagle-grpc/clients/go/gen/eagle/v1"
)

// ServiceConfig is the channel's default service config: round-robin over the resolved
// addresses, health checking against the chat service's readiness, and retries of
// refusals that another replica (or a moment later) may take.
const ServiceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "healthCheckConfig": {"serviceName": "eagle.v1.ChatService"},
  "methodConfig": [{
    "name": [{"service": "eagle.v1.ChatService"}],
    "retryPolicy": {
      "maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "5s",
      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    }
  }]
}`

// Client calls one eagle-grpc service (one replica or many behind a DNS name).
type Client struct {
	conn    *grpc.ClientConn
	stub    eaglev1.ChatServiceClient
	timeout time.Duration
}

// Option configures Dial.
type Option func(*config)

type config struct {
	token   string
	creds   credentials.TransportCredentials
	timeout time.Duration
	dial    []grpc.DialOption
}

// WithToken sends "authorization: Bearer <token>" on every call.
func WithToken(token string) Option { return func(c *config) { c.token = token } }

// WithTLS uses TLS (or mutual TLS) credentials instead of plaintext.
func WithTLS(creds credentials.TransportCredentials) Option {
	return func(c *config) { c.creds = creds }
}

// WithTimeout is each call's deadline when its context has none (default 60 s).
func WithTimeout(d time.Duration) Option { return func(c *config) { c.timeout = d } }

// WithDialOptions passes further options to grpc.Dial.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dial = append(c.dial, opts...) }
}

type bearer struct {
	value  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": b.value}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// Dial connects to target, e.g. "dns:///eagle-grpc-headless.ns.svc:50051" for every replica
// or "127.0.0.1:50051" for one.
func Dial(target string, opts ...Option) (*Client, error) {
	c := config{timeout: 60 * time.Second}
	for _, o := range opts {
		o(&c)
	}
	dial := []grpc.DialOption{grpc.WithDefaultServiceConfig(ServiceConfig)}
	if c.creds != nil {
		dial = append(dial, grpc.WithTransportCredentials(c.creds))
	} else {
		dial = append(dial, grpc.WithInsecure()) //nolint:staticcheck // plaintext by choice
	}
	if c.token != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{"Bearer " + c.token, c.creds != nil}))
	}
	conn, err := grpc.Dial(target, append(dial, c.dial...)...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, stub: eaglev1.NewChatServiceClient(conn), timeout: c.timeout}, nil
}

// Close closes the channel.
func (c *Client) Close() error { return c.conn.Close() }

// Stub is the generated client, for what the helpers below do not cover.
func (c *Client) Stub() eaglev1.ChatServiceClient { return c.stub }

// Request is what a chat sends besides the prompt; the zero value asks for the server's
// defaults.
type Request struct {
	System           string
	Images           [][]byte // encoded files: JPEG, PNG, WebP...
	MaxNewTokens     uint32
	Temperature      *float32
	IgnoreEOS        bool
	MaxTilesPerImage uint32
	RequestID        string
	Batch            bool // priority: batch work yields to interactive calls
	CacheSalt        string
}

func (r Request) messages(prompt string) []*eaglev1.Message {
	var out []*eaglev1.Message
	if r.System != "" {
		out = append(out, &eaglev1.Message{Role: eaglev1.Role_ROLE_SYSTEM, Parts: []*eaglev1.Part{
			{Kind: &eaglev1.Part_Text{Text: r.System}}}})
	}
	var parts []*eaglev1.Part
	for _, img := range r.Images {
		parts = append(parts, &eaglev1.Part{Kind: &eaglev1.Part_Image{Image: &eaglev1.Image{
			Source: &eaglev1.Image_Data{Data: img}}}})
	}
	parts = append(parts, &eaglev1.Part{Kind: &eaglev1.Part_Text{Text: prompt}})
	return append(out, &eaglev1.Message{Role: eaglev1.Role_ROLE_USER, Parts: parts})
}

func (r Request) generation() *eaglev1.GenerationConfig {
	return &eaglev1.GenerationConfig{MaxNewTokens: r.MaxNewTokens, Temperature: r.Temperature,
		IgnoreEos: r.IgnoreEOS}
}

func (r Request) priority() eaglev1.Priority {
	if r.Batch {
		return eaglev1.Priority_PRIORITY_BATCH
	}
	return eaglev1.Priority_PRIORITY_UNSPECIFIED
}

// Reply is a whole answer, or a stream's end.
type Reply struct {
	RequestID    string
	Text         string
	FinishReason string // "stop", "length", "stop_sequence"
	Usage        *eaglev1.Usage
	Timing       *eaglev1.Timing
}

func reason(r eaglev1.FinishReason) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "FINISH_REASON_"))
}

func (c *Client) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || c.timeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.timeout)
}

// Chat returns the whole reply once generation has ended.
func (c *Client) Chat(ctx context.Context, prompt string, r Request) (*Reply, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	var trailer metadata.MD
	resp, err := c.stub.Chat(ctx, &eaglev1.ChatRequest{
		RequestId: r.RequestID, Messages: r.messages(prompt), Generation: r.generation(),
		Vision:    &eaglev1.VisionConfig{MaxTilesPerImage: r.MaxTilesPerImage},
		CacheSalt: r.CacheSalt, Priority: r.priority()}, grpc.Trailer(&trailer))
	if err != nil {
		return nil, asError(err, trailer)
	}
	return &Reply{RequestID: resp.RequestId, Text: resp.Text,
		FinishReason: reason(resp.FinishReason), Usage: resp.Usage, Timing: resp.Timing}, nil
}

// Stream is a reply as it is generated.
type Stream struct {
	call   eaglev1.ChatService_StreamChatClient
	cancel context.CancelFunc
	text   strings.Builder
	result *Reply
}

// StreamChat starts a streamed reply; read it with Next. Cancelling ctx ends the
// generation on the server.
func (c *Client) StreamChat(ctx context.Context, prompt string, r Request) (*Stream, error) {
	ctx, cancel := c.deadline(ctx)
	call, err := c.stub.StreamChat(ctx, &eaglev1.StreamChatRequest{
		RequestId: r.RequestID, Messages: r.messages(prompt), Generation: r.generation(),
		Vision:    &eaglev1.VisionConfig{MaxTilesPerImage: r.MaxTilesPerImage},
		CacheSalt: r.CacheSalt, Priority: r.priority()})
	if err != nil {
		cancel()
		return nil, asError(err, nil)
	}
	return &Stream{call: call, cancel: cancel}, nil
}

// Next returns the next piece of text; io.EOF once the reply has ended (then Result).
func (s *Stream) Next() (string, error) {
	for {
		chunk, err := s.call.Recv()
		if err == io.EOF {
			s.cancel()
			if s.result == nil {
				return "", errors.New("the stream ended without its final message")
			}
			return "", io.EOF
		}
		if err != nil {
			s.cancel()
			return "", asError(err, s.call.Trailer())
		}
		s.text.WriteString(chunk.Text)
		if chunk.FinishReason != eaglev1.FinishReason_FINISH_REASON_UNSPECIFIED {
			s.result = &Reply{RequestID: chunk.RequestId, Text: s.text.String(),
				FinishReason: reason(chunk.FinishReason), Usage: chunk.Usage, Timing: chunk.Timing}
		}
		if chunk.Text != "" {
			return chunk.Text, nil
		}
	}
}

// Result is the whole reply with usage and timing, once Next has returned io.EOF.
func (s *Stream) Result() *Reply { return s.result }

// Close abandons the stream (the server ends the generation).
func (s *Stream) Close() { s.cancel() }

// ModelInfo describes the model, its limits and the caller's tenant.
func (c *Client) ModelInfo(ctx context.Context) (*eaglev1.GetModelInfoResponse, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	info, err := c.stub.GetModelInfo(ctx, &eaglev1.GetModelInfoRequest{})
	if err != nil {
		return nil, asError(err, nil)
	}
	return info, nil
}

// FieldViolation names a request field the server refused and why.
type FieldViolation struct{ Field, Description string }

// Error is a failed call: the status code, the server's message, the fields it named, the
// wait it asked for before a retry (negative: do not retry; zero: none given), the request id.
type Error struct {
	Code            codes.Code
	Message         string
	FieldViolations []FieldViolation
	RetryAfter      time.Duration
	RequestID       string
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

func asError(err error, trailer metadata.MD) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	out := &Error{Code: st.Code(), Message: st.Message()}
	for _, d := range st.Details() {
		switch v := d.(type) {
		case *errdetails.BadRequest:
			for _, f := range v.GetFieldViolations() {
				out.FieldViolations = append(out.FieldViolations,
					FieldViolation{f.GetField(), f.GetDescription()})
			}
		case *errdetails.RetryInfo:
			if delay := v.GetRetryDelay(); delay != nil {
				out.RetryAfter = time.Duration(delay.GetSeconds())*time.Second +
					time.Duration(delay.GetNanos())
			}
		}
	}
	if ids := trailer.Get("x-request-id"); len(ids) > 0 {
		out.RequestID = ids[0]
	}
	return out
}
